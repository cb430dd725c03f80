r"""
Sample a trained LightningDiT: Euler ODE / Euler-Maruyama SDE on the shifted time grid with interval CFG,
decoded by the PAE, written as an ADM-format .npz plus a PNG grid.

CPU smoke run:  python sample.py --preset tiny --ckpt out/tiny/dit/ckpt.pt
One GPU:        python sample.py --ckpt out/dit/ckpt.pt                     (50k balanced, 250-step ODE + CFG)
8 GPUs:         torchrun --nproc_per_node=8 sample.py --ckpt out/dit/ckpt.pt --fid_ref VIRTUAL_imagenet256_labeled.npz
Two nodes:      torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 \
                    sample.py --ckpt out/dit/ckpt.pt          (out must be on a file system all nodes share)
No guidance:    python sample.py --ckpt out/dit/ckpt.pt --sampler sde --cfg_scale 1
A grid:         python sample.py --ckpt out/dit/ckpt.pt --labels 88,207,360,387 --out grid.npz
800-epoch run:  add --preset 800ep (CFG 3.3 from t = 0.3)
Sweeps:         add --num_steps 10,15,25,45,250 --fid_ref REF --out table6, or --ckpt out/dit/snapshots (its *.pt)

Every sample's noise comes from its own global index and the seed, and every batch (one shard file) is computed the
same way on any rank, so the .npz is byte-identical for any number of processes. Finished shards are kept in
OUT_shards/ until the end, so a restarted run skips them. arr_0 and labels are stored in a seeded random order
(sample_order), as the release shuffles its samples. A sweep samples each (checkpoint, setting) row as a single run
would, scores it in-process and adds it to OUT/metrics.jsonl and OUT/metrics.md; its command also resumes it.
"""

# -----------------------------------------------------------------------------
# imports

import dataclasses
import glob
import itertools
import json
import math
import os
import shutil
import time
import zipfile
from contextlib import nullcontext
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import torch
from torchvision.utils import save_image

import fid
from losses import shift_time
from model import (DEVICES, Dist, atomic_write, bench_modes, build_dit, build_pae, cache_ae, check_output, count_flops,
                   dit_from_checkpoint, fail, format_duration, gpu_guard, lock_dir, mixed_seed, pae_from_checkpoint,
                   parse_config, print0, progress, read_latent_meta, report, time_calls)

# -----------------------------------------------------------------------------
# config


@dataclass
class Config:
    preset: str = "80ep"  # 80ep (CFG 2.5 from t = 0.25) | 800ep (CFG 3.3 from t = 0.3) | tiny (CPU smoke run)
    ckpt: str = "out/dit/ckpt.pt"  # DiT checkpoint written by train_dit.py, or a folder of them (a sweep over its *.pt)
    ae_ckpt: str = ""  # PAE checkpoint for decoding; empty = the one named in the latent cache's meta.json
    use_ema: bool = True  # sample with the EMA weights (the paper's); false = the raw weights
    out: str = "samples.npz"  # .npz (arr_0: uint8 NHWC, shuffled; labels) + .png grid; a sweep's folder (minus .npz)
    num_samples: int = 50_000  # class-balanced: num_samples / num_classes of every class
    labels: str = ""  # e.g. "88,207,360": per_label samples of each listed class instead (one grid row each)
    per_label: int = 8  # samples per class with --labels
    latent_stats: str = ""  # the release's latents_stats.pt (mean/std) for an authors' DiT file; "" = from the ckpt
    sampler: str = "ode"  # ode (Euler) | sde (Euler-Maruyama of the SBDM SDE, final mean step), as released; list: sweep
    num_steps: str = "250"  # time grid points = Euler steps + 1 (sde: + the mean step); paper 250; 10,15,25 = a sweep
    time_shift: float = 0.4  # grid t <- s*t / (1 + (s-1)*t), s = 0.4 (t = 1 is data)
    cfg_scale: str = "2.5"  # v = v_u + w*(v_c - v_u) on all channels; <= 1 = no guidance (as released); a list sweeps
    cfg_interval_start: str = "0.25"  # guidance only where the shifted t >= this, in [0, 1]; a comma list sweeps
    last_step_size: float = 0.004  # sde: the grid ends at 1 - this, then one noise-free (mean) step of this size
    dit_precision: str = "fp32"  # fp32 (TF32 matmuls on GPU, as released) | bf16 (autocast: faster, not the paper's)
    decode_precision: str = "bf16"  # bf16 (bf16 decoder weights + autocast, as released) | fp32
    to_uint8: str = "truncate"  # truncate (clamp(255x) cast, as the published numbers were made) | round
    batch_size: int = 250  # samples per batch on one process = one shard file; fixed, so results ignore the rank count
    seed: int = 0  # with the global sample index, it seeds each sample's noise
    compile: bool = True  # torch.compile the DiT (GPU only)
    overwrite: bool = False  # replace an existing OUT.npz / OUT.png (else refused); a sweep resumes, never replaces
    fid_ref: str = ""  # reference for fid.py's metrics, computed in-process at the end; empty = skip; a sweep needs it
    fid_weights: str = ""  # fid.py --weights: local Inception file ("random" for tests); empty = fid.py's default
    keep_samples: bool = False  # sweep: keep each row's .npz once scored (50,000 at 256 px are about 10 GB)
    bench: bool = False  # time one batch of the whole sampler on random weights (XL/1 + decoder L); no checkpoint needed
    device: str = "auto"  # auto (the GPU when there is one) | cpu | cuda

    CHOICES = {"dit_precision": ("fp32", "bf16"), "decode_precision": ("fp32", "bf16"), "to_uint8": fid.TO_UINT8,
               "device": DEVICES}
    POSITIVE = ("num_samples", "per_label", "batch_size", "time_shift", "last_step_size")
    UNIT = ("last_step_size",)
    NONNEGATIVE = ("seed",)


PRESETS = {"80ep": dict(cfg_scale="2.5", cfg_interval_start="0.25"),  # 80-epoch DiT (gFID 1.27)
           "800ep": dict(cfg_scale="3.3", cfg_interval_start="0.3"),  # 800-epoch DiT with qk_norm (gFID 1.03)
           "tiny": dict(ckpt="out/tiny/dit/ckpt.pt", out="out/tiny/samples.npz", labels="0,1,2,3,4,5,6,7", per_label=8,
                        num_steps="50", batch_size=16, compile=False)}  # 8 x 8: a grid row per tiny "colours" class
SWEEPABLE = {"sampler": (str, lambda v: v in ("ode", "sde"), "is unknown; valid values: ode, sde"),
             "num_steps": (int, lambda v: v >= 2, "is too small; the time grid needs at least 2 points"),
             "cfg_scale": (float, math.isfinite, "is not a finite number"),
             "cfg_interval_start": (float, lambda v: 0 <= v <= 1, "must lie between 0 and 1")}


def settings(cfg):
    """One Config (row) per setting: the comma lists of the SWEEPABLE fields (type, rule, message) multiplied out."""
    lists = {}
    for name, (kind, valid, rule) in SWEEPABLE.items():
        try:
            lists[name] = [kind(item) for item in str(getattr(cfg, name)).split(",")]
        except ValueError:
            fail(f"--{name} {getattr(cfg, name)!r} must be one {kind.__name__} or a comma list of them")
        for value in (v for v in lists[name] if not valid(v)):
            fail(f"--{name} {value} {rule}")
    return [dataclasses.replace(cfg, **dict(zip(lists, values))) for values in itertools.product(*lists.values())]


# -----------------------------------------------------------------------------
# samplers (t = 0 is noise, t = 1 is data: x_t = t*x1 + (1-t)*x0, v = x1 - x0). Both work in the dtype of x and
# follow the released transport code operation by operation; float64 reproduces the grid exactly.


def shifted_grid(start, end, num_steps, shift, dtype=torch.float64):
    """num_steps points uniform from start to end, shifted t <- s*t / (1 + (s-1)*t) (s < 1: denser near noise)."""
    return shift_time(torch.linspace(start, end, num_steps, dtype=dtype), shift)


def ode_sample(velocity, x, num_steps, shift):
    """Euler steps of dx/dt = v(x, t) on shift(linspace(0, 1, num_steps)); velocity(x, t) takes t as a float."""
    grid = shifted_grid(0.0, 1.0, num_steps, shift, x.dtype)
    for t, t_next in zip(grid[:-1], grid[1:]):
        x = x + (t_next - t) * velocity(x, t.item())
    return x


def sbdm_diffusion(t):
    """The released SDE's diffusion coefficient w(t) = (1 - t)/t (SBDM form of the linear path), as computed there."""
    return 1 / t * (1 - t) ** 2 + (1 - t)


def sbdm_drift(velocity, x, t):
    """v + w(t) * score with score = (t*v - x) / (1 - t), which is 2v - x/t; t a 0-d tensor in x's dtype."""
    v = velocity(x, t.item()).to(x.dtype)
    return v + sbdm_diffusion(t) * ((t * v - x) / ((1 - t) ** 2 + t * (1 - t)))  # w(t) * score


def sde_sample(velocity, x, num_steps, shift, noise, last_step_size=0.004, t_start=1e-5):
    """Euler-Maruyama of dx = [v + w*score] dt + sqrt(2w) dW (the ODE's marginals for any w) as released: the shifted
    linspace(t_start, 1 - h, num_steps), then a mean step h = last_step_size (drift at 1 - h); noise(i) = N(0, I)."""
    grid = shifted_grid(t_start, 1 - last_step_size, num_steps, shift, x.dtype)
    for i, (t, t_next) in enumerate(zip(grid[:-1], grid[1:])):
        dt = t_next - t
        dw = noise(i).to(x) * dt.sqrt()
        x = x + sbdm_drift(velocity, x, t) * dt + (2 * sbdm_diffusion(t)).sqrt() * dw  # the mean, then the noise
    return x + sbdm_drift(velocity, x, torch.tensor(1 - last_step_size, dtype=x.dtype)) * last_step_size


def guided_velocity(model, labels, cfg_scale, cfg_interval_start, null_class):
    """v(x, t) of the DiT in x's dtype; CFG v_u + w*(v_c - v_u) in one batch where w > 1, t >= cfg_interval_start."""
    both = torch.cat([labels, torch.full_like(labels, null_class)])  # conditional and unconditional, built once

    def velocity(x, t):
        if cfg_scale <= 1 or t < cfg_interval_start:  # guidance off (as released for w <= 1): conditional only
            return model(x, torch.full((len(x),), t, device=x.device), labels).to(x.dtype)
        v_cond, v_uncond = model(torch.cat([x, x]), torch.full((2 * len(x),), t, device=x.device),
                                 both).to(x.dtype).chunk(2)
        return v_uncond + cfg_scale * (v_cond - v_uncond)

    return velocity


def precision(device, name):
    """fp32 (TF32 matmuls on GPU when enabled) or a bf16 autocast, on any device."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if name == "bf16" else nullcontext()


# -----------------------------------------------------------------------------
# class-balanced, per-sample-seeded batches


def classes_of(indices, num_classes, chosen, per_label):
    """Class of each global sample index: round robin over all classes, or per_label in a row per chosen class."""
    return [chosen[i // per_label] for i in indices] if chosen else [i % num_classes for i in indices]


def sample_latents(model, indices, labels, shape, cfg, null_class, device):
    """Latents (B, C, H, W) of the given global sample indices, fp32; noise from one generator per sample."""
    (cfg,) = settings(cfg)  # a parsed Config of one setting (train_dit.py's grids) or a sweep's row
    generators = [torch.Generator().manual_seed(mixed_seed(cfg.seed, i)) for i in indices]  # one per (seed, index)

    def draw():  # (B, C, H, W), row b from sample b's own stream, so batching never changes a sample
        return torch.stack([torch.randn(shape, generator=g) for g in generators]).to(device)

    velocity = guided_velocity(model, torch.tensor(labels, device=device), cfg.cfg_scale, cfg.cfg_interval_start,
                               null_class)
    with precision(device, cfg.dit_precision):
        if cfg.sampler == "ode":
            return ode_sample(velocity, draw(), cfg.num_steps, cfg.time_shift)
        return sde_sample(velocity, draw(), cfg.num_steps, cfg.time_shift, lambda i: draw(), cfg.last_step_size)


def decode(pae, latent, decode_precision):
    """Images in [0, 1], fp32, unclamped; bf16 as released: bf16 weights (prepare_decoder) under a bf16 autocast."""
    with precision(latent.device, decode_precision):
        return pae.decode(latent).float()


def prepare_decoder(pae, decode_precision):
    for part in (pae.deprojector, pae.decoder) if decode_precision == "bf16" else ():
        part.to(torch.bfloat16)
    return pae


def save_npz(path, **arrays):
    """np.savez with fixed zip timestamps, written atomically: equal arrays give byte-equal files."""
    def write(f):
        with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
            for name, array in arrays.items():
                info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
                with archive.open(info, "w", force_zip64=True) as entry:
                    np.lib.format.write_array(entry, np.ascontiguousarray(array), allow_pickle=False)

    atomic_write(path, write)


def shard_settings(cfg, ckpt_step):
    """What a run's shards depend on: the settings that change what is computed, and the DiT's step."""
    how = ("overwrite", "device", "compile", "bench", "fid_ref", "fid_weights", "keep_samples")
    (cfg,) = settings(cfg)  # numbers, as a row holds them
    return {**{k: v for k, v in dataclasses.asdict(cfg).items() if k not in how}, "ckpt_step": ckpt_step}


def sample_order(seed, num_samples):
    """arr_0[order[i]] is sample i: seeded, shuffled as released, as the IS over splits of 5,000 depends on order."""
    return np.random.default_rng(seed).permutation(num_samples)


def latent_meta(ckpt, path, latent_stats=""):
    """Latent statistics and AE: --latent_stats (std / latent_multiplier), else the DiT's copy, else meta.json."""
    if latent_stats:
        try:
            stats = torch.load(latent_stats, map_location="cpu", weights_only=True)
            mean, std = stats["mean"].float().flatten(), stats["std"].float().flatten()
        except Exception as e:
            fail(f"--latent_stats {latent_stats} cannot be read as the release's latents_stats.pt with 'mean' and "
                 f"'std' tensors ({type(e).__name__})")
        std = std / ckpt.get("latent_multiplier", 1.0)  # the release samples (x * std) / multiplier + mean
        if not (torch.isfinite(mean).all() and torch.isfinite(std).all() and std.min() > 0):
            fail(f"--latent_stats {latent_stats} holds a NaN, an inf or a zero std")
        return {"mean": mean.tolist(), "std": std.tolist(), "ae_ckpt": ""}
    if ckpt.get("released"):
        fail(f"{path} is the authors' released DiT, which holds no latent statistics: pass --latent_stats (the "
             f"release's latents_stats.pt) and --ae_ckpt (the released PAE)")
    meta_path = os.path.join(ckpt["config"].get("latents", ""), "meta.json")
    stored, on_disk = ckpt.get("latent_meta"), read_latent_meta(meta_path) if os.path.isfile(meta_path) else None
    if stored and on_disk and any(stored[k] != on_disk[k] for k in ("mean", "std", "ae_ckpt")):
        print0(f"warning: {meta_path} changed since {path} was trained (re-encoded?); using the statistics and AE "
               f"the DiT was trained with")
    if stored or on_disk:
        return stored or on_disk
    fail(f"no latent statistics for {path}: {meta_path} does not exist and the checkpoint holds no copy; "
         f"restore the latent cache the DiT was trained on")


# -----------------------------------------------------------------------------
# --bench: the sampler at the paper's sizes on random weights


def bench(cfg, process):
    """samples/s of one batch through the DiT's grid and the decoder on random weights, compile off and on."""
    tiny = cfg.preset == "tiny"
    torch.manual_seed(cfg.seed)
    pae = prepare_decoder(build_pae(preset="tiny" if tiny else None, pretrained=False).to(process.device).eval(),
                          cfg.decode_precision)
    shape, num_classes = (32, pae.vfm.grid, pae.vfm.grid), 1000
    raw = build_dit("tiny/1" if tiny else "XL/1", shape[0], shape[1], num_classes=num_classes).to(process.device).eval()
    indices, labels = list(range(cfg.batch_size)), [i % num_classes for i in range(cfg.batch_size)]
    grid = shifted_grid(0.0, 1.0, cfg.num_steps, cfg.time_shift).tolist()[:-1] if cfg.sampler == "ode" else \
        [0.0] * cfg.num_steps  # the SDE never guides in the paper's protocol; its passes are counted alike
    passes = sum(2 if cfg.cfg_scale > 1 and t >= cfg.cfg_interval_start else 1 for t in grid)  # per sample
    x, t, y = (v.to(process.device) for v in (torch.zeros(1, *shape), torch.full((1,), 0.5), torch.zeros(1).long()))
    flops = passes * count_flops(lambda: raw(x, t, y)) + count_flops(lambda: decode(pae, x, cfg.decode_precision))
    for compiled in bench_modes(cfg):
        model = torch.compile(raw) if compiled else raw

        def one_batch():
            with torch.no_grad():
                latent = sample_latents(model, indices, labels, shape, cfg, num_classes, process.device)
                return decode(pae, latent, cfg.decode_precision)

        rate = cfg.batch_size / time_calls(one_batch, 1, process.device, warmup=1)
        report(f"sample {'tiny/1' if tiny else 'XL/1'} + decoder, batch {cfg.batch_size}, {cfg.num_steps}-point "
               f"{cfg.sampler} grid, CFG {cfg.cfg_scale} from t = {cfg.cfg_interval_start}, DiT {cfg.dit_precision}",
               rate, "sample", flops, process.device, compiled, f"{passes} DiT passes per sample, {flops / 1e12:.2f} TFLOP "
               f"per sample | 50,000 samples on 8 such devices: {format_duration(50_000 / (8 * rate))}")


# -----------------------------------------------------------------------------
# runs: one checkpoint and setting in restartable shards merged into OUT.npz; sweeps: scored rows of them


def load_sampler(cfg, path, process):
    """A checkpoint's DiT (EMA by default) on the device, latent statistics, PAE decoder, samples to draw and epoch."""
    model, ckpt = dit_from_checkpoint(path, process.device, use_ema=cfg.use_ema)  # no GPU: on the CPU, guarded next
    args = ckpt["model_args"]
    gpu_guard(cfg.device, not args["preset"].startswith("tiny/") and f"sampling LightningDiT-{args['preset']}")
    model = torch.compile(model) if cfg.compile and process.device.type == "cuda" else model
    meta = latent_meta(ckpt, path, cfg.latent_stats)
    ae_path, own = cache_ae(meta, cfg.ae_ckpt)
    if ae_path is None:
        fail(f"the AE {meta.get('ae_ckpt')!r} named in the latent meta.json does not exist; pass --ae_ckpt PATH")
    pae = prepare_decoder(pae_from_checkpoint(ae_path, process.device, decode_only=True), cfg.decode_precision)
    if not own:
        print0(f"warning: decoding with --ae_ckpt {ae_path}, which is not the AE the cache was encoded with")
    channels, size, num_classes = args["in_channels"], args["input_size"], args["num_classes"]
    if pae.vfm.grid != size:
        fail(f"the AE {ae_path} decodes {pae.vfm.grid}x{pae.vfm.grid} latents but {path} models {size}x{size}; "
             f"pass the matching --ae_ckpt")
    if len(meta["mean"]) != channels:
        fail(f"the latent statistics have {len(meta['mean'])} channels but {path} models {channels}")
    chosen = [int(c) for c in cfg.labels.split(",") if c.strip().isdigit()] if cfg.labels else []
    if len(chosen) != len(cfg.labels.split(",")) * bool(cfg.labels) or any(c >= num_classes for c in chosen):
        fail(f"--labels {cfg.labels} has a class outside 0..{num_classes - 1}, the classes of this DiT" + (
            "; --preset tiny asks for 0-7, so pass --labels (\"\" = all classes in turn)" * (cfg.preset == "tiny")))
    if not chosen and cfg.num_samples % num_classes:
        fail(f"--num_samples {cfg.num_samples} is not a positive multiple of the {num_classes} classes; "
             f"class-balanced sampling needs the same count of every class")
    seen = ckpt.get("images_seen", ckpt["step"] * ckpt["config"].get("batch_size", math.nan))  # snapshots count them
    mean, std = (torch.tensor(meta[k], device=process.device).view(1, -1, 1, 1) for k in ("mean", "std"))
    return SimpleNamespace(model=model, step=ckpt["step"], pae=pae, ae_path=ae_path, num_classes=num_classes,
                           shape=(channels, size, size), mean=mean, std=std, chosen=chosen, epoch=seen / meta["count"]
                           if meta.get("count") and math.isfinite(seen) else None,
                           num_samples=len(chosen) * cfg.per_label if chosen else cfg.num_samples)


def claim_folder(folder, name, definition, process):
    """Rank 0 locks `folder` and records a run's settings in folder/name; a folder holding others is refused."""
    path = os.path.join(folder, name)
    with open(path) if os.path.isfile(path) else nullcontext() as f:  # None the first time
        if f and json.load(f) != definition:
            fail(f"{folder} holds a run with other settings (see {name}); rerun that command to resume it, "
                 f"delete the folder or choose another --out")
    process.barrier()  # every rank has read it before rank 0 writes

    def claim():
        lock_dir(folder)
        atomic_write(path, lambda f: f.write(json.dumps(definition, indent=2).encode()))

    process.run0(claim)


def sample_npz(cfg, snap, process):
    """One setting's samples (cfg: a row) into cfg.out and its grid via one shard per batch, kept until the merge."""
    num_samples, shard_dir = snap.num_samples, os.path.splitext(cfg.out)[0] + "_shards"
    num_shards = -(-num_samples // cfg.batch_size)
    shard_paths = [os.path.join(shard_dir, f"{s:06d}.npz") for s in range(num_shards)]
    claim_folder(shard_dir, "settings.json", shard_settings(cfg, snap.step), process)
    todo = [s for s in range(num_shards) if not os.path.isfile(shard_paths[s])]
    process.barrier()  # every rank has listed the unfinished shards before any new one appears
    print0(f"{cfg.out}: {num_samples} samples in {num_shards} shards of {cfg.batch_size}; {num_shards - len(todo)} "
           f"done already; {process.world_size} process(es)")

    # --- loop: this rank's share of the unfinished shards, each written as soon as it is done
    mine, t0 = todo[process.rank::process.world_size], time.time()
    for s in progress(mine, process.master, "sampling", "shard"):
        indices = range(s * cfg.batch_size, min((s + 1) * cfg.batch_size, num_samples))
        labels = classes_of(indices, snap.num_classes, snap.chosen, cfg.per_label)
        with torch.no_grad():
            latent = sample_latents(snap.model, indices, labels, snap.shape, cfg, snap.num_classes, process.device)
            images = decode(snap.pae, latent * snap.std + snap.mean, cfg.decode_precision)  # de-normalised per channel
        if not torch.isfinite(images).all():  # one sync per shard; black images would pass for results
            fail(f"the samples of shard {s} are NaN or inf; the DiT weights in {cfg.ckpt}, the AE {snap.ae_path} or "
                 f"the latent statistics hold a NaN (or a zero std); nothing of this shard was written")
        save_npz(shard_paths[s], arr_0=fid.to_uint8(images, cfg.to_uint8).cpu().numpy(),
                 labels=np.array(labels, dtype=np.int64))
    done, elapsed = sum(min((s + 1) * cfg.batch_size, num_samples) - s * cfg.batch_size for s in mine), time.time() - t0
    print0(f"rank 0: {done} samples in {elapsed:.1f}s ({done / max(elapsed, 1e-9):.2f} samples/s per process)")
    process.barrier()

    def merge():  # rank 0: each shard straight to its places in the shuffled order (no second copy of 50,000)
        order, size = sample_order(cfg.seed, num_samples), snap.pae.image_size
        images, labels = np.empty((num_samples, size, size, 3), np.uint8), np.empty(num_samples, np.int64)
        for s in range(num_shards):
            with np.load(shard_paths[s]) as shard:
                places = order[s * cfg.batch_size:(s + 1) * cfg.batch_size]
                images[places], labels[places] = shard["arr_0"], shard["labels"]
        save_npz(cfg.out, arr_0=images, labels=labels)
        first = order[:len(snap.chosen) * cfg.per_label if snap.chosen else 64]  # the grid: samples 0, 1, ...
        grid, png = torch.from_numpy(images[first]).permute(0, 3, 1, 2), os.path.splitext(cfg.out)[0] + ".png"
        atomic_write(png, lambda f: save_image(grid.float() / 255, f, format="png",
                                               nrow=cfg.per_label if snap.chosen else 8))
        shutil.rmtree(shard_dir)
        print0(f"wrote {cfg.out} (arr_0 {images.shape} uint8, labels) and {png}")

    process.run0(merge)


def markdown_table(records):  # checkpoints by file name, floats to 4 significant digits
    keys = [k for k in records[0] if k != "seconds"]
    rows = [[os.path.basename(r[k]) if k == "ckpt" else "-" if r[k] is None else f"{r[k]:.4g}"
             if isinstance(r[k], float) else str(r[k]) for k in keys] for r in records]
    return "".join("| " + " | ".join(cells) + " |\n" for cells in [keys, ["---"] * len(keys), *rows])


def sweep(cfg, rows, paths, folder, net, ref, process):
    """Each (checkpoint, setting) row sampled as a single run would, scored and recorded; recorded rows are skipped."""
    records_path, key = os.path.join(folder, "metrics.jsonl"), ("ckpt", "step", *SWEEPABLE)
    with open(records_path) if os.path.isfile(records_path) else nullcontext([]) as lines:  # [] the first time
        records = [json.loads(line) for line in lines]
    for path in paths:
        snap = load_sampler(cfg, path, process)
        for row in rows:
            record = {"ckpt": path, "step": snap.step, "epoch": snap.epoch, **{k: getattr(row, k) for k in SWEEPABLE}}
            if any(all(r[k] == record[k] for k in key) for r in records):
                continue
            name = f"{os.path.basename(path)[:-3]}_step{snap.step}_{row.sampler}{row.num_steps}_cfg{row.cfg_scale:g}_"
            row = dataclasses.replace(row, ckpt=path, out=f"{folder}/{name}from{row.cfg_interval_start:g}.npz")
            t0 = time.time()
            if not os.path.isfile(row.out):  # else merged (complete) before a kill: its name holds ckpt, step, setting
                sample_npz(row, snap, process)
            metrics = fid.compute_metrics(row.out, ref, net, cfg.batch_size)
            records.append({**record, **metrics, "seconds": round(time.time() - t0, 1)})
            fid.print_metrics(metrics)

            def finish():  # rank 0: the row's record first, then its samples may go
                atomic_write(records_path, lambda f: f.write("".join(json.dumps(r) + "\n" for r in records).encode()))
                atomic_write(os.path.join(folder, "metrics.md"), lambda f: f.write(markdown_table(records).encode()))
                if not cfg.keep_samples:
                    os.remove(row.out)

            process.run0(finish)


# -----------------------------------------------------------------------------


def main(argv=None):
    # --- setup: every check before anything is loaded or written
    cfg = parse_config(Config, argv, PRESETS)
    rows = settings(cfg)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # the release samples with TF32
    if cfg.bench:
        gpu_guard(cfg.device, cfg.preset != "tiny" and "sampling LightningDiT-XL/1 with the decoder L")
        process = Dist(cfg.device)
        for row in rows:
            bench(row, process)
        return process.teardown()
    is_sweep, inputs = os.path.isdir(cfg.ckpt) or len(rows) > 1, (cfg.ckpt, cfg.ae_ckpt, cfg.latent_stats, cfg.fid_ref)
    paths = [cfg.ckpt] if not os.path.isdir(cfg.ckpt) else sorted(glob.glob(os.path.join(cfg.ckpt, "*.pt")),
                                                                   key=lambda p: (len(p), p))  # snapshots: step order
    if not paths:
        fail(f"--ckpt {cfg.ckpt} is a folder without .pt checkpoints; give a checkpoint or train_dit.py's snapshots/")
    folder = cfg.out.removesuffix(".npz")  # a sweep's
    if is_sweep and not cfg.fid_ref:
        fail(f"a sweep ({len(paths)} checkpoint(s) x {len(rows)} settings) scores each row: pass --fid_ref REF.npz")
    if cfg.fid_ref:
        fid.check_source(cfg.fid_ref, "--fid_ref")
    for path in [os.path.join(folder, "sweep.json")] if is_sweep else [cfg.out, os.path.splitext(cfg.out)[0] + ".png"]:
        check_output(path, cfg.overwrite or is_sweep, inputs=inputs)  # a sweep resumes; a single run never replaces
    process = Dist(cfg.device)
    print0(json.dumps(dataclasses.asdict(cfg), indent=2))
    if is_sweep:  # the sweep's definition, which a restart must repeat
        how = ("overwrite", "device", "compile", "bench", "keep_samples")
        claim_folder(folder, "sweep.json", {k: v for k, v in dataclasses.asdict(cfg).items() if k not in how}, process)
    net = fid.load_inception(cfg.fid_weights or None, process.device, "--fid_weights") if cfg.fid_ref else None
    ref = fid.statistics(cfg.fid_ref, net, cfg.batch_size) if cfg.fid_ref else None  # once, before any sampling

    # --- sample (and score): one run, or the sweep's rows
    if is_sweep:
        sweep(cfg, rows, paths, folder, net, ref, process)
    else:
        sample_npz(rows[0], load_sampler(cfg, cfg.ckpt, process), process)
        if cfg.fid_ref:
            fid.print_metrics(fid.compute_metrics(cfg.out, ref, net, cfg.batch_size))
    process.teardown()


if __name__ == "__main__":
    main()
