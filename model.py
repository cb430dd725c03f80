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
import socket
import sys
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
    """Fixed 2-D sin-cos position embedding (grid*grid, dim), rows in raster order: the first half codes the column,
    the second half the row, each as [sin | cos] with frequencies 1/10000^(i/(dim/4)) (the released MAE-style
    tables of LightningDiT, the DAM and the decoder)."""
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
    "tiny": (64, 2, 4, 256), "B": (768, 12, 12, 3072), "L": (1024, 24, 16, 4096), "XL": (1152, 28, 16, 4096),
}


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
        self.net = net.requires_grad_(False).eval()
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def train(self, mode=True):  # always in eval mode, whatever the parent does
        return super().train(False)

    def state_dict(self, *args, destination=None, prefix="", keep_vars=False):
        """The frozen weights come from their pretrained source (or a fixed seed), never from a PAE checkpoint."""
        return {} if destination is None else destination

    def preprocess(self, images01):
        """Bicubic resize to the VFM input size, then the VFM's own mean/std normalisation."""
        if images01.shape[-1] != self.input_size or images01.shape[-2] != self.input_size:
            images01 = F.interpolate(images01, size=self.input_size, mode="bicubic", align_corners=False)  # as released
        return (images01 - self.mean) / self.std

    @torch.no_grad()
    def forward(self, images01):
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
    """Detail-Aware Modulator: pixel tokens attend to the VFM tokens; SFT fusion, zero at init.
    Module initialisation is PyTorch's default, as released, except the zero SFT head and the fixed table."""

    def __init__(self, width, heads, patch, grid, depth=6):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, width, patch, stride=patch)
        self.pos_embed = nn.Parameter(sincos_2d(width, grid)[None], requires_grad=False)
        self.blocks = nn.ModuleList([DAMBlock(width, heads) for _ in range(depth)])
        self.sft = nn.Linear(width, 2 * width)  # on the block output directly, no norm before it (as released)
        self.norm = nn.LayerNorm(width)  # H_z = LayerNorm(H_vfm * (1 + gamma) + beta), affine
        nn.init.zeros_(self.sft.weight)  # gamma = beta = 0 at init, so H_z = LayerNorm(H_vfm)
        nn.init.zeros_(self.sft.bias)

    def forward(self, pixels, vfm_tokens):
        x = self.patch_embed(pixels).flatten(2).transpose(1, 2) + self.pos_embed  # (B, N, W)
        for block in self.blocks:
            x = block(x, vfm_tokens)
        gamma, beta = self.sft(x).chunk(2, dim=-1)
        return self.norm(vfm_tokens * (1 + gamma) + beta)  # H_z (B, N, W)


class Projector(nn.Module):
    """H_z (B, N, W) -> attention (no qkv bias, no residual) -> 3x3 conv W -> 32 -> sphere: latent (B, 32, g, g)."""

    def __init__(self, width, heads, grid):
        super().__init__()
        self.grid, self.attn = grid, Attention(width, heads, qkv_bias=False)
        self.conv = nn.Conv2d(width, LATENT_CHANNELS, 3, padding=1)

    def forward(self, h_z):
        x = self.attn(h_z).transpose(1, 2).unflatten(2, (self.grid, self.grid))  # (B, W, g, g)
        return sphere(self.conv(x))


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
    """Prior-Aligned AutoEncoder: frozen VFM + DAM -> spherical latent (B, 32, 16, 16) -> ViT decoder -> image."""

    def __init__(self, vfm, dec_dim, dec_depth, dec_heads, dec_hidden, image_size=None, dam_depth=6):
        super().__init__()
        W, heads, g = vfm.width, vfm.heads, vfm.grid  # DAM, projector and deprojector: the VFM's width and heads
        self.image_size = image_size or 16 * g  # 256 px for the paper's 16x16 grid
        self.vfm = vfm
        self.dam = DAM(W, heads, vfm.patch, g, dam_depth)
        self.projector = Projector(W, heads, g)
        self.deprojector = Deprojector(W, heads)
        self.decoder = ViTDecoder(W, dec_dim, dec_depth, dec_heads, dec_hidden, g, self.image_size // g)

    def trainable_parameters(self):
        return [p for p in self.parameters() if p.requires_grad]  # not the VFM, not the fixed sin-cos tables

    def encode(self, images01, vfm_tokens=None):
        """images01 (B, 3, H, W) in [0, 1] -> latent (B, 32, g, g); pass vfm_tokens if already computed."""
        vfm_tokens = self.vfm(images01) if vfm_tokens is None else vfm_tokens  # (B, N, W), N = g*g
        h_z = self.dam(self.vfm.preprocess(images01), vfm_tokens)  # (B, N, W)
        return self.projector(h_z)  # (B, 32, g, g), every token on the sqrt(32) sphere

    def decode(self, latent):
        """latent (B, 32, g, g) -> images (B, 3, image_size, image_size) in [0, 1] (not clamped)."""
        tokens = self.deprojector(latent)  # (B, N, W)
        return self.decoder(tokens) * self.vfm.std + self.vfm.mean  # (B, 3, S, S), S = image_size

    def forward(self, images01, thetas_deg=()):
        """One training pass (one DDP call): the clean decoding and, for MCR, the decodings of the latent rotated
        by each theta along one shared direction, all in one decoder batch."""
        vfm_tokens = self.vfm(images01)  # (B, N, W)
        latent = self.encode(images01, vfm_tokens)  # (B, 32, g, g)
        latents = torch.cat([latent, *mcr_rotate(latent, thetas_deg)])  # (B * (1 + len(thetas)), 32, g, g)
        decoded = self.decode(latents).chunk(1 + len(thetas_deg))  # 1 + len(thetas) x (B, 3, S, S)
        return {"vfm_tokens": vfm_tokens, "latent": latent, "recon": decoded[0], "rotated": list(decoded[1:])}

    def load_state_dict(self, state_dict, strict=True, assign=False):
        """Checkpoints hold no VFM weights (see VFM.state_dict), so those keys are not missing."""
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

    def reconstruct(self, z_t):  # (B, N, 32) -> H_hat (B, N, W)
        x = self.recon_in(z_t)
        for block in self.recon_blocks:
            x = block(x)
        return self.recon_out(self.recon_norm(x))


# -----------------------------------------------------------------------------
# 4. PatchGAN discriminator


class PatchDiscriminator(nn.Module):
    """3-layer PatchGAN (pix2pix): images in [-1, 1] (B, 3, H, W) -> logits (B, 1, h, w). GroupNorm instead of
    BatchNorm [our reading], so results do not depend on the per-GPU batch."""

    def __init__(self, channels=64, layers=3):
        super().__init__()
        mods, c = [nn.Conv2d(3, channels, 4, 2, 1), nn.LeakyReLU(0.2)], channels
        for i in range(1, layers + 1):
            c_out = channels * min(2 ** i, 8)
            mods += [nn.Conv2d(c, c_out, 4, 2 if i < layers else 1, 1, bias=False),
                     nn.GroupNorm(min(32, c_out // 4), c_out), nn.LeakyReLU(0.2)]
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
    if missing or extra or wrong:
        problems = ([f"no tensor for our {', '.join(missing[:3])}"] if missing else []) + \
                   ([f"unused tensors {', '.join(extra[:3])}"] if extra else []) + \
                   ([f"wrong shapes {', '.join(wrong[:3])}"] if wrong else [])
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
    "tiny": (64, 2, 4), "S": (384, 12, 6), "B": (768, 12, 12), "L": (1024, 24, 16), "XL": (1152, 28, 16),
}


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
    (r"x_embedder\.proj\.(.+)", r"x_embed.\1"),
    (r"pos_embed", "pos_embed"),
    (r"t_embedder\.mlp\.([02])\.(.+)", r"t_embed.\1.\2"),
    (r"y_embedder\.embedding_table\.weight", "y_embed.weight"),
    (r"blocks\." + _BLOCK + r"(norm1|norm2)\.weight", r"blocks.\1.\2.weight"),
    (r"blocks\." + _BLOCK + r"attn\.(qkv|proj|q_norm|k_norm)\.(.+)", r"blocks.\1.attn.\2.\3"),
    (r"blocks\." + _BLOCK + r"mlp\.(w12|w3)\.(.+)", r"blocks.\1.ffn.\2.\3"),
    (r"blocks\." + _BLOCK + r"adaLN_modulation\.1\.(.+)", r"blocks.\1.adaLN.1.\2"),
    (r"final_layer\.norm_final\.weight", "final_norm.weight"),
    (r"final_layer\.linear\.(.+)", r"final_linear.\1"),
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
    """PAE in eval mode from a 'pae' checkpoint (ours, or the authors' released file): architecture from its
    pae_args, raw (non-EMA) weights as the released code extracts latents with. The VFM weights come from the
    file when it carries them (a released file may), else from their pretrained source. decode_only=True skips
    the VFM weights, which decoding never uses (sample.py); such a PAE must not encode."""
    ckpt = load_checkpoint(path, "pae", _convert_released_pae)
    if "pae_args" not in ckpt:
        fail(f"checkpoint {path} has no 'pae_args' entry; it was not written by train_ae.py --stage ae")
    vfm_state = None if decode_only else ckpt.get("vfm")
    pae = build_pae(**ckpt["pae_args"], pretrained=not decode_only and vfm_state is None)
    try:
        pae.load_state_dict(ckpt["model"])
        if vfm_state is not None:
            pae.vfm.net.load_state_dict(vfm_state)
    except RuntimeError as e:
        fail(f"checkpoint {path} does not match its recorded architecture {ckpt['pae_args']} ({e})")
    return pae.to(device).eval()


RELEASED_PAE_RULES = [
    (r"delta_encoder\.patch_embed\.proj\.(.+)", r"dam.patch_embed.\1"),
    (r"delta_encoder\.pos_embed", "dam.pos_embed"),
    (r"delta_encoder\.layers\." + _BLOCK + r"self_attn\.qkv\.(.+)", r"dam.blocks.\1.self_attn.{q,k,v}.\2"),
    (r"delta_encoder\.layers\." + _BLOCK + r"(self|cross)_attn\.proj\.(.+)", r"dam.blocks.\1.\2_attn.proj.\3"),
    (r"delta_encoder\.layers\." + _BLOCK + r"cross_attn\.([qkv])_proj\.(.+)", r"dam.blocks.\1.cross_attn.\2.\3"),
    (r"delta_encoder\.layers\." + _BLOCK + r"(norm1|norm3)\.(.+)", r"dam.blocks.\1.\2.\3"),
    (r"delta_encoder\.layers\." + _BLOCK + r"norm2_q\.(.+)", r"dam.blocks.\1.norm2.\2"),
    (r"delta_encoder\.layers\." + _BLOCK + r"norm2_kv\.(.+)", r"dam.blocks.\1.norm_vfm.\2"),
    (r"delta_encoder\.layers\." + _BLOCK + r"mlp\.fc1\.(.+)", r"dam.blocks.\1.mlp.0.\2"),
    (r"delta_encoder\.layers\." + _BLOCK + r"mlp\.fc2\.(.+)", r"dam.blocks.\1.mlp.2.\2"),
    (r"delta_encoder\.fusion_proj\.(.+)", r"dam.sft.\1"),
    (r"delta_encoder\.final_ln\.(.+)", r"dam.norm.\1"),
    (r"latent_compressor\.0\.qkv\.(.+)", r"projector.attn.{q,k,v}.\1"),
    (r"latent_compressor\.0\.proj\.(.+)", r"projector.attn.proj.\1"),
    (r"latent_compressor\.1\.(.+)", r"projector.conv.\1"),
    (r"latent_decompressor\.0\.(.+)", r"deprojector.conv.\1"),
    (r"latent_decompressor\.1\.qkv\.(.+)", r"deprojector.attn.{q,k,v}.\1"),
    (r"latent_decompressor\.1\.proj\.(.+)", r"deprojector.attn.proj.\1"),
    (r"decoder\.decoder_embed\.(.+)", r"decoder.embed.\1"),
    (r"decoder\.decoder_pos_embed", "decoder.pos_embed"),
    (r"decoder\.trainable_cls_token", "decoder.cls_token"),
    (r"decoder\.decoder_layers\." + _BLOCK + r"layernorm_before\.(.+)", r"decoder.blocks.\1.norm1.\2"),
    (r"decoder\.decoder_layers\." + _BLOCK + r"attention\.attention\.query\.(.+)", r"decoder.blocks.\1.attn.q.\2"),
    (r"decoder\.decoder_layers\." + _BLOCK + r"attention\.attention\.key\.(.+)", r"decoder.blocks.\1.attn.k.\2"),
    (r"decoder\.decoder_layers\." + _BLOCK + r"attention\.attention\.value\.(.+)", r"decoder.blocks.\1.attn.v.\2"),
    (r"decoder\.decoder_layers\." + _BLOCK + r"attention\.output\.dense\.(.+)", r"decoder.blocks.\1.attn.proj.\2"),
    (r"decoder\.decoder_layers\." + _BLOCK + r"layernorm_after\.(.+)", r"decoder.blocks.\1.norm2.\2"),
    (r"decoder\.decoder_layers\." + _BLOCK + r"intermediate\.dense\.(.+)", r"decoder.blocks.\1.mlp.0.\2"),
    (r"decoder\.decoder_layers\." + _BLOCK + r"output\.dense\.(.+)", r"decoder.blocks.\1.mlp.2.\2"),
    (r"decoder\.decoder_norm\.(.+)", r"decoder.norm.\1"),
    (r"decoder\.decoder_pred\.(.+)", r"decoder.head.\1"),
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
    """Hugging Face Dinov2WithRegistersModel weights (transformers 4 or 5 key names) -> the state dict of our
    timm VFM `vfm` (built, e.g. on meta), so both compute the same patch tokens. HF adds position row 0 to the
    class token and resamples the 37x37 patch rows to the token grid at run time (bicubic, antialias, fp32); timm
    holds patch rows only, computed here once the same way. The mask token is HF-only and unused."""
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
    pae_args = dict(vfm=vfm_name, decoder=name, vfm_weights=None, image_size=grid * dec_patch,
                    dam_depth=layers("delta_encoder.layers."))
    with torch.device("meta"):
        pae = build_pae(**pae_args, pretrained=False)
    converted, origin = _convert(state, RELEASED_PAE_RULES, path, "PAE")
    _check_converted(converted, origin, pae.state_dict(), path, "PAE")
    vfm = convert_released_dinov2(vfm_state, pae.vfm, path) if vfm_state else None
    print0(f"{path}: the authors' released PAE (VFM {vfm_name}, decoder {name}"
           f"{', with its VFM weights' if vfm else ''}) converted in memory")
    return {"kind": "pae", "model": converted, "ema": None, "opt": None, "step": 0, "config": {},
            "version": CKPT_VERSION, "pae_args": pae_args, "vfm": vfm, "released": True}


def build_refiner(vfm_width, preset=None, depth=4):
    """P_t and Q_t for VFM tokens of width vfm_width; preset='tiny' uses a 1-layer Q_t."""
    return PriorRefiner(vfm_width, depth=1 if preset == "tiny" else depth)


def refiner_from_checkpoint(path, device="cpu"):
    """P_t / Q_t in eval mode without gradients from a 'refine' checkpoint (P_t then supplies fixed targets)."""
    ckpt = load_checkpoint(path, "refine")
    refiner = build_refiner(**ckpt["refiner_args"])
    refiner.load_state_dict(ckpt["model"])
    return refiner.to(device).requires_grad_(False).eval(), ckpt


# -----------------------------------------------------------------------------
# 6. shared plumbing: config parsing, dist setup/teardown, print0, checkpoints, FLOPs

CKPT_VERSION = 2  # 2: the released PAE architecture (DAM fusion, attention biases, init)


def fail(message):
    """A user-caused error: one sentence on stderr, exit status 1, no traceback."""
    raise SystemExit(f"error: {message}")


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
    """Dataclass -> argparse, then validation, before anything is loaded or written. `--preset NAME` applies
    presets[NAME] first; explicit flags win over it. Each flag's help is the comment beside its field. The Config
    may declare CHOICES {field: valid values}, POSITIVE (fields > 0), NONNEGATIVE (fields >= 0) and UNIT; every float
    must be finite; UNIT fields lie in [0, 1]. A bad value is one sentence and exit status 1."""
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
    """A latent cache's meta.json, validated: invalid JSON, a missing key, statistics of the wrong length, not
    finite or with a zero std each give one sentence."""
    redo = "rerun `train_ae.py --stage encode --overwrite` for that cache"
    try:
        with open(path) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        fail(f"{path} cannot be read as JSON ({type(e).__name__}: {e}); {redo}")
    missing = [k for k in LATENT_META_KEYS if not isinstance(meta, dict) or k not in meta]
    if missing:
        fail(f"{path} lacks {', '.join(missing)}; {redo}")
    for key in ("mean", "std"):
        stats = meta[key]
        if not isinstance(stats, list) or len(stats) != meta["channels"]:
            fail(f"{path}: '{key}' must list {meta['channels']} numbers (one per channel); {redo}")
        if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in stats):
            fail(f"{path}: '{key}' holds a value that is not a finite number; {redo}")
    if min(meta["std"]) <= 0:
        fail(f"{path}: a channel's std is {min(meta['std'])}, and normalising by it gives inf or NaN; {redo}")
    return meta


def cache_ae(meta, ae_ckpt=""):
    """(path, own) of the AE that decodes a latent cache: ae_ckpt when given, else the cache's own (meta.json's
    ae_ckpt; path None when that file is gone). own: it is the AE the latents were encoded with (the SHA-256 in
    meta.json, or the path for a cache without one). The cache's own AE, changed since the encode, is refused."""
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
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo",
                                    device_id=self.device if self.device.type == "cuda" else None,
                                    timeout=datetime.timedelta(hours=1))  # rank-0 merges and writes can be slow
        self.master = self.rank == 0

    def barrier(self):
        if self.world_size > 1:
            dist.barrier()

    def run0(self, fn):
        """fn() on rank 0 only (writing a file, taking the folder lock), then a barrier. A fail() there stops every
        rank with the same sentence, instead of leaving the others waiting at their next collective."""
        message, result = None, None
        if self.master:
            try:
                result = fn()
            except SystemExit as e:
                message = str(e)
        if self.world_size > 1:
            box = [message]
            dist.broadcast_object_list(box, src=0)
            message = box[0]
        if message:
            raise SystemExit(message)
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


def batch_layout(cfg, d):
    """(per-rank batch, micro-batch, accumulation steps) from cfg.batch_size (global) and cfg.micro_batch_size."""
    per_rank, rem = divmod(cfg.batch_size, d.world_size)
    micro = cfg.micro_batch_size or per_rank
    if rem or per_rank == 0 or per_rank % micro:
        fail(f"batch_size {cfg.batch_size} is not divisible by world size {d.world_size} x micro_batch_size "
             f"{micro}; choose a batch_size that is")
    return per_rank, micro, per_rank // micro


def make_optimizer(cfg, params, device):
    """AdamW (fused on GPU) with cfg.lr, betas and weight decay on >=2-D weights only."""
    params = [p for p in params if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), fused=device.type == "cuda")


# the run kit of the three training loops (refine, ae, DiT): resume-or-refuse, compile + DDP, the interval log line
# with its non-finite guard and checkpoints, FLOPs


def check_resume(cfg, path, results=(), required=False):
    """Resume-or-refuse, before anything is written: True when this run continues from the checkpoint `path`. A
    checkpoint or finished result (`results`) already there is refused without --resume or --overwrite, so a finished
    or running run is never replaced by accident; required: --resume without a checkpoint is refused too."""
    if cfg.resume and required and not os.path.isfile(path):
        fail(f"--resume was given but {path} does not exist; drop --resume to start a new run")
    found = [p for p in (path, *results) if os.path.isfile(p)]
    if found and not (cfg.resume or cfg.overwrite):
        fail(f"{found[0]} already exists; pass --resume to continue that run, --overwrite to start a new one in its "
             f"place, or choose another --out_dir")
    return bool(cfg.resume) and os.path.isfile(path)


def resume_step(cfg, path, kind, states, arch, log):
    """The step to start from: 0 for a fresh start, else that of the checkpoint `path` (with --resume, when it
    exists), with `states` ({checkpoint key: module or optimizer}) loaded from it. arch ({checkpoint key: value}): how
    this run builds its model, which must be how the checkpoint's was built."""
    if not (cfg.resume and os.path.isfile(path)):
        if cfg.resume:
            log(f"--resume: {path} does not exist yet, so this run starts from step 0")
        return 0
    ckpt = load_checkpoint(path, kind)
    for key, value in arch.items():
        if ckpt.get(key) != value:
            fail(f"{path} was trained with {key} {ckpt.get(key)}, but this run has {value}; use the same model flags "
                 f"and data, or another --out_dir")
    for key, state in states.items():
        state.load_state_dict(ckpt[key])
    log(f"resuming from {path} at step {ckpt['step']}")
    return ckpt["step"]


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


class IntervalLog:
    """The log line of a training loop and its non-finite guard. Named loss parts are summed on the device every
    step; one all-reduce and one .item() per line, which reports their interval means over all ranks, lr, img/s (the
    first step, compilation and warm-up, excluded), MFU, peak memory and ETA. A NaN or inf in a logged part, or in
    the parts since the last line when a checkpoint is due, stops the run before anything more is written."""

    def __init__(self, cfg, process, log, name, total_steps, flops_per_image, causes, saved_step=None):
        self.cfg, self.process, self.log, self.name, self.total = cfg, process, log, name, total_steps
        self.flops, self.peak = flops_per_image, peak_flops(process.device)
        self.causes, self.saved_step = causes, saved_step
        self.sums, self.n, self.skipped, self.t0, self.step0 = {}, 0, 0, None, None

    def add(self, step, parts, skipped=0):
        for key, value in parts.items():
            self.sums[key] = self.sums.get(key, 0) + value.detach().float()
        self.n += 1
        self.skipped += skipped
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
        check_finite(step, dict(zip(keys, stats)), self.causes, self.saved_step)
        self.sums, self.n, self.skipped = {}, 0, 0

    def checkpoint(self, step, write):
        """The guard over the steps since the last line (one sync), then write() on rank 0."""
        if self.n:
            keys = list(self.sums)
            stats = self.process.all_reduce_mean(torch.stack([self.sums[k] for k in keys])).tolist()
            check_finite(step, dict(zip(keys, stats)), self.causes, self.saved_step)
        self.process.run0(write)
        self.saved_step = step


def mixed_seed(*keys):
    """The one seed function: a 32-bit seed mixed from integer keys (seed, step, stream, ...) by a SeedSequence
    (torch's CPU generator keeps only 32 bits of a seed, so keys are mixed rather than packed into one number)."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1)[0])


@functools.lru_cache(maxsize=4)
def _epoch_order(count, seed, epoch):
    return np.random.default_rng((seed, epoch)).permutation(count)


def batch_indices(step, batch_size, count, seed, drop_tail=False):
    """Global sample indices of a step's batch: a pure function of the step, so a resumed run needs no data state and
    any world size sees the same batches. Epoch e is a permutation seeded by (seed, e). drop_tail: whole batches
    within each epoch, its last count % batch_size samples skipped (train_ae); else the positions run on across
    epochs (train_dit)."""
    if drop_tail:
        epoch, s = divmod(step, count // batch_size)
        return _epoch_order(count, seed, epoch)[s * batch_size:(s + 1) * batch_size]
    positions = np.arange(step * batch_size, (step + 1) * batch_size)
    epochs = positions // count
    return np.concatenate([_epoch_order(count, seed, int(e))[positions[epochs == e] % count] for e in np.unique(epochs)])


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
    """write_fn(file) into path.tmp, fsync, then rename over path: a crash never leaves a half-written file, and a
    failed write (a full disk) removes the .tmp, keeps the old file and stops with one sentence."""
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


def check_finite(step, values, causes, saved_step=None):
    """The non-finite guard of every loop: values {name: float}, already synchronised (a log line's interval
    means, or the sums checked before a checkpoint). A NaN or inf stops the run before anything more is written."""
    bad = [f"{name} = {value}" for name, value in values.items() if not math.isfinite(value)]
    if bad:
        kept = (f"the checkpoint of step {saved_step} is kept as it was" if saved_step else
                "no checkpoint was written")
        fail(f"the steps up to {step} gave a non-finite {', '.join(bad)}, so the run stops; look for {causes}; "
             f"{kept}")


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


def lock_dir(path):
    """An owner file path/.lock ("pid@host") stops a second concurrent run on the same folder with one sentence. It
    is removed at exit; one whose process is gone (same host) is taken over. Call on rank 0 only."""
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
            if host == socket.gethostname() and pid.isdigit() and not _process_alive(int(pid)):
                os.remove(lock)  # stale: its process ended without cleaning up
                continue
            fail(f"{path} is in use by another run (process {owner}, see {lock}); wait for it, choose another "
                 f"folder, or delete {lock} if that run is gone")
        with os.fdopen(fd, "w") as f:
            f.write(me)
        _LOCKS.add(lock)
        return


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
    """Our checkpoint schema, from the raw (uncompiled, unwrapped) modules; call on rank 0 only."""
    ckpt = {"kind": kind, "model": model.state_dict(), "ema": None if ema is None else ema.state_dict(),
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
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"
