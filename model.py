"""
PAE reference implementation: every network, their loaders, plus a short section of shared plumbing.

Sections (each marked with a banner):
  1. LightningDiT        the flow-matching generator trained on PAE latents
  2. PAE tokenizer       frozen VFM, DAM, spherical latent, ViT decoder
  3. prior refinement    P_t and Q_t
  4. PatchGAN            the discriminator of the GAN loss
  5. loaders             build_* from presets, *_from_checkpoint (ours and the authors' released files)
  6. shared plumbing     config, dist, print0, checkpoints, guards, locks, the run kit of the training loops, FLOPs
"""

import argparse
import atexit
import dataclasses
import datetime
import functools
import hashlib
import inspect
import json
import math
import os
import re
import signal
import socket
import sys
import threading
import time
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.checkpoint import checkpoint as activation_checkpoint

# -----------------------------------------------------------------------------
# 1. LightningDiT


def sincos_2d(dim, grid):
    """Fixed 2-D sin-cos position embedding (grid*grid, dim), raster order: first half the column, second half the
    row, each [sin | cos] at frequencies 1/10000^(i/(dim/4)) (the released tables of LightningDiT, DAM, decoder)."""
    assert dim % 4 == 0, "sin-cos embedding width must be divisible by 4"
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    pos = torch.arange(grid, dtype=torch.float64)
    rows, cols = torch.meshgrid(pos, pos, indexing="ij")

    def embed(p):  # (N,) -> (N, dim/2)
        angles = p.reshape(-1, 1) * omega
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([embed(cols), embed(rows)], dim=1).float()


def rope_2d(head_dim, grid):
    """cos/sin tables (N, head_dim) for 2-D RoPE: half the channels rotate with the row, half with the column."""
    half = head_dim // 2  # channels per axis
    assert half % 2 == 0, "head_dim must be divisible by 4 for 2-D RoPE"
    freqs = 10000 ** (-torch.arange(0, half, 2, dtype=torch.float64) / half)  # 10000^(-2i/(head_dim/2))
    pos = torch.arange(grid, dtype=torch.float64)
    rows, cols = torch.meshgrid(pos, pos, indexing="ij")
    angles = torch.cat([rows.reshape(-1, 1) * freqs, cols.reshape(-1, 1) * freqs], dim=1)  # (N, half)
    angles = angles.repeat_interleave(2, dim=1)  # adjacent pairs share an angle
    return angles.cos().float(), angles.sin().float()


def apply_rope(x, cos, sin):
    """Rotate adjacent channel pairs (x0, x1) -> (x0 cos - x1 sin, x1 cos + x0 sin). x: (B, heads, N, head_dim)."""
    pairs = x.unflatten(-1, (-1, 2))
    rotated = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)
    return x * cos + rotated * sin


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):  # computed in fp32, as released
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight).type_as(x)


class DiTAttention(nn.Module):
    def __init__(self, dim, heads, qk_norm):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = RMSNorm(dim // heads) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(dim // heads) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, rope):
        B, N, D = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # (B, h, N, hd)
        q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, *rope).type_as(v), apply_rope(k, *rope).type_as(v)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(B, N, D))


class SwiGLU(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x):
        a, b = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(a) * b)


class DiTBlock(nn.Module):
    def __init__(self, dim, heads, qk_norm):
        super().__init__()
        self.norm1 = RMSNorm(dim)
        self.attn = DiTAttention(dim, heads, qk_norm)
        self.norm2 = RMSNorm(dim)
        self.ffn = SwiGLU(dim, int(2 / 3 * 4 * dim))  # 3072 for XL, LightningDiT's SwiGLU width
        self.adaLN = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x, c, rope):
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN(c).unsqueeze(1).chunk(6, dim=-1)
        x = x + gate1 * self.attn(self.norm1(x) * (1 + scale1) + shift1, rope)
        return x + gate2 * self.ffn(self.norm2(x) * (1 + scale2) + shift2)


def timestep_embedding(t, dim=256, max_period=10000):
    """Sinusoidal features [cos | sin] of the raw t in [0, 1] (LightningDiT's TimestepEmbedder)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angles = t.float()[:, None] * freqs[None]
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


class LightningDiT(nn.Module):
    def __init__(self, in_channels=32, input_size=16, patch=1, dim=1152, depth=28, heads=16,
                 num_classes=1000, qk_norm=False, grad_ckpt=False):
        super().__init__()
        assert input_size % patch == 0, f"input size {input_size} is not divisible by patch {patch}"
        self.in_channels, self.patch, self.num_classes = in_channels, patch, num_classes
        self.grid = input_size // patch
        self.grad_ckpt = grad_ckpt
        self.x_embed = nn.Conv2d(in_channels, dim, patch, stride=patch)
        self.pos_embed = nn.Parameter(sincos_2d(dim, self.grid)[None], requires_grad=False)  # frozen, counted
        self.t_embed = nn.Sequential(nn.Linear(256, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.y_embed = nn.Embedding(num_classes + 1, dim)  # last row = null class for CFG
        cos, sin = rope_2d(dim // heads, self.grid)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.blocks = nn.ModuleList([DiTBlock(dim, heads, qk_norm) for _ in range(depth)])
        self.final_norm = RMSNorm(dim)
        self.final_adaLN = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.final_linear = nn.Linear(dim, patch * patch * in_channels)
        self.init_weights()

    def init_weights(self):
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.x_embed.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embed.bias)
        nn.init.normal_(self.y_embed.weight, std=0.02)
        nn.init.normal_(self.t_embed[0].weight, std=0.02)
        nn.init.normal_(self.t_embed[2].weight, std=0.02)
        for block in self.blocks:  # adaLN-Zero: every block starts as the identity
            nn.init.zeros_(block.adaLN[-1].weight)
            nn.init.zeros_(block.adaLN[-1].bias)
        for layer in (self.final_adaLN[-1], self.final_linear):  # so the untrained model outputs exactly 0
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x, t, y):
        """x: (B, C, H, W) latents, t: (B,) flow time in [0, 1] (1 = data), y: (B,) labels (num_classes = null)."""
        B, C, H, W = x.shape
        h = self.x_embed(x).flatten(2).transpose(1, 2) + self.pos_embed  # (B, N, D), N = (H/p)*(W/p)
        c = self.t_embed(timestep_embedding(t).to(x.dtype)) + self.y_embed(y)  # (B, D)
        rope = (self.rope_cos, self.rope_sin)  # (N, D/heads) each
        for block in self.blocks:
            if self.grad_ckpt and self.training:
                h = activation_checkpoint(block, h, c, rope, use_reentrant=False)  # (B, N, D)
            else:
                h = block(h, c, rope)  # (B, N, D)
        shift, scale = self.final_adaLN(c).unsqueeze(1).chunk(2, dim=-1)  # (B, 1, D) each
        h = self.final_linear(self.final_norm(h) * (1 + scale) + shift)  # (B, N, p*p*C)
        p, g = self.patch, self.grid
        h = h.view(B, g, g, p, p, C).permute(0, 5, 1, 3, 2, 4)  # (B, C, g, p, g, p)
        return h.reshape(B, C, g * p, g * p)  # (B, C, H, W)


# -----------------------------------------------------------------------------
# 2. PAE tokenizer: frozen VFM, DAM, spherical latent, ViT decoder

LATENT_CHANNELS = 32  # every latent token lies on the sphere of radius sqrt(32)
VFM_PRESETS = {  # name: (timm model, input px); grid = input / patch = 16 for all four
    "dinov2": ("vit_large_patch14_reg4_dinov2.lvd142m", 224),
    "dinov3": ("vit_large_patch16_dinov3.lvd1689m", 256),
    "siglip2": ("vit_so400m_patch16_siglip_256.v2_webli", 256),
    "mae": ("vit_large_patch16_224.mae", 256),
    "tiny": (None, 32),  # random DINOv2-style ViT (registers, layer scale, sin-cos positions), 2 layers, width 64
}
DECODER_PRESETS = {  # name: (width, depth, heads, mlp), as released
    "tiny": (64, 2, 4, 256), "B": (768, 12, 12, 3072), "L": (1024, 24, 16, 4096), "XL": (1152, 28, 16, 4096)}


def sphere(z, dim=1):
    """Per-token RMS normalisation without affine (eps 1e-6): each token gets norm sqrt(channels). fp32."""
    z = z.float()
    return z * torch.rsqrt(z.pow(2).mean(dim, keepdim=True) + 1e-6)


def mcr_rotate(latent, thetas_deg):
    """[z_theta for each theta]: every token rotated by exactly theta towards one random direction d shared by
    all thetas (the paper's cascaded MCR); d is orthogonal to the token, has its norm, and is drawn without gradient."""
    z = latent.detach()
    d = torch.randn_like(z)
    d = d - (d * z).sum(1, keepdim=True) / z.pow(2).sum(1, keepdim=True) * z  # remove the component along z
    d = d * z.norm(dim=1, keepdim=True) / d.norm(dim=1, keepdim=True)
    return [math.cos(math.radians(t)) * latent + math.sin(math.radians(t)) * d for t in thetas_deg]


class Attention(nn.Module):
    """Multi-head attention: self-attention, or cross-attention to `context` when given. Separate q, k, v
    projections (with or without bias) so the released fused and unfused layouts both map onto it."""

    def __init__(self, dim, heads, qkv_bias=True):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v = (nn.Linear(dim, dim, bias=qkv_bias) for _ in range(3))
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, context=None):
        context = x if context is None else context
        B, N, D = x.shape
        q = self.q(x).view(B, N, self.heads, -1).transpose(1, 2)  # (B, h, N, hd)
        k = self.k(context).view(B, context.shape[1], self.heads, -1).transpose(1, 2)
        v = self.v(context).view(B, context.shape[1], self.heads, -1).transpose(1, 2)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, D))


def mlp(dim, hidden):
    return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))


class ViTBlock(nn.Module):
    """Pre-norm ViT block (decoder, Q_t, P_t)."""

    def __init__(self, dim, heads, hidden, eps=1e-6):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim, eps=eps), Attention(dim, heads)
        self.norm2, self.mlp = nn.LayerNorm(dim, eps=eps), mlp(dim, hidden)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def init_vit(module):
    """MAE-style init of the prior-refinement nets: xavier-uniform linears (and convs, flattened), zero biases."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.xavier_uniform_(m.weight.view(m.weight.shape[0], -1))
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class VFM(nn.Module):
    """Frozen vision foundation model: images01 -> last-layer patch tokens (B, N, W), no autograd. net: a timm ViT
    (build_vfm), whose final LayerNorm loses its affine, as released."""

    def __init__(self, net, input_size, mean, std):
        super().__init__()
        self.input_size = input_size
        self.width, self.heads, self.patch = net.embed_dim, net.blocks[0].attn.num_heads, net.patch_embed.patch_size[0]
        self.grid = self.input_size // self.patch
        net.norm = nn.LayerNorm(self.width, eps=net.norm.eps, elementwise_affine=False)  # as released: no affine
        self.net, self.trainable = net.requires_grad_(False).eval(), False
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def trainable_(self, trainable=True):
        """Fine-tuned (the train_vfm ablation): gradients, and its weights in the PAE's checkpoint."""
        self.trainable = trainable
        self.net.requires_grad_(trainable)
        return self

    def train(self, mode=True):  # always in eval mode, whatever the parent does (the ViTs have no dropout)
        return super().train(False)

    def state_dict(self, *args, destination=None, prefix="", keep_vars=False):
        """Frozen weights come from their pretrained source (or a fixed seed), never from a PAE checkpoint."""
        if self.trainable:
            return super().state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)
        return {} if destination is None else destination

    def preprocess(self, images01):
        """Bicubic resize to the VFM input size, then the VFM's own mean/std normalisation."""
        if images01.shape[-1] != self.input_size or images01.shape[-2] != self.input_size:
            images01 = F.interpolate(images01, size=self.input_size, mode="bicubic", align_corners=False)  # as released
        return (images01 - self.mean) / self.std

    def forward(self, images01):
        with torch.set_grad_enabled(self.trainable and torch.is_grad_enabled()):
            tokens = self.net.forward_features(self.preprocess(images01))
        return tokens[:, self.net.num_prefix_tokens:].float()  # (B, N, W), class and register tokens dropped


class DAMBlock(nn.Module):
    """Pre-norm: self-attention over pixel tokens, cross-attention to the VFM tokens, MLP. PyTorch's LayerNorm
    defaults (eps 1e-5), as released."""

    def __init__(self, dim, heads):
        super().__init__()
        self.norm1, self.self_attn = nn.LayerNorm(dim), Attention(dim, heads)
        self.norm2, self.cross_attn = nn.LayerNorm(dim), Attention(dim, heads)
        self.norm_vfm = nn.LayerNorm(dim)  # keys/values = LayerNorm of the VFM tokens
        self.norm3, self.mlp = nn.LayerNorm(dim), mlp(dim, 4 * dim)

    def forward(self, x, vfm_tokens):
        x = x + self.self_attn(self.norm1(x))
        x = x + self.cross_attn(self.norm2(x), self.norm_vfm(vfm_tokens))
        return x + self.mlp(self.norm3(x))


class DAM(nn.Module):
    """Detail-Aware Modulator: pixel tokens attend to the VFM tokens, then a fusion head (the release's fusion_mode)
    on the block output x, with no norm before it: sft LayerNorm(H_vfm * (1 + gamma) + beta), [gamma, beta] =
    Linear(x) (the paper's); add LayerNorm(H_vfm + Linear(x)); concat LayerNorm(Linear([H_vfm, x])). The LayerNorm is
    affine; the sft and add heads start at zero, so H_z = LayerNorm(H_vfm) at init. Otherwise PyTorch's default
    initialisation, as released."""

    def __init__(self, width, heads, patch, grid, depth=6, fusion="sft"):
        super().__init__()
        self.fusion = fusion
        self.patch_embed = nn.Conv2d(3, width, patch, stride=patch)
        self.pos_embed = nn.Parameter(sincos_2d(width, grid)[None], requires_grad=False)
        self.blocks = nn.ModuleList([DAMBlock(width, heads) for _ in range(depth)])
        head = nn.Linear((1 + (fusion == "concat")) * width, (1 + (fusion == "sft")) * width)
        setattr(self, "sft" if fusion == "sft" else "fuse", head)  # the names the release's modes map onto
        self.norm = nn.LayerNorm(width)
        if fusion != "concat":
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)

    def forward(self, pixels, vfm_tokens):
        x = self.patch_embed(pixels).flatten(2).transpose(1, 2) + self.pos_embed  # (B, N, W)
        for block in self.blocks:
            x = block(x, vfm_tokens)  # (B, N, W)
        if self.fusion == "sft":
            gamma, beta = self.sft(x).chunk(2, dim=-1)  # (B, N, W) each
            return self.norm(vfm_tokens * (1 + gamma) + beta)  # H_z (B, N, W)
        fused = self.fuse(x) + vfm_tokens if self.fusion == "add" else self.fuse(torch.cat([vfm_tokens, x], dim=-1))
        return self.norm(fused)  # H_z (B, N, W)


class Projector(nn.Module):
    """H_z (B, N, W) -> attention (no qkv bias, no residual) -> 3x3 conv W -> 32 -> sphere: latent (B, 32, g, g).
    kl: the conv gives 2 x 32 channels, the mean and log-variance of a diagonal Gaussian (log-variance clamped to
    [-30, 20], KL to N(0, I) summed per image, as the release's DiagonalGaussianDistribution); the latent is the sphere
    of a sample (training) or of the mean [our reading: sampled before the sphere]."""

    def __init__(self, width, heads, grid, kl=False):
        super().__init__()
        self.grid, self.kl, self.attn = grid, kl, Attention(width, heads, qkv_bias=False)
        self.conv = nn.Conv2d(width, LATENT_CHANNELS * (1 + kl), 3, padding=1)

    def forward(self, h_z, sample=False):
        """-> (latent (B, 32, g, g), KL (B,) or None)."""
        x = self.attn(h_z).transpose(1, 2).unflatten(2, (self.grid, self.grid))  # (B, W, g, g)
        if not self.kl:
            return sphere(self.conv(x)), None
        mean, logvar = self.conv(x).float().chunk(2, dim=1)  # (B, 32, g, g) each
        logvar = logvar.clamp(-30.0, 20.0)
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).sum((1, 2, 3))  # (B,)
        return sphere(mean + (0.5 * logvar).exp() * torch.randn_like(mean) if sample else mean), kl


class Deprojector(nn.Module):
    """latent (B, 32, g, g) -> 3x3 conv 32 -> W -> attention (no qkv bias, no residual) -> decoder tokens (B, N, W)."""

    def __init__(self, width, heads):
        super().__init__()
        self.conv, self.attn = nn.Conv2d(LATENT_CHANNELS, width, 3, padding=1), Attention(width, heads, qkv_bias=False)

    def forward(self, latent):
        return self.attn(self.conv(latent).flatten(2).transpose(1, 2))


class ViTDecoder(nn.Module):
    """RAE/MAE-style pixel decoder: tokens (B, N, in_dim) -> VFM-normalised pixels (B, 3, g*p, g*p).
    As released: class token starts at zero, LayerNorm eps 1e-12, PyTorch's default initialisation."""

    def __init__(self, in_dim, dim, depth, heads, hidden, grid, patch):
        super().__init__()
        self.grid, self.patch = grid, patch
        self.embed = nn.Linear(in_dim, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        pos = torch.cat([torch.zeros(1, dim), sincos_2d(dim, grid)])  # the class token gets position 0
        self.pos_embed = nn.Parameter(pos[None], requires_grad=False)
        self.blocks = nn.ModuleList([ViTBlock(dim, heads, hidden, eps=1e-12) for _ in range(depth)])  # ViT-MAE eps
        self.norm = nn.LayerNorm(dim, eps=1e-12)
        self.head = nn.Linear(dim, patch * patch * 3)

    def forward(self, tokens):
        x = self.embed(tokens)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        x = self.head(self.norm(x))[:, 1:]  # (B, N, p*p*3), class token dropped
        B, g, p = x.shape[0], self.grid, self.patch
        return x.view(B, g, g, p, p, 3).permute(0, 5, 1, 3, 2, 4).reshape(B, 3, g * p, g * p)


class PAE(nn.Module):
    """Prior-Aligned AutoEncoder: frozen VFM + DAM -> spherical latent (B, 32, 16, 16) -> ViT decoder -> image.
    Ablations: fusion (the DAM's head), train_vfm (no DAM: the fine-tuned VFM's tokens go to the projector, as in the
    release without its DAM), kl (a diagonal-Gaussian posterior on the latent)."""

    def __init__(self, vfm, dec_dim, dec_depth, dec_heads, dec_hidden, image_size=None, dam_depth=6, fusion="sft",
                 train_vfm=False, kl=False):
        super().__init__()
        W, heads, g = vfm.width, vfm.heads, vfm.grid  # DAM, projector and deprojector: the VFM's width and heads
        self.image_size = image_size or 16 * g  # 256 px for the paper's 16x16 grid
        self.vfm = vfm.trainable_(train_vfm)
        self.dam = None if train_vfm else DAM(W, heads, vfm.patch, g, dam_depth, fusion)
        self.projector = Projector(W, heads, g, kl)
        self.deprojector = Deprojector(W, heads)
        self.decoder = ViTDecoder(W, dec_dim, dec_depth, dec_heads, dec_hidden, g, self.image_size // g)

    def trainable_parameters(self):
        return [p for p in self.parameters() if p.requires_grad]  # not a frozen VFM, not the fixed sin-cos tables

    def encode(self, images01, vfm_tokens=None, sample=False):
        """images01 (B, 3, H, W) in [0, 1] -> latent (B, 32, g, g); pass vfm_tokens if already computed."""
        return self.posterior(images01, vfm_tokens, sample)[0]

    def posterior(self, images01, vfm_tokens=None, sample=False):
        """(latent (B, 32, g, g), KL (B,) or None): encode, with the KL of the kl ablation."""
        vfm_tokens = self.vfm(images01) if vfm_tokens is None else vfm_tokens  # (B, N, W), N = g*g
        h_z = vfm_tokens if self.dam is None else self.dam(self.vfm.preprocess(images01), vfm_tokens)  # (B, N, W)
        return self.projector(h_z, sample)  # (B, 32, g, g), every token on the sqrt(32) sphere; (B,)

    def decode(self, latent):
        """latent (B, 32, g, g) -> images (B, 3, image_size, image_size) in [0, 1] (not clamped)."""
        tokens = self.deprojector(latent)  # (B, N, W)
        return self.decoder(tokens) * self.vfm.std + self.vfm.mean  # (B, 3, S, S), S = image_size

    def forward(self, images01, thetas_deg=()):
        """One training pass (one DDP call): the clean decoding and, for MCR, the decodings of the latent rotated
        by each theta along one shared direction, all in one decoder batch."""
        vfm_tokens = self.vfm(images01)  # (B, N, W)
        latent, kl = self.posterior(images01, vfm_tokens, sample=True)  # (B, 32, g, g), (B,) or None
        latents = torch.cat([latent, *mcr_rotate(latent, thetas_deg)])  # (B * (1 + len(thetas)), 32, g, g)
        decoded = self.decode(latents).chunk(1 + len(thetas_deg))  # 1 + len(thetas) x (B, 3, S, S)
        return {"vfm_tokens": vfm_tokens, "latent": latent, "recon": decoded[0], "rotated": list(decoded[1:]), "kl": kl}

    def load_state_dict(self, state_dict, strict=True, assign=False):
        """Checkpoints hold no frozen VFM's weights (see VFM.state_dict), so those keys are not missing."""
        missing, unexpected = super().load_state_dict(state_dict, strict=False, assign=assign)
        missing = [k for k in missing if not k.startswith("vfm.")]
        if strict and (missing or unexpected):
            raise RuntimeError(f"PAE weights do not match: missing {missing[:5]}, unexpected {unexpected[:5]}")
        return missing, unexpected


# -----------------------------------------------------------------------------
# 3. VFM prior refinement: targets Z_T = P_t(H_vfm), H_hat = Q_t(Z_T) (the structural target H_ref is a loss
# target: losses.py)


class PriorRefiner(nn.Module):
    """P_t: RMS-normalised VFM tokens -> one ViT block -> linear W -> 32 -> sphere  [our reading].
    Q_t: linear 32 -> W -> `depth` ViT blocks -> LayerNorm -> linear W -> W."""

    def __init__(self, vfm_width, depth=4):
        super().__init__()
        W, heads = vfm_width, max(1, vfm_width // 64)
        self.target_block, self.target_out = ViTBlock(W, heads, 4 * W), nn.Linear(W, LATENT_CHANNELS)
        self.recon_in = nn.Linear(LATENT_CHANNELS, W)
        self.recon_blocks = nn.ModuleList([ViTBlock(W, heads, 4 * W) for _ in range(depth)])
        self.recon_norm, self.recon_out = nn.LayerNorm(W, eps=1e-6), nn.Linear(W, W)
        init_vit(self)
        self.refiner_args = dict(vfm_width=vfm_width, depth=depth)

    def target(self, vfm_tokens):  # (B, N, W) -> Z_T (B, N, 32), norm sqrt(32) per token
        return sphere(self.target_out(self.target_block(sphere(vfm_tokens, dim=-1))), dim=-1)

    def forward(self, vfm_tokens):  # (B, N, W) -> Z_T (B, N, 32), H_hat (B, N, W)
        z_t = self.target(vfm_tokens)
        return z_t, self.reconstruct(z_t)

    def reconstruct(self, z_t):  # (B, N, 32) -> H_hat (B, N, W)
        x = self.recon_in(z_t)
        for block in self.recon_blocks:
            x = block(x)
        return self.recon_out(self.recon_norm(x))


# -----------------------------------------------------------------------------
# 4. PatchGAN discriminator


class PatchDiscriminator(nn.Module):
    """PatchGAN (pix2pix) of `layers` strided layers: images in [-1, 1] (B, 3, H, W) -> logits (B, 1, h, w). norm:
    group (our reading: results do not depend on the per-GPU batch) or batch (pix2pix and taming's)."""

    def __init__(self, channels=64, layers=3, norm="group"):
        super().__init__()
        mods, c = [nn.Conv2d(3, channels, 4, 2, 1), nn.LeakyReLU(0.2)], channels
        for i in range(1, layers + 1):
            c_out = channels * min(2 ** i, 8)
            mods += [nn.Conv2d(c, c_out, 4, 2 if i < layers else 1, 1, bias=False),
                     nn.GroupNorm(min(32, c_out // 4), c_out) if norm == "group" else nn.BatchNorm2d(c_out),
                     nn.LeakyReLU(0.2)]
            c = c_out
        self.net = nn.Sequential(*mods, nn.Conv2d(c, 1, 4, 1, 1))

    def forward(self, images):
        return self.net(images)


# -----------------------------------------------------------------------------
# 5. loaders: each network from its preset, or from a checkpoint of its kind: ours, or the authors' released file,
# recognised and converted in memory right under its loader. Released PAE file: {"model": state_dict} (DAM =
# delta_encoder, projector = latent_compressor, deprojector = latent_decompressor, decoder = a ViT-MAE decoder; the
# VFM as encoder.* in Hugging Face's DINOv2 key names, when present). Released DiT file: {"model", "ema", "opt",
# "config"} of LightningDiT; the latent mean/std live in a separate latents_stats.pt. A conversion rule maps a
# released key to ours; a target containing "{q,k,v}" splits a fused tensor into three equal parts, and targets
# ending in "#q", "#k", "#v" are concatenated back into one fused tensor.

_BLOCK = r"(\d+)\."


def _strip_wrappers(state):
    """Drop the `module.` (DDP) and `_orig_mod.` (torch.compile) key prefixes, as the release's loaders do."""
    out = {}
    for key, value in state.items():
        while key.startswith(("module.", "_orig_mod.")):
            key = key.split(".", 1)[1]
        out[key] = value
    return out


def _convert(state, rules, path, what):
    """Released state dict -> ours by the first matching rule per key, every tensor used exactly once.
    -> (converted, {our key: the released key it came from})."""
    out, origin = {}, {}
    for key, value in state.items():
        target = next((re.sub(p, r, key) for p, r in rules if re.fullmatch(p, key)), None)
        if target is None:
            fail(f"{path}: the released {what} holds a tensor {key!r} that no part of this model takes; it is "
                 f"not the released architecture")
        names = [target.replace("{q,k,v}", n) for n in "qkv"] if "{q,k,v}" in target else [target]
        if len(names) > 1 and value.shape[0] % 3:
            fail(f"{path}: the released {what} tensor {key!r} {tuple(value.shape)} is not a fused q/k/v projection")
        for name, part in zip(names, value.chunk(len(names))):
            if name in out:
                fail(f"{path}: the released {what} tensors {origin[name]!r} and {key!r} fill the same weight")
            out[name], origin[name] = part, key
    for name in [n for n in out if n.endswith("#q")]:
        parts = [name[:-1] + n for n in "qkv"]
        if any(p not in out for p in parts):
            fail(f"{path}: the released {what} lacks the key or value projection that goes with {origin[name]!r}")
        out[name[:-2]], origin[name[:-2]] = torch.cat([out.pop(p) for p in parts]), origin[name]
    return out, origin


def _check_converted(converted, origin, expected, path, what):
    """Strict: exactly our keys, with our shapes; else one sentence naming the first offending keys."""
    missing = [k for k in expected if k not in converted]
    extra = [origin[k] for k in converted if k not in expected]
    wrong = [f"{origin[k]} {tuple(v.shape)} (needs {tuple(expected[k].shape)})" for k, v in converted.items()
             if k in expected and v.shape != expected[k].shape]
    problems = [f"{kind} {', '.join(items[:3])}" for kind, items in (("no tensor for our", missing), (
        "unused tensors", extra), ("wrong shapes", wrong)) if items]
    if problems:
        fail(f"{path} does not convert into the released {what} architecture: {'; '.join(problems)}")


def _release_format(ckpt, path, kind):
    """'pae' or 'dit' for a dict in one of the authors' released file formats, else None; the other kind's released
    file is one sentence."""
    if not isinstance(ckpt, dict) or "kind" in ckpt or not isinstance(ckpt.get("model"), dict):
        return None
    keys = _strip_wrappers(ckpt["model"])
    released = "pae" if any(k.startswith("latent_compressor.") for k in keys) else \
        "dit" if any(k.startswith("x_embedder.") for k in keys) else None
    if released not in (None, kind):
        fail(f"{path} is the authors' released {released.upper()} file, but a {kind!r} checkpoint is needed here")
    return released


DIT_PRESETS = {  # name: (hidden, depth, heads), LightningDiT's
    "tiny": (64, 2, 4), "S": (384, 12, 6), "B": (768, 12, 12), "L": (1024, 24, 16), "XL": (1152, 28, 16)}


def dit_preset(preset):
    """'XL/1', 'B/2', ... (size/patch) -> (hidden, depth, heads, patch), or one sentence listing the valid names."""
    size, _, patch = preset.partition("/")
    if size not in DIT_PRESETS or patch not in ("1", "2"):
        fail(f"unknown DiT model {preset!r}; use SIZE/PATCH with SIZE in {', '.join(DIT_PRESETS)} and PATCH 1 or 2 "
             f"(e.g. XL/1)")
    return (*DIT_PRESETS[size], int(patch))


def build_dit(preset, in_channels=32, input_size=16, **overrides):
    """preset: 'XL/1', 'B/2', ... (size/patch) -> LightningDiT. overrides: num_classes, qk_norm, grad_ckpt."""
    dim, depth, heads, patch = dit_preset(preset)
    return LightningDiT(in_channels, input_size, patch, dim, depth, heads, **overrides)


def dit_from_checkpoint(path, device="cpu", use_ema=True):
    """(LightningDiT in eval mode without gradients, its checkpoint) from a 'dit' checkpoint (ours, or the authors'
    released file): the network rebuilt from its model_args, with the EMA weights (use_ema) or the raw ones."""
    ckpt = load_checkpoint(path, "dit", _convert_released_dit)
    if "model_args" not in ckpt:
        fail(f"{path} has no model_args; it was not written by train_dit.py")
    weights = ckpt["ema"] if use_ema else ckpt["model"]
    if weights is None:
        fail(f"{path} holds no {'EMA' if use_ema else 'raw'} weights; pass --use_ema {str(not use_ema).lower()}")
    model = build_dit(**ckpt["model_args"])
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        fail(f"{path} does not match its model_args {ckpt['model_args']} ({str(e).splitlines()[0]})")
    return model.to(device).eval().requires_grad_(False), ckpt


RELEASED_DIT_RULES = [
    (r"x_embedder\.proj\.(.+)", r"x_embed.\1"), (r"pos_embed", "pos_embed"),
    (r"t_embedder\.mlp\.([02])\.(.+)", r"t_embed.\1.\2"), (r"y_embedder\.embedding_table\.weight", "y_embed.weight"),
    (r"blocks\." + _BLOCK + r"(norm1|norm2)\.weight", r"blocks.\1.\2.weight"),
    (r"blocks\." + _BLOCK + r"attn\.(qkv|proj|q_norm|k_norm)\.(.+)", r"blocks.\1.attn.\2.\3"),
    (r"blocks\." + _BLOCK + r"mlp\.(w12|w3)\.(.+)", r"blocks.\1.ffn.\2.\3"),
    (r"blocks\." + _BLOCK + r"adaLN_modulation\.1\.(.+)", r"blocks.\1.adaLN.1.\2"),
    (r"final_layer\.norm_final\.weight", "final_norm.weight"), (r"final_layer\.linear\.(.+)", r"final_linear.\1"),
    (r"final_layer\.adaLN_modulation\.1\.(.+)", r"final_adaLN.1.\1"),
    (r"feat_rope\.freqs_(cos|sin)", r"rope_\1"),  # fixed tables, checked against ours and not loaded
]


def _convert_released_dit(ckpt, path):
    """The authors' LightningDiT {"model", "ema", "opt", "config"} -> our 'dit' checkpoint (model and EMA); None
    for a file in no released format."""
    if _release_format(ckpt, path, "dit") is None:
        return None
    state = _strip_wrappers(ckpt["model"])
    config = ckpt.get("config") if isinstance(ckpt.get("config"), dict) else {}
    model_cfg = config.get("model", {})
    if any(model_cfg.get(k, v) != v for k, v in dict(use_swiglu=True, use_rope=True, use_rmsnorm=True,
                                                   wo_shift=False, learn_sigma=False).items()):
        fail(f"{path} is a LightningDiT with {model_cfg}; only the released PAE configuration (SwiGLU, RoPE, "
             f"RMSNorm, adaLN with shift) is implemented here")
    if "x_embedder.proj.weight" not in state or "feat_rope.freqs_cos" not in state:
        fail(f"{path} looks like a released LightningDiT file but lacks its patch embedding or RoPE tables")
    hidden, in_channels, patch = state["x_embedder.proj.weight"].shape[:3]
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    tokens, head_dim = state["feat_rope.freqs_cos"].shape
    size = next((n for n, p in DIT_PRESETS.items() if p == (hidden, depth, hidden // head_dim)), None)
    if size is None:
        fail(f"{path}: a LightningDiT of width {hidden}, depth {depth}, {hidden // head_dim} heads matches no "
             f"preset ({', '.join(DIT_PRESETS)})")
    model_args = dict(preset=f"{size}/{patch}", in_channels=in_channels, input_size=math.isqrt(tokens) * patch,
                      num_classes=state["y_embedder.embedding_table.weight"].shape[0] - 1,
                      qk_norm="blocks.0.attn.q_norm.weight" in state)
    with torch.device("meta"):
        expected = build_dit(**model_args).state_dict()
    rope = rope_2d(head_dim, math.isqrt(tokens))
    weights = {}
    for which in ("model", "ema"):
        if ckpt.get(which) is None:
            weights[which] = None
            continue
        converted, origin = _convert(_strip_wrappers(ckpt[which]), RELEASED_DIT_RULES, path, f"LightningDiT {which}")
        for table, ours in zip((converted.pop("rope_cos", None), converted.pop("rope_sin", None)), rope):
            if table is None or table.shape != ours.shape or not torch.allclose(table.float(), ours, atol=1e-5):
                fail(f"{path}: the released RoPE tables do not match a {model_args['input_size']}x"
                     f"{model_args['input_size']} latent with head dim {head_dim}")
        _check_converted(converted, origin, expected, path, f"LightningDiT {which}")
        weights[which] = converted
    # the release's own default is 0.18215 when its data config lacks the key (both released configs set 1.0)
    multiplier = float(config["data"].get("latent_multiplier", 0.18215)) if "data" in config else 1.0
    print0(f"{path}: the authors' released LightningDiT-{model_args['preset']} converted in memory"
           f"{'' if model_args['qk_norm'] is False else ' (QK norm)'}; its latent statistics come from the "
           f"release's latents_stats.pt (sample.py --latent_stats)")
    return {"kind": "dit", **weights, "opt": None, "step": 0, "config": {}, "version": CKPT_VERSION,
            "model_args": model_args, "latent_multiplier": multiplier, "released": True}


def build_vfm(name, pretrained=True, weights=None):
    """The VFM preset `name` with its pretrained weights (timm / Hugging Face cache, or the local file `weights`);
    pretrained=False leaves it random (e.g. on meta); "tiny" is a fixed random DINOv2-style ViT for CPU runs."""
    import timm  # slow to import, and only the PAE needs it
    if name not in VFM_PRESETS:
        fail(f"unknown VFM {name!r}; valid names: {', '.join(VFM_PRESETS)}")
    timm_name, input_size = VFM_PRESETS[name]
    if name == "tiny":
        with torch.random.fork_rng(devices=[]):  # fixed seed: the same random VFM in every process and run
            torch.manual_seed(0)
            net = timm.models.vision_transformer.VisionTransformer(  # the layout of timm's *_reg4_dinov2
                img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=4, num_classes=0, reg_tokens=4,
                no_embed_class=True, init_values=1.0)
            net.pos_embed.data.copy_(sincos_2d(64, 8)[None])  # fixed: its tokens carry position, as trained ones do
        notice("VFM: tiny random DINOv2-style ViT (2 layers, width 64), no pretrained weights: CPU runs only")
        return VFM(net, input_size, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    weights = weights if pretrained else None  # e.g. decode-only on another machine: no file needed
    if weights and not os.path.isfile(weights):
        fail(f"VFM weights file {weights} does not exist; pass the path of a {timm_name} weight file")
    try:  # timm's own loading: Hugging Face cache, or the local file (resampling the position embedding)
        net = timm.create_model(timm_name, pretrained=pretrained, img_size=input_size, num_classes=0,
                                pretrained_cfg_overlay=dict(file=weights) if weights else None)
    except Exception as e:
        fail(f"could not load the pretrained weights of {timm_name} ({type(e).__name__}); fetch them once "
             f"into the Hugging Face cache on a machine with network access (python -c \"import timm; "
             f"timm.create_model('{timm_name}', pretrained=True)\") or pass a local file with --vfm_weights")
    return VFM(net, input_size, net.pretrained_cfg["mean"], net.pretrained_cfg["std"])


def build_pae(vfm="dinov2", decoder="L", pretrained=True, preset=None, vfm_weights=None, **overrides):
    """PAE from presets. preset='tiny': tiny VFM, DAM and decoder for CPU. overrides: image_size (px,
    default 16 per token; tiny 32), dam_depth. pretrained=False skips loading VFM weights (e.g. on meta)."""
    if preset == "tiny":
        vfm, decoder, overrides = "tiny", "tiny", {"image_size": 32, "dam_depth": 2, **overrides}
    elif preset is not None:
        fail(f"unknown PAE preset {preset!r}; valid presets: tiny (or none for the paper configuration)")
    if decoder not in DECODER_PRESETS:
        fail(f"unknown decoder {decoder!r}; valid names: {', '.join(DECODER_PRESETS)}")
    vfm_net = build_vfm(vfm, pretrained, vfm_weights)
    if overrides.get("image_size", vfm_net.grid) % vfm_net.grid:
        fail(f"image_size {overrides['image_size']} must be a multiple of the VFM token grid {vfm_net.grid}")
    pae = PAE(vfm_net, *DECODER_PRESETS[decoder], **overrides)
    pae.pae_args = dict(vfm=vfm, decoder=decoder, vfm_weights=vfm_weights, **overrides)
    return pae


def pae_from_checkpoint(path, device="cpu", decode_only=False):
    """PAE in eval mode from a 'pae' checkpoint (ours, or the authors' released file): pae_args, raw (non-EMA)
    weights as the release encodes with; VFM weights from the file if it has them, else from their pretrained source
    (decode_only: none, as decoding never uses them; such a PAE must not encode)."""
    ckpt = load_checkpoint(path, "pae", _convert_released_pae)
    if "pae_args" not in ckpt:
        fail(f"checkpoint {path} has no 'pae_args' entry; it was not written by train_ae.py --stage ae")
    vfm_state = None if decode_only else ckpt.get("vfm")
    pae = build_pae(**ckpt["pae_args"], pretrained=not (decode_only or vfm_state or ckpt["pae_args"].get("train_vfm")))
    try:
        pae.load_state_dict(ckpt["model"])
        if vfm_state is not None:
            pae.vfm.net.load_state_dict(vfm_state)
    except RuntimeError as e:
        fail(f"checkpoint {path} does not match its recorded architecture {ckpt['pae_args']} ({e})")
    return pae.to(device).eval()


_DAM_LAYER = {"self_attn.qkv": "self_attn.{q,k,v}", "self_attn.proj": "self_attn.proj", "cross_attn.q_proj":
              "cross_attn.q", "cross_attn.k_proj": "cross_attn.k", "cross_attn.v_proj": "cross_attn.v",
              "cross_attn.proj": "cross_attn.proj", "norm1": "norm1", "norm2_q": "norm2", "norm2_kv": "norm_vfm",
              "norm3": "norm3", "mlp.fc1": "mlp.0", "mlp.fc2": "mlp.2"}  # the release's DeltaEncoder layer -> DAMBlock
_DECODER_LAYER = {"layernorm_before": "norm1", "attention.attention.query": "attn.q", "attention.attention.key":
                  "attn.k", "attention.attention.value": "attn.v", "attention.output.dense": "attn.proj",
                  "layernorm_after": "norm2", "intermediate.dense": "mlp.0", "output.dense": "mlp.2"}  # ViT-MAE's
RELEASED_PAE_RULES = [
    (r"delta_encoder\.patch_embed\.proj\.(.+)", r"dam.patch_embed.\1"), (r"delta_encoder\.pos_embed", "dam.pos_embed"),
    *[(r"delta_encoder\.layers\." + _BLOCK + re.escape(k) + r"\.(.+)", rf"dam.blocks.\1.{v}.\2")
      for k, v in _DAM_LAYER.items()],
    (r"delta_encoder\.fusion_proj\.(.+)", r"dam.sft.\1"), (r"delta_encoder\.final_ln\.(.+)", r"dam.norm.\1"),
    (r"latent_compressor\.0\.qkv\.(.+)", r"projector.attn.{q,k,v}.\1"),
    (r"latent_compressor\.0\.proj\.(.+)", r"projector.attn.proj.\1"),
    (r"latent_compressor\.1\.(.+)", r"projector.conv.\1"), (r"latent_decompressor\.0\.(.+)", r"deprojector.conv.\1"),
    (r"latent_decompressor\.1\.qkv\.(.+)", r"deprojector.attn.{q,k,v}.\1"),
    (r"latent_decompressor\.1\.proj\.(.+)", r"deprojector.attn.proj.\1"),
    (r"decoder\.decoder_embed\.(.+)", r"decoder.embed.\1"), (r"decoder\.decoder_pos_embed", "decoder.pos_embed"),
    (r"decoder\.trainable_cls_token", "decoder.cls_token"),
    *[(r"decoder\.decoder_layers\." + _BLOCK + re.escape(k) + r"\.(.+)", rf"decoder.blocks.\1.{v}.\2")
      for k, v in _DECODER_LAYER.items()],
    (r"decoder\.decoder_norm\.(.+)", r"decoder.norm.\1"), (r"decoder\.decoder_pred\.(.+)", r"decoder.head.\1"),
]
RELEASED_DINOV2_RULES = [  # Hugging Face Dinov2WithRegistersModel (transformers 4 and 5 names) -> timm ViT
    (r"embeddings\.patch_embeddings\.projection\.(.+)", r"patch_embed.proj.\1"),
    (r"embeddings\.register_tokens", "reg_token"),
    (r"encoder\.layer\." + _BLOCK + r"(norm1|norm2)\.(.+)", r"blocks.\1.\2.\3"),
    (r"encoder\.layer\." + _BLOCK + r"attention\.(?:attention\.query|q_proj)\.(.+)", r"blocks.\1.attn.qkv.\2#q"),
    (r"encoder\.layer\." + _BLOCK + r"attention\.(?:attention\.key|k_proj)\.(.+)", r"blocks.\1.attn.qkv.\2#k"),
    (r"encoder\.layer\." + _BLOCK + r"attention\.(?:attention\.value|v_proj)\.(.+)", r"blocks.\1.attn.qkv.\2#v"),
    (r"encoder\.layer\." + _BLOCK + r"attention\.(?:output\.dense|o_proj)\.(.+)", r"blocks.\1.attn.proj.\2"),
    (r"encoder\.layer\." + _BLOCK + r"layer_scale([12])\.lambda1", r"blocks.\1.ls\2.gamma"),
    (r"encoder\.layer\." + _BLOCK + r"mlp\.(fc1|fc2)\.(.+)", r"blocks.\1.mlp.\2.\3"),
]


def convert_released_dinov2(state, vfm, path="the released file"):
    """Hugging Face Dinov2WithRegistersModel weights (transformers 4 or 5 names) -> the state dict of our timm VFM
    `vfm`, computing the same tokens: HF adds position row 0 to the class token and resamples the 37x37 patch rows
    to the grid at run time (bicubic, antialias, fp32); timm holds patch rows, resampled here once the same way."""
    state = {k: v for k, v in state.items() if k != "embeddings.mask_token"}
    table, cls = state.pop("embeddings.position_embeddings", None), state.pop("embeddings.cls_token", None)
    if table is None or cls is None:
        fail(f"{path}: the released DINOv2 weights lack the class token or the position table")
    out, origin = _convert(state, RELEASED_DINOV2_RULES, path, "DINOv2")
    g0, g = math.isqrt(table.shape[1] - 1), vfm.grid
    grid = table[:, 1:].reshape(1, g0, g0, -1).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(g, g), mode="bicubic", align_corners=False, antialias=True)
    out["pos_embed"] = grid.to(table.dtype).permute(0, 2, 3, 1).reshape(1, g * g, -1)
    out["cls_token"] = cls + table[:, :1]
    origin.update(pos_embed="embeddings.position_embeddings", cls_token="embeddings.cls_token")
    _check_converted(out, origin, vfm.net.state_dict(), path, "DINOv2")
    return out


def _convert_released_pae(ckpt, path):
    """The authors' PAE {"model": ...} -> our 'pae' checkpoint, or None for a file in no released format; DINOv2-L
    is the released (and only verified) VFM."""
    if _release_format(ckpt, path, "pae") is None:
        return None
    state = _strip_wrappers(ckpt["model"])
    vfm_keys = {k for k in state if k.startswith("encoder.")}
    prefix = "encoder.encoder." if any(k.startswith("encoder.encoder.embeddings.") for k in vfm_keys) else "encoder."
    vfm_state = {k[len(prefix):]: state[k] for k in vfm_keys}
    state = {k: v for k, v in state.items() if k not in vfm_keys}
    needed = ("delta_encoder.pos_embed", "delta_encoder.patch_embed.proj.weight", "decoder.decoder_embed.weight",
              "decoder.decoder_pred.weight", "latent_compressor.1.weight")
    if any(k not in state for k in needed):
        fail(f"{path} looks like a released PAE file but lacks {[k for k in needed if k not in state][:3]}; it "
             f"was not saved with the DAM (use_delta_encoder) or is incomplete")
    width, patch = state["delta_encoder.pos_embed"].shape[-1], state["delta_encoder.patch_embed.proj.weight"].shape[-1]
    vfm_name = {(1024, 14): "dinov2", (64, 4): "tiny"}.get((width, patch))  # tiny: the CPU test miniature
    if vfm_name is None:
        fail(f"{path} is a released PAE on a VFM of width {width} and patch {patch}; only the DINOv2-L release "
             f"(width 1024, patch 14) is verified to convert exactly")
    layers = lambda p: 1 + max(int(k[len(p):].split(".")[0]) for k in state if k.startswith(p))  # noqa: E731
    decoder = (state["decoder.decoder_embed.weight"].shape[0], layers("decoder.decoder_layers."),
               state["decoder.decoder_layers.0.intermediate.dense.weight"].shape[0])
    name = next((n for n, p in DECODER_PRESETS.items() if (p[0], p[1], p[3]) == decoder), None)
    if name is None:
        fail(f"{path}: the released decoder (width {decoder[0]}, {decoder[1]} layers, MLP {decoder[2]}) matches no "
             f"decoder preset ({', '.join(DECODER_PRESETS)})")
    grid = math.isqrt(state["delta_encoder.pos_embed"].shape[1])
    dec_patch = math.isqrt(state["decoder.decoder_pred.weight"].shape[0] // 3)
    head = tuple(state.get("delta_encoder.fusion_proj.weight", torch.empty(0)).shape)  # its shape tells the mode
    fusion = {(2 * width, width): "sft", (width, width): "add", (width, 2 * width): "concat"}.get(head)
    if fusion is None:
        fail(f"{path}: the released DAM's fusion head has shape {head}; only the modes sft, add and concat convert")
    pae_args = dict(vfm=vfm_name, decoder=name, vfm_weights=None, image_size=grid * dec_patch,
                    dam_depth=layers("delta_encoder.layers."), **({} if fusion == "sft" else {"fusion": fusion}))
    with torch.device("meta"):
        pae = build_pae(**pae_args, pretrained=False)
    converted, origin = _convert(state, RELEASED_PAE_RULES, path, "PAE")
    for key in [k for k in converted if k.startswith("dam.sft.") and fusion != "sft"]:  # add, concat: dam.fuse
        fuse = key.replace(".sft.", ".fuse.")
        converted[fuse], origin[fuse] = converted.pop(key), origin[key]
    _check_converted(converted, origin, pae.state_dict(), path, "PAE")
    vfm = convert_released_dinov2(vfm_state, pae.vfm, path) if vfm_state else None
    print0(f"{path}: the authors' released PAE (VFM {vfm_name}, decoder {name}, DAM fusion {fusion}"
           f"{', with its VFM weights' if vfm else ''}) converted in memory")
    return {"kind": "pae", "model": converted, "ema": None, "opt": None, "step": 0, "config": {},
            "version": CKPT_VERSION, "pae_args": pae_args, "vfm": vfm, "released": True}


def build_refiner(vfm_width, depth=4):
    """P_t and Q_t for VFM tokens of width vfm_width; Q_t has `depth` ViT blocks [our reading]."""
    return PriorRefiner(vfm_width, depth)


def refiner_from_checkpoint(path, device="cpu"):
    """P_t / Q_t in eval mode without gradients from a 'refine' checkpoint (P_t then supplies fixed targets)."""
    ckpt = load_checkpoint(path, "refine")
    refiner = build_refiner(**ckpt["refiner_args"])
    refiner.load_state_dict(ckpt["model"])
    return refiner.to(device).requires_grad_(False).eval(), ckpt


# -----------------------------------------------------------------------------
# 6. shared plumbing: config parsing, dist setup/teardown, print0, checkpoints, FLOPs

CKPT_VERSION = 2  # 2: the released PAE architecture (DAM fusion, attention biases, init)


# exit statuses a scheduler can act on: done 0; bad input 1 (one sentence; 2 for a malformed command line); stopped by
# the non-finite guard 3 (do not requeue: a restart fails again); stopped by SIGTERM / SIGUSR1 with a checkpoint
# written, or by the signal watchdog with the last checkpoint intact, 75 (requeue: --resume auto continues)
EXIT_NONFINITE, EXIT_REQUEUE = 3, 75


def fail(message):
    """A user-caused error: one sentence on stderr, exit status 1, no traceback."""
    raise SystemExit(f"error: {message}")


def stop(message, status, printed=False):
    """Exit with `status` (EXIT_NONFINITE, EXIT_REQUEUE): the sentence on stderr first (rank 0), as a SystemExit with
    a number prints nothing; str() of the exception is the sentence."""
    if not printed:
        print0(message, file=sys.stderr)
    error = SystemExit(message)
    error.code = status
    raise error


def _parse_bool(text):
    table = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
    if text.lower() not in table:
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return table[text.lower()]


@functools.lru_cache(maxsize=None)
def _field_comments(cls):
    """{field: the comment written beside it in the Config source}, the text of each flag's --help."""
    comments = {}
    for line in inspect.getsource(cls).splitlines():
        match = re.match(r"\s+(\w+): [^=]+=.*?  # (.*)$", line)
        if match:
            comments[match.group(1)] = match.group(2)
    return comments


def parse_config(cls, argv=None, presets=None):
    """Dataclass -> argparse (each flag's help: the comment beside its field), then validation, before any work.
    `--preset NAME` applies presets[NAME], explicit flags win. The Config may declare CHOICES {field: values},
    POSITIVE, NONNEGATIVE, UNIT ([0, 1]) and BARE {field: value of the bare flag}; floats must be finite."""
    comments = _field_comments(cls)
    choices = {**getattr(cls, "CHOICES", {}), **({"preset": tuple(presets)} if presets else {})}
    parser = argparse.ArgumentParser(description=sys.modules[cls.__module__].__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    for field in dataclasses.fields(cls):
        kind = field.type if isinstance(field.type, type) else eval(field.type)
        valid = f" [one of: {', '.join(repr(c) for c in choices[field.name])}]" if field.name in choices else ""
        text = f"{comments.get(field.name, '')}{valid} (default: {field.default!r})".replace("%", "%%")
        if kind is bool:
            parser.add_argument(f"--{field.name}", type=_parse_bool, nargs="?", const=True,
                                default=argparse.SUPPRESS, help=text, metavar="true|false")
        elif field.name in getattr(cls, "BARE", {}):  # e.g. a bare --resume means --resume true
            parser.add_argument(f"--{field.name}", type=str.lower, nargs="?", const=cls.BARE[field.name],
                                default=argparse.SUPPRESS, help=text)
        else:
            parser.add_argument(f"--{field.name}", type=kind, default=argparse.SUPPRESS, help=text)
    given = vars(parser.parse_args(argv))
    values = {}
    preset = given.get("preset", getattr(cls, "preset", None))
    if presets is not None and preset is not None:
        if preset not in presets:
            fail(f"unknown --preset {preset!r}; valid values: {', '.join(presets)}")
        values.update(presets[preset])
    values.update(given)
    cfg = cls(**values)
    for name, valid in choices.items():
        if getattr(cfg, name) not in valid:
            fail(f"unknown --{name} {getattr(cfg, name)!r}; valid values: {', '.join(map(repr, valid))}")
    for field in dataclasses.fields(cls):
        value = getattr(cfg, field.name)
        if isinstance(value, float) and not math.isfinite(value):
            fail(f"--{field.name} {value} is not a finite number")
        if field.name in getattr(cls, "POSITIVE", ()) and not value > 0:
            fail(f"--{field.name} must be greater than 0, got {value}")
        if field.name in getattr(cls, "NONNEGATIVE", ()) and not value >= 0:
            fail(f"--{field.name} must be 0 or more, got {value}")
        if field.name in getattr(cls, "UNIT", ()) and not 0 <= value <= 1:
            fail(f"--{field.name} must lie between 0 and 1, got {value}")
    return cfg


def save_config(cfg, out_dir, name="config.json"):
    """The resolved config as JSON, tagged with the program; a folder holding another program's run is refused."""
    path, program = os.path.join(out_dir, name), os.path.basename(sys.modules[type(cfg).__module__].__file__)
    if os.path.isfile(path):
        try:
            with open(path) as f:
                owner = json.load(f).get("program", program)
        except (OSError, ValueError, AttributeError):
            owner = "an unreadable config"
        if owner != program:
            fail(f"{out_dir} holds a run of {owner} ({path}); choose another --out_dir for {program}")
    os.makedirs(out_dir, exist_ok=True)
    text = json.dumps({"program": program, **dataclasses.asdict(cfg)}, indent=2).encode()
    atomic_write(path, lambda f: f.write(text))


LATENT_META_KEYS = ("ae_ckpt", "channels", "size", "count", "num_classes", "mean", "std")


def read_latent_meta(path):
    """A latent cache's meta.json, validated (JSON, keys, finite statistics of the right length, no zero std)."""
    redo = "rerun `train_ae.py --stage encode --overwrite` for that cache"
    try:
        with open(path) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        fail(f"{path} cannot be read as JSON ({type(e).__name__}: {e}); {redo}")
    if missing := [k for k in LATENT_META_KEYS if not isinstance(meta, dict) or k not in meta]:
        fail(f"{path} lacks {', '.join(missing)}; {redo}")
    for key, stats in (("mean", meta["mean"]), ("std", meta["std"])):
        if not isinstance(stats, list) or len(stats) != meta["channels"]:
            fail(f"{path}: '{key}' must list {meta['channels']} numbers (one per channel); {redo}")
        if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in stats):
            fail(f"{path}: '{key}' holds a value that is not a finite number; {redo}")
    if min(meta["std"]) <= 0:
        fail(f"{path}: a channel's std is {min(meta['std'])}, and normalising by it gives inf or NaN; {redo}")
    return meta


def cache_ae(meta, ae_ckpt=""):
    """(path, own) of the AE that decodes a latent cache: ae_ckpt, else the cache's own (None when gone); own: the
    AE the latents were encoded with (meta.json's SHA-256). The cache's own AE changed since the encode is refused."""
    path = ae_ckpt or meta.get("ae_ckpt") or ""
    if not os.path.isfile(path):
        if ae_ckpt:
            fail(f"--ae_ckpt {ae_ckpt} does not exist")
        return None, False
    sha, named = meta.get("ae_sha256"), meta.get("ae_ckpt") or ""
    own = file_digest(path) == sha if sha else not named or os.path.abspath(path) == os.path.abspath(named)
    if not (own or ae_ckpt):
        fail(f"{path} changed since the latents were encoded with it (its SHA-256 differs from meta.json's), so it "
             f"would decode them wrongly; re-encode, restore it, or pass --ae_ckpt {path} to use it anyway")
    return path, own


def gpu_guard(device, heavy):
    """Before anything is allocated: `heavy` (a description of a paper-size run) on a machine without a GPU stops
    with one sentence, unless --device cpu asks for exactly that."""
    if heavy and device == "auto" and not torch.cuda.is_available():
        fail(f"no GPU found, and {heavy} is far too large for a CPU; use --preset tiny for a CPU run, or pass "
             f"--device cpu to run it on the CPU anyway")


DEVICES = ("auto", "cpu", "cuda")


class Dist:
    """rank / local_rank / world_size / device of this process; `python x.py` is a world of one.
    device: auto (the GPU when there is one) | cpu | cuda."""

    def __init__(self, device="auto"):
        self.rank = int(os.environ.get("RANK", 0))
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        self.world_size = int(os.environ.get("WORLD_SIZE", 1))
        if device == "cuda" and not torch.cuda.is_available():
            fail("--device cuda was given but no GPU is visible to PyTorch")
        if device != "cpu" and torch.cuda.is_available():
            self.device = torch.device("cuda", self.local_rank)  # LOCAL_RANK, never RANK (multi-node)
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
        if self.world_size > 1 and not dist.is_initialized():
            store = None
            if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":  # under torchrun: its agent's store, whose
                # keys of a failed round remain after a restart (gloo would dial the dead workers): a prefix per round
                store = dist.PrefixStore(f"attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", dist.TCPStore(
                    os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False))
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo", store=store,
                                    rank=self.rank if store else -1, world_size=self.world_size if store else -1,
                                    device_id=self.device if self.device.type == "cuda" else None,
                                    timeout=datetime.timedelta(hours=1))  # rank-0 merges and writes can be slow
        self.cpu_group = dist.new_group(backend="gloo") if self.world_size > 1 else None  # host-side flags (Run)
        self.master = self.rank == 0

    def barrier(self):
        if self.world_size > 1:
            dist.barrier()

    def run0(self, fn):
        """fn() on rank 0 only (writing a file, taking the folder lock), then a barrier. A fail() there stops every
        rank with the same sentence, instead of leaving the others waiting at their next collective."""
        error, result = None, None
        if self.master:
            try:
                result = fn()
            except SystemExit as e:
                error = e
        if self.world_size > 1:
            box = [error and (str(error), error.code)]
            dist.broadcast_object_list(box, src=0)
            if box[0] and not error:  # the same exit on every rank (rank 0 has printed the sentence)
                error = SystemExit(box[0][0])
                error.code = box[0][1]
        if error:
            raise error
        return result

    def all_reduce_mean(self, tensor):
        if self.world_size > 1:
            dist.all_reduce(tensor)
            tensor /= self.world_size
        return tensor

    def teardown(self):
        release_locks()
        if self.world_size > 1 and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


def batch_layout(cfg, process):
    """(per-rank batch, micro-batch, accumulation steps) from cfg.batch_size (global) and cfg.micro_batch_size."""
    per_rank, rem = divmod(cfg.batch_size, process.world_size)
    micro = cfg.micro_batch_size or per_rank
    if rem or per_rank == 0 or per_rank % micro:
        fail(f"batch_size {cfg.batch_size} is not divisible by world size {process.world_size} x micro_batch_size "
             f"{micro}; choose a multiple of {process.world_size * micro}, or another micro_batch_size")
    return per_rank, micro, per_rank // micro


def make_optimizer(cfg, params, device, betas=None, weight_decay=None):
    """AdamW (fused on GPU) with cfg.lr and cfg's betas and weight decay (or those given), the decay on >=2-D weights
    only. params: parameters, or {lr_scale: parameters}, each group's lr then multiplied by its lr_scale."""
    decay = cfg.weight_decay if weight_decay is None else weight_decay
    groups = [{"params": [p for p in ps if p.requires_grad and (p.dim() >= 2) == matrix], "lr_scale": scale,
               "weight_decay": decay if matrix else 0.0}
              for scale, ps in (params if isinstance(params, dict) else {1.0: params}).items() for ps in [list(ps)]
              for matrix in (True, False)]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr,
                             betas=betas or (cfg.adam_beta1, cfg.adam_beta2), fused=device.type == "cuda")


# the run kit of the three training loops (refine, ae, DiT): resume-or-refuse, compile + DDP, and the Run: its log
# line with the non-finite guard, checkpoints, the same-run check on resume, and stopping on a signal

RESUME = ("false", "true", "auto")  # --resume: a bare --resume is "true"
STOP_TIMEOUT = 25  # s from a stop signal to exit at the latest: torchrun and SLURM kill 30 s after their SIGTERM
NONFINITE = "nonfinite.txt"  # in OUT_DIR: why the non-finite guard stopped the run; a resume is refused while it exists


def check_resume(cfg, path, results=(), required=False):
    """Resume-or-refuse, before anything is written: True when this run continues from the checkpoint `path`.
    --resume false refuses a checkpoint or finished result (`results`) already there, unless --overwrite; true
    continues (required: the checkpoint must exist); auto continues when it exists, else starts. A run the
    non-finite guard stopped is refused (status 3)."""
    stopped = os.path.join(cfg.out_dir, NONFINITE)
    if os.path.isfile(stopped) and not cfg.overwrite:
        with open(stopped) as f:
            stop(f"error: the run in {cfg.out_dir} was stopped by the non-finite guard ({f.read().strip()}); fix the "
                 f"cause, then delete {stopped} to resume, or pass --overwrite to start a new run", EXIT_NONFINITE)
    exists, finished = os.path.isfile(path), [p for p in results if os.path.isfile(p)]
    if cfg.resume == "false" and (exists or finished) and not cfg.overwrite:
        fail(f"{path if exists else finished[0]} already exists; pass --resume auto to continue that run, --overwrite "
             f"to start a new one in its place, or choose another --out_dir")
    if cfg.resume == "true" and required and not exists:
        fail(f"--resume was given but {path} does not exist; pass --resume auto to start when there is none")
    if cfg.resume != "false" and not exists and finished and not cfg.overwrite:
        fail(f"{finished[0]} exists but not its checkpoint {path}, so it cannot be continued; pass --overwrite to "
             f"train it again")
    return cfg.resume != "false" and exists


def wrap(cfg, process, module):
    """torch.compile (--compile), then DDP when there are several processes. The caller keeps the raw module for
    saving, the EMA and sampling."""
    if cfg.compile:
        module = torch.compile(module)
    if process.world_size > 1:
        module = DDP(module, device_ids=[process.local_rank] if process.device.type == "cuda" else None)
    return module


def grad_sync(module, sync):
    """DDP all-reduces the gradients only on the last micro-batch of a step (sync), never on the others."""
    return module.no_sync() if isinstance(module, DDP) and not sync else nullcontext()


def _shown(old, new):
    """'old -> new' for a message, a dict by its differing keys, long values cut."""
    if isinstance(old, dict) and isinstance(new, dict):
        return ", ".join(f"{k} {_shown(old.get(k), new.get(k))}" for k in {**old, **new} if old.get(k) != new.get(k))
    cut = lambda v: repr(v) if len(repr(v)) <= 40 else repr(v)[:37] + "..."  # noqa: E731
    return f"{cut(old)} -> {cut(new)}"


class Run:
    """The kit of one training loop (refine, ae, DiT): resume() refuses a checkpoint of another run; add() / emit()
    make the log line (interval means over all ranks of the loss parts summed on the device, one sync per line; lr,
    img/s without the first step, MFU, memory, ETA); checkpoint() runs the non-finite guard (status 3, and
    OUT_DIR/nonfinite.txt) before the write on rank 0. SIGTERM and SIGUSR1 are noted, not obeyed at once: the ranks
    agree after which step to stop (stop_requested), checkpoint and exit with 75 (stop); a watchdog exits with 75
    STOP_TIMEOUT s after the signal if that has not happened (a dead peer), the last checkpoint intact."""

    def __init__(self, cfg, process, log, name, path, total_steps, flops_per_image, causes):
        self.cfg, self.process, self.log, self.name, self.path, self.total = cfg, process, log, name, path, total_steps
        self.flops, self.peak, self.causes = flops_per_image, peak_flops(process.device), causes
        self.saved_step, self.identity, self.history, self.images_seen = None, {}, [], 0
        self.sums, self.n, self.skipped, self.t0, self.step0 = {}, 0, 0, None, None
        self.signal, self.pending, self.listening = None, None, threading.current_thread() is threading.main_thread()
        if self.listening:  # the C-level handler writes each signal's number to the pipe even while Python is blocked
            read, self.wake = os.pipe()
            os.set_blocking(self.wake, False)
            self.saved = [signal.signal(s, lambda *_: None) for s in (signal.SIGTERM, signal.SIGUSR1)]
            self.saved_fd = signal.set_wakeup_fd(self.wake)
            threading.Thread(target=self._watchdog, args=(read,), daemon=True).start()

    def resume(self, kind, states, arch, identity):
        """The step to start from, 0 or the checkpoint's with `states` ({key: module or optimizer}) loaded. The same
        network (arch {key: arguments}) and the same run: every config field but the FREE ones, and identity (the
        data), as in the checkpoint, except the fields --allow_change names (logged, kept in the history)."""
        self.identity = {**arch, **identity}
        if self.cfg.resume == "false" or not os.path.isfile(self.path):
            self.log(f"{self.name}: starting at step 0" + (self.cfg.resume != "false") * " (no checkpoint yet)")
            return 0
        ckpt = load_checkpoint(self.path, kind)
        other = [f"{k} {_shown(ckpt.get(k), v)}" for k, v in arch.items() if ckpt.get(k) != v]
        if other:
            fail(f"{self.path} was trained with another network ({'; '.join(other)}); use the same model flags and "
                 f"data, or another --out_dir")
        old = {**ckpt["config"], **{k: ckpt.get(k) for k in identity}}
        new = {**dataclasses.asdict(self.cfg), **identity}
        free, allowed = set(getattr(type(self.cfg), "FREE", ())), set(filter(None, self.cfg.allow_change.split(",")))
        if allowed - set(new):
            fail(f"--allow_change names {', '.join(sorted(allowed - set(new)))}, which this run does not have; name "
                 f"config fields or {', '.join(identity)}")
        changed = {k: (old[k], v) for k, v in new.items() if k in old and k not in free and old[k] != v}
        refused = [k for k in changed if k not in allowed]
        if refused:
            fail(f"{self.path} was trained as another run: {'; '.join(f'{k} {_shown(*changed[k])}' for k in refused)}; "
                 f"use its values, pass --allow_change {','.join(refused)} to change them deliberately, or choose "
                 f"another --out_dir")
        for key, state in states.items():
            state.load_state_dict(ckpt[key])
        self.history, self.saved_step = list(ckpt.get("history", [])), ckpt["step"]
        self.images_seen = ckpt.get("images_seen", ckpt["step"] * ckpt["config"].get("batch_size", 0))
        if changed:
            self.history.append({"step": ckpt["step"], "changed": {k: list(v) for k, v in changed.items()}})
            self.log(f"{self.name}: deliberate changes at step {ckpt['step']} (--allow_change): "
                     + "; ".join(f"{k} {_shown(*v)}" for k, v in changed.items()))
        self.log(f"{self.name}: resuming from {self.path} at step {ckpt['step']}"
                 + (" (finished: nothing to do)" if ckpt["step"] >= self.total else ""))
        return ckpt["step"]

    def extras(self):
        """What every checkpoint of this run holds beside the weights: its identity, history and images seen."""
        return {**self.identity, "history": self.history, "images_seen": self.images_seen}

    def add(self, step, parts, skipped=0):
        for key, value in parts.items():
            self.sums[key] = self.sums.get(key, 0) + value.detach().float()
        self.n, self.skipped = self.n + 1, self.skipped + skipped
        self.images_seen += self.cfg.batch_size
        if self.t0 is None:  # the first step (compilation, allocator warm-up) is not timed
            if self.process.device.type == "cuda":
                torch.cuda.synchronize()
            self.t0, self.step0 = time.perf_counter(), step

    def emit(self, step, lr, extra=""):
        keys, world, device = list(self.sums), self.process.world_size, self.process.device
        stats = [self.sums[k] / self.n for k in keys] + [torch.tensor(float(self.skipped * world), device=device)]
        stats = self.process.all_reduce_mean(torch.stack(stats)).tolist()  # interval means; skipped: the sum
        elapsed = time.perf_counter() - self.t0
        img_s = (step - self.step0) * self.cfg.batch_size / elapsed if step > self.step0 else float("nan")
        mfu = f"{100 * img_s * self.flops / (self.peak * world):.1f}%" if self.peak and img_s == img_s else "-"
        mem = f"{torch.cuda.max_memory_allocated(device) / 2**30:.1f}GiB" if device.type == "cuda" else "-"
        eta = format_duration((self.total - step) * self.cfg.batch_size / img_s) if img_s == img_s else "-"
        parts, skipped = " | ".join(f"{k} {v:.4f}" for k, v in zip(keys, stats)), round(stats[-1])
        self.log(f"{self.name} step {step}/{self.total} | {parts} | lr {lr:.2e} | {img_s:.1f} img/s | MFU {mfu} | "
                 f"mem {mem} | ETA {eta}" + (f" | {extra}" if extra else "")
                 + (f" | {skipped} unreadable images skipped" if skipped else ""))
        self._guard(step, dict(zip(keys, stats)))
        self.sums, self.n, self.skipped = {}, 0, 0

    def checkpoint(self, step, write):
        """The guard over the steps since the last line (one sync), then write() on rank 0."""
        if self.n:
            keys = list(self.sums)
            self._guard(step, dict(zip(keys, self.process.all_reduce_mean(torch.stack([self.sums[k] for k in keys]))
                                       .tolist())))
        self.process.run0(write)
        self.saved_step = step

    def _guard(self, step, values):
        bad = ", ".join(f"{name} = {value}" for name, value in values.items() if not math.isfinite(value))
        if bad:
            kept = (f"the checkpoint of step {self.saved_step} is kept as it was" if self.saved_step
                    else "no checkpoint was written")
            if self.process.master:
                atomic_write(os.path.join(self.cfg.out_dir, NONFINITE), lambda f: f.write(
                    f"{self.name} step {step}: {bad}".encode()))
            self.close()
            stop(f"error: the steps up to {step} gave a non-finite {bad}, so the run stops (status {EXIT_NONFINITE}: a "
                 f"restart would stop again); look for {self.causes}; {kept}", EXIT_NONFINITE)

    def stop_requested(self):
        """After every step on every rank: True on all after the same step once one has a stop signal. The flags meet
        in an all-reduce on a CPU group, started after one step and read after the next: no wait, no device sync."""
        if self.process.world_size == 1:
            return self.signal is not None
        stop = False
        if self.pending:
            work, flag = self.pending
            work.wait()
            stop = flag.item() > 0
        flag = torch.tensor([float(self.signal is not None)])
        self.pending = (dist.all_reduce(flag, dist.ReduceOp.MAX, group=self.process.cpu_group, async_op=True), flag)
        return stop

    def stop(self, step, write):
        """The checkpoint of `step` (unless written just now), one log line, exit status 75 on every rank."""
        if self.saved_step != step:
            self.checkpoint(step, write)
        message = (f"{self.name}: stopped by {self.signal or 'a stop signal'} at step {step}; checkpoint {self.path} "
                   f"written; the same command with --resume auto continues (status {EXIT_REQUEUE}: requeue)")
        self.log(message)
        self.close()
        self.process.teardown()
        stop(message, EXIT_REQUEUE, printed=True)

    def close(self):
        """The loop is over: signals go back to their handlers (the watchdog stays armed if one has come)."""
        if self.pending:
            self.pending[0].wait()
            self.pending = None
        if self.listening:
            self.listening = False
            signal.set_wakeup_fd(self.saved_fd)
            for s, handler in zip((signal.SIGTERM, signal.SIGUSR1), self.saved):
                signal.signal(s, handler)
            os.write(self.wake, b"\0")
            os.close(self.wake)

    def _watchdog(self, read):
        while (number := os.read(read, 1)[0]) not in (signal.SIGTERM, signal.SIGUSR1):
            if number == 0:  # close(): no stop signal came
                return os.close(read)
        self.signal = signal.Signals(number).name
        time.sleep(STOP_TIMEOUT)
        self.log(f"{self.name}: stopped by {self.signal}: no checkpoint within {STOP_TIMEOUT} s (a rank gone?); the "
                 f"last one on disk, of step {self.saved_step}, is kept (status {EXIT_REQUEUE}: requeue)")
        os._exit(EXIT_REQUEUE)


def mixed_seed(*keys):
    """The one seed function: a 32-bit seed mixed from integer keys (seed, step, stream, ...) by a SeedSequence
    (torch's CPU generator keeps only 32 bits of a seed, so keys are mixed rather than packed into one number)."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1)[0])


@functools.lru_cache(maxsize=4)
def _epoch_order(count, seed, epoch):
    return np.random.default_rng((seed, epoch)).permutation(count)


def batch_indices(step, batch_size, count, seed, drop_tail=False):
    """Global sample indices of a step's batch, a pure function of the step (resume and world size need no state):
    epoch e is a permutation seeded by (seed, e); drop_tail: whole batches per epoch, the rest skipped (train_ae);
    else the positions run on across epochs (train_dit)."""
    if drop_tail:
        epoch, s = divmod(step, count // batch_size)
        return _epoch_order(count, seed, epoch)[s * batch_size:(s + 1) * batch_size]
    positions = np.arange(step * batch_size, (step + 1) * batch_size)
    epochs = positions // count
    return np.concatenate([_epoch_order(count, seed, int(e))[positions[epochs == e] % count]
                           for e in np.unique(epochs)])


def step_flips(seed, step, batch_size):
    """Horizontal flips (bool tensor (batch_size,)) of a step's global batch, from a CPU generator of their own
    (stream 0 of (seed, step)): the same for any world size and after a resume."""
    return torch.rand(batch_size, generator=torch.Generator().manual_seed(mixed_seed(seed, step, 0))) < 0.5


def progress(iterable, show=True, desc="", unit="it"):
    """A tqdm bar on a terminal; redirected to a file, one plain line per tenth of the loop instead, so a log holds
    no carriage-return lines. show=False (other ranks): the bare iterable."""
    if not show:
        return iterable
    if sys.stderr.isatty():
        from tqdm import tqdm
        return tqdm(iterable, desc=desc, unit=unit, dynamic_ncols=True)
    return _plain_progress(iterable, desc, unit, len(iterable))


def _plain_progress(iterable, desc, unit, total):
    start, shown = time.perf_counter(), 0
    for i, item in enumerate(iterable, 1):
        yield item
        if i * 10 // max(total, 1) > shown or i == total:
            shown = i * 10 // max(total, 1)
            elapsed = time.perf_counter() - start
            print(f"{desc}: {i}/{total} {unit} ({100 * i // max(total, 1)}%, {elapsed:.0f}s)", file=sys.stderr,
                  flush=True)


_NOTICES = set()


def notice(message):
    """print0 a message once per process, however many times the code path runs (e.g. a model built per stage)."""
    if message not in _NOTICES:
        _NOTICES.add(message)
        print0(message)


def print0(*args, **kwargs):
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, **kwargs, flush=True)


class Logger:
    """print0 plus an append-only log file in out_dir (rank 0 only)."""

    def __init__(self, out_dir, master):
        self.file = open(os.path.join(out_dir, "log.txt"), "a") if master else None

    def __call__(self, line):
        if self.file is not None:
            print(line, flush=True)
            self.file.write(line + "\n")
            self.file.flush()


def autocast(device):
    """The one precision context: bf16 autocast on GPU, nothing on CPU (fp32 master weights either way)."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def atomic_write(path, write_fn):
    """write_fn(file) into path.tmp, fsync, rename over path: never a half-written file; a failed write (a full
    disk) removes the .tmp, keeps the old file and stops with one sentence."""
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "wb") as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        fail(f"could not write {path} ({e.strerror or e}; is the disk full?); the previous file, if any, is unchanged")


def check_output(path, overwrite=False, inputs=()):
    """Before any work: refuse to write over an input of the same command, to replace a finished result without
    --overwrite, and to write into a folder that cannot be created or written."""
    for source in inputs:
        if source and os.path.abspath(source) == os.path.abspath(path) or \
                source and os.path.exists(source) and os.path.exists(path) and os.path.samefile(source, path):
            fail(f"{path} is also an input of this command; choose another output path")
    if os.path.exists(path) and not overwrite:
        fail(f"{path} already exists; pass --overwrite to replace it or choose another output path")
    folder = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(folder):
        folder = os.path.dirname(folder)  # the nearest existing parent decides whether we may create the rest
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        fail(f"cannot write {path}: {folder} is not a writable folder; choose another output path")


def file_digest(path):
    """SHA-256 of a file, hex."""
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            sha.update(chunk)
    return sha.hexdigest()


def _process_alive(pid):
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


LOCK_HEARTBEAT, LOCK_STALE = 30, 120  # s: a running job touches its .lock this often; older than LOCK_STALE = gone


def lock_dir(path):
    """An owner file path/.lock ("pid@host"), touched every LOCK_HEARTBEAT s and removed at exit, stops a second run
    on the folder. A lock whose owner is provably gone is taken over, said in a line: on this host, its process has
    ended; on another (a lost node), its heartbeat is older than LOCK_STALE s (clocks within a minute). Rank 0 only."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        fail(f"cannot create the output folder {path} ({e.strerror}); choose another one")
    lock, me = os.path.join(path, ".lock"), f"{os.getpid()}@{socket.gethostname()}"
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            with open(lock) as f:
                owner = f.read().strip()
            if owner == me:  # this process: an earlier main() in the same interpreter (a notebook, a test) failed
                _LOCKS.add(lock)
                return
            pid, _, host = owner.partition("@")
            age = time.time() - os.path.getmtime(lock)
            here = host == socket.gethostname()
            if (not pid.isdigit() or not _process_alive(int(pid))) if here else age > LOCK_STALE:
                print0(f"{path}: taking over the lock of {owner}, which is gone ("
                       + ("its process has ended)" if here else f"no heartbeat for {age:.0f} s)"))
                os.remove(lock)
                continue
            fail(f"{path} is in use by another run (process {owner}, heartbeat {age:.0f} s ago, see {lock}); wait "
                 f"for it, choose another folder, or delete {lock} if that run is gone")
        with os.fdopen(fd, "w") as f:
            f.write(me)
        _LOCKS.add(lock)
        if not _LOCKS_TOUCHED.is_alive():
            _LOCKS_TOUCHED.start()
        return


def _heartbeat():
    while True:
        time.sleep(LOCK_HEARTBEAT)
        for lock in list(_LOCKS):
            try:
                os.utime(lock)
            except OSError:
                pass


_LOCKS_TOUCHED = threading.Thread(target=_heartbeat, daemon=True)
_LOCKS = set()


@atexit.register
def release_locks():
    """Remove the owner files this process holds: at the end of a run (Dist.teardown) and at interpreter exit."""
    me = f"{os.getpid()}@{socket.gethostname()}"
    for lock in list(_LOCKS):
        try:
            with open(lock) as f:
                if f.read().strip() == me:
                    os.remove(lock)
        except OSError:
            pass
        _LOCKS.discard(lock)


def save_checkpoint(path, kind, model, config, step, ema=None, opt=None, **extras):
    """Our checkpoint schema, from the raw (uncompiled, unwrapped) modules (model None: an EMA snapshot); call on rank 0
    only."""
    ckpt = {"kind": kind, "model": None if model is None else model.state_dict(),
            "ema": None if ema is None else ema.state_dict(),
            "opt": None if opt is None else opt.state_dict(), "step": step,
            "config": dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config),
            "version": CKPT_VERSION, **extras}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write(path, lambda f: torch.save(ckpt, f))


def load_checkpoint(path, kind, convert_released=None):
    """Load a checkpoint of the expected kind, or stop with one sentence saying what is wrong. convert_released(ckpt,
    path): the loader's converter of the authors' released file of this kind (None when the file is not one)."""
    if not os.path.isfile(path):
        fail(f"checkpoint {path} does not exist; check the path")
    try:  # memory-mapped: ranks that need only part of a large file (e.g. no optimizer state) read only that;
        try:  # files in the legacy (non-zip) format cannot be mapped and are read whole
            ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        fail(f"checkpoint {path} cannot be read safely ({type(e).__name__}); it is truncated, corrupt, not a "
             f"checkpoint, or pickles Python objects that a weights-only load refuses (for a file you trust, re-save "
             f"its tensors: torch.save({{'model': torch.load(PATH, weights_only=False)['model']}}, NEW))")
    converted = convert_released(ckpt, path) if convert_released else None
    if converted is not None:
        return converted
    if not isinstance(ckpt, dict) or "kind" not in ckpt:
        fail(f"{path} is not a checkpoint of this code (no 'kind' field) nor one of the authors' released files")
    if ckpt["kind"] != kind:
        fail(f"checkpoint {path} is a {ckpt['kind']!r} checkpoint, but a {kind!r} checkpoint is needed here")
    if kind in ("pae", "refine") and ckpt.get("version", 1) < 2:
        fail(f"{path} was written by an earlier version of this code whose tokenizer differs from the released "
             f"architecture; train it again (train_ae.py)")
    return ckpt


@torch.no_grad()
def ema_update(ema, model, decay):
    """ema <- decay * ema + (1 - decay) * model, over trainable parameters only (frozen ones never change)."""
    pairs = [(e, p) for e, p in zip(ema.parameters(), model.parameters()) if p.requires_grad]
    torch._foreach_lerp_([e for e, _ in pairs], [p for _, p in pairs], 1 - decay)


def peak_flops(device):
    """Dense bf16 peak FLOP/s of one device, for MFU; None where unknown (CPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    table = [("B200", 2.25e15), ("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("H800", 989e12),
             ("A100", 312e12), ("A800", 312e12), ("L40S", 362e12), ("A6000", 155e12), ("4090", 165e12)]
    for key, flops in table:
        if key in name:
            return flops
    return None


def report(what, rate, unit, flops, device, compiled, extra=""):
    """One benchmark line: throughput (units/s), MFU when the FLOPs per unit are counted and the device's peak is
    known, peak memory, and for a compiled run the graph breaks torch.compile made."""
    peak = peak_flops(device)
    mfu = f"{100 * rate * flops / peak:.1f}%" if flops and peak else "n/a"
    mem = f"{torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB" if device.type == "cuda" else "n/a (CPU)"
    breaks = f" | graph breaks {sum(torch._dynamo.utils.counters['graph_break'].values())}" if compiled else ""
    print(f"bench {what} compile={compiled}: {rate:.4g} {unit}/s | MFU {mfu} | peak memory {mem}{breaks}"
          + (f" | {extra}" if extra else ""), flush=True)


def time_calls(fn, steps, device, warmup=2):
    """Seconds per call of fn() after `warmup` calls (compilation, allocator), the device synchronised around the
    timed calls; the peak-memory counter is reset after the warm-up."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / steps


def bench_modes(cfg):
    """Compile off, then on (unless --compile false): each bench reports both. Each mode starts from a fresh
    torch.compile state, so its graph-break count is its own."""
    for compiled in (False, True) if cfg.compile else (False,):
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        yield compiled


def count_flops(fn):
    """FLOPs of one call of fn() (forward + backward if fn does both), by torch's FlopCounterMode, counted once at
    start-up; the global RNG is left as it was, so counting changes no result."""
    from torch.utils.flop_counter import FlopCounterMode
    with torch.random.fork_rng(devices=[]), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def format_duration(seconds):
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else \
        f"{seconds // 60}m{seconds % 60:02d}s"
