"""
PAE reference implementation: every network, plus a short section of shared plumbing.

Sections (each marked with a banner):
  1. LightningDiT        (SPEC §7)  the flow-matching generator trained on PAE latents
  2. shared plumbing                config parsing, dist setup/teardown, print0, checkpoints, FLOPs
"""

import argparse
import dataclasses
import json
import math
import os
import sys
from contextlib import nullcontext

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint as activation_checkpoint

# -----------------------------------------------------------------------------
# 1. LightningDiT (SPEC §7)


def sincos_2d(dim, grid):
    """Fixed 2-D sin-cos position embedding, (grid*grid, dim): first half rows, second half columns."""
    assert dim % 4 == 0, "sin-cos embedding width must be divisible by 4"
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    pos = torch.arange(grid, dtype=torch.float64)
    rows, cols = torch.meshgrid(pos, pos, indexing="ij")

    def embed(p):  # (N,) -> (N, dim/2)
        angles = p.reshape(-1, 1) * omega
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([embed(rows), embed(cols)], dim=1).float()


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

    def forward(self, x):  # computed in fp32 (SPEC §7)
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
        h = self.x_embed(x).flatten(2).transpose(1, 2) + self.pos_embed  # (B, N, D)
        c = self.t_embed(timestep_embedding(t)) + self.y_embed(y)  # (B, D)
        rope = (self.rope_cos, self.rope_sin)
        for block in self.blocks:
            if self.grad_ckpt and self.training:
                h = activation_checkpoint(block, h, c, rope, use_reentrant=False)
            else:
                h = block(h, c, rope)
        shift, scale = self.final_adaLN(c).unsqueeze(1).chunk(2, dim=-1)
        h = self.final_linear(self.final_norm(h) * (1 + scale) + shift)  # (B, N, p*p*C)
        p, g = self.patch, self.grid
        h = h.view(B, g, g, p, p, C).permute(0, 5, 1, 3, 2, 4)
        return h.reshape(B, C, g * p, g * p)


DIT_PRESETS = {  # name: (hidden, depth, heads), SPEC §7
    "tiny": (64, 2, 4), "S": (384, 12, 6), "B": (768, 12, 12), "L": (1024, 24, 16), "XL": (1152, 28, 16),
}


def build_dit(preset, in_channels=32, input_size=16, **overrides):
    """preset: 'XL/1', 'B/2', ... (size/patch) -> LightningDiT. overrides: num_classes, qk_norm, grad_ckpt."""
    size, _, patch = preset.partition("/")
    if size not in DIT_PRESETS or patch not in ("1", "2"):
        raise SystemExit(f"error: unknown DiT model {preset!r}; use SIZE/PATCH with SIZE in "
                         f"{', '.join(DIT_PRESETS)} and PATCH 1 or 2 (e.g. XL/1)")
    dim, depth, heads = DIT_PRESETS[size]
    return LightningDiT(in_channels, input_size, int(patch), dim, depth, heads, **overrides)


# -----------------------------------------------------------------------------
# 2. shared plumbing: config parsing, dist setup/teardown, print0, checkpoints, FLOPs

CKPT_VERSION = 1


def fail(message):
    """A user-caused error: one sentence on stderr, exit status 1, no traceback."""
    raise SystemExit(f"error: {message}")


def _parse_bool(text):
    table = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
    if text.lower() not in table:
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return table[text.lower()]


def parse_config(cls, argv=None, presets=None):
    """Dataclass -> argparse. `--preset NAME` applies presets[NAME] first; explicit flags win over it."""
    parser = argparse.ArgumentParser(description=sys.modules[cls.__module__].__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    for field in dataclasses.fields(cls):
        kind = field.type if isinstance(field.type, type) else eval(field.type)
        if kind is bool:
            parser.add_argument(f"--{field.name}", type=_parse_bool, nargs="?", const=True,
                                default=argparse.SUPPRESS, help=f"(default: {field.default})")
        else:
            parser.add_argument(f"--{field.name}", type=kind, default=argparse.SUPPRESS,
                                help=f"(default: {field.default!r})")
    given = vars(parser.parse_args(argv))
    values = {}
    preset = given.get("preset", getattr(cls, "preset", None))
    if presets is not None and preset is not None:
        if preset not in presets:
            fail(f"unknown preset {preset!r}; valid presets: {', '.join(presets)}")
        values.update(presets[preset])
    values.update(given)
    return cls(**values)


def save_config(cfg, out_dir):
    os.makedirs(out_dir, exist_ok=True)
    atomic_write(os.path.join(out_dir, "config.json"), lambda f: f.write(json.dumps(dataclasses.asdict(cfg), indent=2).encode()))


class Dist:
    """rank / local_rank / world_size / device of this process; `python x.py` is a world of one."""

    def __init__(self):
        self.rank = int(os.environ.get("RANK", 0))
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        self.world_size = int(os.environ.get("WORLD_SIZE", 1))
        if torch.cuda.is_available():
            self.device = torch.device("cuda", self.local_rank)  # LOCAL_RANK, never RANK (multi-node)
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
        if self.world_size > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo", device_id=
                                    self.device if self.device.type == "cuda" else None)
        self.master = self.rank == 0

    def barrier(self):
        if self.world_size > 1:
            dist.barrier()

    def all_reduce_mean(self, tensor):
        if self.world_size > 1:
            dist.all_reduce(tensor)
            tensor /= self.world_size
        return tensor

    def teardown(self):
        if self.world_size > 1 and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


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
    """write_fn(file) into path.tmp, fsync, then rename over path: a crash never leaves a half-written file."""
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        write_fn(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(path, kind, model, config, step, ema=None, opt=None, **extras):
    """Schema of SPEC §3.2, from the raw (uncompiled, unwrapped) modules; call on rank 0 only."""
    ckpt = {"kind": kind, "model": model.state_dict(), "ema": None if ema is None else ema.state_dict(),
            "opt": None if opt is None else opt.state_dict(), "step": step,
            "config": dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config),
            "version": CKPT_VERSION, **extras}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write(path, lambda f: torch.save(ckpt, f))


def load_checkpoint(path, kind):
    """Load a checkpoint of the expected kind, or stop with one sentence saying what is wrong."""
    if not os.path.isfile(path):
        fail(f"checkpoint {path} does not exist; check the path (or drop --resume to start a new run)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        fail(f"checkpoint {path} cannot be read ({type(e).__name__}); it is truncated, corrupt or not a "
             f"PAE checkpoint")
    if not isinstance(ckpt, dict) or "kind" not in ckpt:
        fail(f"{path} is not a PAE checkpoint (no 'kind' field)")
    if ckpt["kind"] != kind:
        fail(f"checkpoint {path} is a {ckpt['kind']!r} checkpoint, but a {kind!r} checkpoint is needed here")
    return ckpt


@torch.no_grad()
def ema_update(ema, model, decay):
    ema_params = list(ema.parameters())
    params = [p for p in model.parameters()]
    torch._foreach_lerp_(ema_params, params, 1 - decay)


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


def count_flops(fn):
    """FLOPs of one call of fn() (forward + backward if fn does both), by torch's FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def format_duration(seconds):
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"
