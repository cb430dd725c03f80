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

Every sample's noise comes from its own global index and the seed, and every batch (one shard file) is
computed the same way on any rank, so the .npz is byte-identical for any number of processes. Finished
shards are kept in OUT_shards/ until the end, so a restarted run skips them.
"""

# -----------------------------------------------------------------------------
# imports

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
from torchvision.utils import save_image

from losses import shift_time
from model import (DEVICES, Dist, atomic_write, bench_modes, build_dit, build_pae, cache_ae, check_output, count_flops,
                   dit_from_checkpoint, fail, format_duration, gpu_guard, lock_dir, mixed_seed, pae_from_checkpoint,
                   parse_config, print0, progress, read_latent_meta, report, time_calls)

# -----------------------------------------------------------------------------
# config


@dataclass
class Config:
    preset: str = "80ep"  # 80ep (CFG 2.5 from t = 0.25) | 800ep (CFG 3.3 from t = 0.3) | tiny (CPU smoke run)
    ckpt: str = "out/dit/ckpt.pt"  # DiT checkpoint written by train_dit.py
    ae_ckpt: str = ""  # PAE checkpoint for decoding; empty = the one named in the latent cache's meta.json
    use_ema: bool = True  # sample with the EMA weights (the paper's); false = the raw weights
    out: str = "samples.npz"  # output .npz (arr_0 uint8 NHWC, labels); the grid goes next to it as .png
    num_samples: int = 50_000  # class-balanced: num_samples / num_classes of every class
    labels: str = ""  # e.g. "88,207,360": per_label samples of each listed class instead (one grid row each)
    per_label: int = 8  # samples per class with --labels
    latent_stats: str = ""  # the release's latents_stats.pt (mean/std) for an authors' DiT file; "" = from the ckpt
    sampler: str = "ode"  # ode (Euler) | sde (Euler-Maruyama of the SBDM SDE, final mean step), as released
    num_steps: int = 250  # points of the time grid = num_steps - 1 Euler steps (sde: plus the mean step); paper 250
    time_shift: float = 0.4  # grid t <- s*t / (1 + (s-1)*t), s = 0.4 (t = 1 is data)
    cfg_scale: float = 2.5  # v = v_u + w*(v_c - v_u) on all channels; <= 1 = no guidance (as released)
    cfg_interval_start: float = 0.25  # guidance only where the shifted t >= this
    last_step_size: float = 0.004  # sde: the grid ends at 1 - this, then one noise-free (mean) step of this size
    dit_precision: str = "fp32"  # fp32 (TF32 matmuls on GPU, as released) | bf16 (autocast: faster, not the paper's)
    decode_precision: str = "bf16"  # bf16 (bf16 decoder weights + autocast, as released) | fp32
    to_uint8: str = "truncate"  # truncate (clamp(255x) cast, as the published numbers were made) | round
    batch_size: int = 250  # samples per batch on one process = one shard file; fixed, so results ignore the rank count
    seed: int = 0  # with the global sample index, it seeds each sample's noise
    compile: bool = True  # torch.compile the DiT (GPU only)
    overwrite: bool = False  # replace an existing OUT.npz / OUT.png (else refused)
    fid_ref: str = ""  # reference .npz for fid.py, run on the result at the end; empty = skip
    fid_weights: str = ""  # fid.py --weights: local Inception file ("random" for tests); empty = fid.py's default
    bench: bool = False  # time one batch of the whole sampler on random weights (XL/1 + decoder L); no checkpoint needed
    device: str = "auto"  # auto (the GPU when there is one) | cpu | cuda

    CHOICES = {"sampler": ("ode", "sde"), "dit_precision": ("fp32", "bf16"), "decode_precision": ("fp32", "bf16"),
               "to_uint8": ("truncate", "round"), "device": DEVICES}
    POSITIVE = ("num_samples", "per_label", "batch_size", "time_shift", "last_step_size")
    UNIT = ("last_step_size", "cfg_interval_start")
    NONNEGATIVE = ("seed",)


PRESETS = {
    "80ep": dict(cfg_scale=2.5, cfg_interval_start=0.25),  # 80-epoch DiT (gFID 1.27)
    "800ep": dict(cfg_scale=3.3, cfg_interval_start=0.3),  # 800-epoch DiT with qk_norm (gFID 1.03)
    "tiny": dict(ckpt="out/tiny/dit/ckpt.pt", out="out/tiny/samples.npz", labels="0,1,2,3,4,5,6,7", per_label=8,
                 num_steps=50, batch_size=16, compile=False),  # 8 x 8: one row per class of the tiny "colours" data
}

# -----------------------------------------------------------------------------
# samplers (t = 0 is noise, t = 1 is data: x_t = t*x1 + (1-t)*x0, v = x1 - x0). Both work in the dtype of x and
# follow the released transport code operation by operation; float64 reproduces the grid exactly.


def shifted_grid(start, end, num_steps, shift, dtype=torch.float64):
    """num_steps points uniformly from start to end, each shifted t <- s*t / (1 + (s-1)*t) (s < 1: denser near noise)."""
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
    score = (t * v - x) / ((1 - t) ** 2 + t * (1 - t))
    return v + sbdm_diffusion(t) * score


def sde_sample(velocity, x, num_steps, shift, noise, last_step_size=0.004, t_start=1e-5):
    """Euler-Maruyama of dx = [v + w*score] dt + sqrt(2w) dW (the ODE's marginals for any w) as released: w(t) =
    (1-t)/t, grid shift(linspace(1e-5, 1 - last_step_size, num_steps)), then one noise-free mean step of size
    last_step_size whose drift is taken at t = 1 - last_step_size (unshifted). noise(i) = step i's N(0, I) draw."""
    grid = shifted_grid(t_start, 1 - last_step_size, num_steps, shift, x.dtype)
    for i, (t, t_next) in enumerate(zip(grid[:-1], grid[1:])):
        dt = t_next - t
        dw = noise(i).to(x) * dt.sqrt()
        x_mean = x + sbdm_drift(velocity, x, t) * dt
        x = x_mean + (2 * sbdm_diffusion(t)).sqrt() * dw
    t_last = torch.tensor(1 - last_step_size, dtype=x.dtype)
    return x + sbdm_drift(velocity, x, t_last) * last_step_size


def guided_velocity(model, labels, cfg_scale, cfg_interval_start, null_class):
    """v(x, t) of the DiT with CFG v_u + w*(v_c - v_u) where w > 1 and t >= cfg_interval_start (both passes in one
    batch), in x's dtype; the caller chooses the precision (e.g. a bf16 autocast around the sampler)."""

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
    if chosen:
        return [chosen[i // per_label] for i in indices]
    return [i % num_classes for i in indices]


def sample_latents(model, indices, labels, shape, cfg, null_class, device):
    """Latents (B, C, H, W) of the given global sample indices, fp32; noise from one generator per sample."""
    generators = [torch.Generator().manual_seed(mixed_seed(cfg.seed, i))  # one generator per sample: (seed, index)
                  for i in indices]

    def draw():  # (B, C, H, W), row b from sample b's own stream, so batching never changes a sample
        return torch.stack([torch.randn(shape, generator=g) for g in generators]).to(device)

    velocity = guided_velocity(model, torch.tensor(labels, device=device), cfg.cfg_scale, cfg.cfg_interval_start,
                               null_class)
    with precision(device, cfg.dit_precision):
        if cfg.sampler == "ode":
            return ode_sample(velocity, draw(), cfg.num_steps, cfg.time_shift)
        return sde_sample(velocity, draw(), cfg.num_steps, cfg.time_shift, lambda i: draw(), cfg.last_step_size)


def decode(pae, latent, decode_precision):
    """Images in [0, 1] (not clamped, fp32). bf16 as released: the decoder's weights are cast to bf16 once
    (prepare_decoder) and run under a bf16 autocast; the de-normalisation by the VFM mean/std stays fp32."""
    with precision(latent.device, decode_precision):
        return pae.decode(latent).float()


def prepare_decoder(pae, decode_precision):
    if decode_precision == "bf16":
        pae.deprojector.to(torch.bfloat16)
        pae.decoder.to(torch.bfloat16)
    return pae


def to_uint8(images01, mode="truncate"):
    """(B, 3, H, W) in [0, 1] -> (B, H, W, 3) uint8: clamp(255x, 0, 255) truncated (as released, and as the
    published FIDs were computed) or rounded (unbiased, +0.5/255 brighter on average)."""
    scaled = (images01.float() * 255).clamp(0, 255)
    return (scaled.round() if mode == "round" else scaled).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


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
    """What a run's shards depend on: every setting except those that change how, not what, is computed, plus the
    DiT's step (a DiT that trained on since an interrupted run gets fresh shards)."""
    how = ("overwrite", "device", "compile", "bench", "fid_ref", "fid_weights")
    return {**{k: v for k, v in dataclasses.asdict(cfg).items() if k not in how}, "ckpt_step": ckpt_step}


def latent_meta(ckpt, path, latent_stats=""):
    """Latent statistics and AE path: the release's latents_stats.pt when given (mean and std of shape (1, C, 1, 1);
    its DiT's latent_multiplier folded into std), else the copy stored in the DiT checkpoint, which is what the DiT
    was trained on; the latent cache's meta.json only for checkpoints without a copy."""
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
    stored = ckpt.get("latent_meta")
    on_disk = None
    if os.path.isfile(meta_path):
        on_disk = read_latent_meta(meta_path)
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
    """samples/s of one batch through the whole sampler (the DiT over the grid with interval CFG, then the bf16
    decoder) on random weights, compile off and on, and the projected time of 50,000 samples on 8 such GPUs."""
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
    x, t, y = torch.zeros(1, *shape, device=process.device), torch.full((1,), 0.5, device=process.device), torch.zeros(
        1, dtype=torch.long, device=process.device)
    flops = passes * count_flops(lambda: raw(x, t, y)) + count_flops(lambda: decode(pae, x, cfg.decode_precision))
    for compiled in bench_modes(cfg):
        model = torch.compile(raw) if compiled else raw

        def one_batch():
            with torch.no_grad():
                latent = sample_latents(model, indices, labels, shape, cfg, num_classes, process.device)
                return decode(pae, latent, cfg.decode_precision)

        seconds = time_calls(one_batch, 1, process.device, warmup=1)
        rate = cfg.batch_size / seconds
        report(f"sample {'tiny/1' if tiny else 'XL/1'} + decoder, batch {cfg.batch_size}, {cfg.num_steps}-point "
               f"{cfg.sampler} grid, CFG {cfg.cfg_scale} from t = {cfg.cfg_interval_start}, DiT {cfg.dit_precision}",
               rate, "sample", flops, process.device, compiled, f"{passes} DiT passes per sample, {flops / 1e12:.2f} TFLOP "
               f"per sample | 50,000 samples on 8 such devices: {format_duration(50_000 / (8 * rate))}")


# -----------------------------------------------------------------------------


def main(argv=None):
    # --- setup
    cfg = parse_config(Config, argv, PRESETS)
    if cfg.num_steps < 2:
        fail(f"--num_steps {cfg.num_steps} is too small; the time grid needs at least 2 points")
    if cfg.bench:
        gpu_guard(cfg.device, cfg.preset != "tiny" and "sampling LightningDiT-XL/1 with the decoder L")
        process = Dist(cfg.device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # as the release samples
        bench(cfg, process)
        return process.teardown()
    png = os.path.splitext(cfg.out)[0] + ".png"
    for path in (cfg.out, png):  # before anything is loaded: never over an input, never a finished result silently
        check_output(path, cfg.overwrite, inputs=(cfg.ckpt, cfg.ae_ckpt, cfg.latent_stats, cfg.fid_ref))
    process = Dist(cfg.device)
    torch.backends.cuda.matmul.allow_tf32 = True  # the release samples its fp32 DiT with TF32 matmuls
    torch.backends.cudnn.allow_tf32 = True
    print0(json.dumps(dataclasses.asdict(cfg), indent=2))

    # --- model: DiT (EMA by default), latent statistics and the PAE decoder, all found through the checkpoint
    model, ckpt = dit_from_checkpoint(cfg.ckpt, use_ema=cfg.use_ema)
    args = ckpt["model_args"]
    gpu_guard(cfg.device, not args["preset"].startswith("tiny/") and f"sampling LightningDiT-{args['preset']}")
    model = model.to(process.device)
    if cfg.compile and process.device.type == "cuda":
        model = torch.compile(model)
    meta = latent_meta(ckpt, cfg.ckpt, cfg.latent_stats)
    ae_path, own = cache_ae(meta, cfg.ae_ckpt)
    if ae_path is None:
        fail(f"the AE {meta.get('ae_ckpt')!r} named in the latent meta.json does not exist; pass --ae_ckpt PATH")
    pae = prepare_decoder(pae_from_checkpoint(ae_path, process.device, decode_only=True), cfg.decode_precision)
    if not own:
        print0(f"warning: decoding with --ae_ckpt {ae_path}, which is not the AE the cache was encoded with")
    channels, size, num_classes = args["in_channels"], args["input_size"], args["num_classes"]
    if pae.vfm.grid != size:
        fail(f"the AE {ae_path} decodes {pae.vfm.grid}x{pae.vfm.grid} latents but {cfg.ckpt} models {size}x{size}; "
             f"pass the matching --ae_ckpt")
    if len(meta["mean"]) != channels:
        fail(f"the latent statistics have {len(meta['mean'])} channels but {cfg.ckpt} models {channels}")
    mean = torch.tensor(meta["mean"], device=process.device).view(1, -1, 1, 1)
    std = torch.tensor(meta["std"], device=process.device).view(1, -1, 1, 1)

    # --- which samples: class-balanced, or per_label of each chosen class
    chosen = [int(c) for c in cfg.labels.split(",") if c.strip().isdigit()] if cfg.labels else []
    if len(chosen) != len(cfg.labels.split(",")) * bool(cfg.labels) or any(c >= num_classes for c in chosen):
        fail(f"--labels {cfg.labels} has a class outside 0..{num_classes - 1}, the classes of this DiT"
             + ("; --preset tiny asks for 0-7, so pass --labels (\"\" = all classes in turn)" if cfg.preset == "tiny"
                else ""))
    if chosen:
        num_samples = len(chosen) * cfg.per_label
    elif cfg.num_samples <= 0 or cfg.num_samples % num_classes:
        fail(f"--num_samples {cfg.num_samples} is not a positive multiple of the {num_classes} classes; "
             f"class-balanced sampling needs the same count of every class")
    else:
        num_samples = cfg.num_samples
    num_shards = -(-num_samples // cfg.batch_size)
    shard_dir = os.path.splitext(cfg.out)[0] + "_shards"

    def shard_path(s):
        return os.path.join(shard_dir, f"{s:06d}.npz")

    settings = shard_settings(cfg, ckpt["step"])
    settings_path = os.path.join(shard_dir, "settings.json")
    if os.path.isfile(settings_path):
        with open(settings_path) as f:
            if json.load(f) != settings:
                fail(f"{shard_dir} holds shards of a run with other settings; delete it or choose another --out")
    process.barrier()

    def claim():  # rank 0: the folder lock, then the settings of this run
        lock_dir(shard_dir)
        atomic_write(settings_path, lambda f: f.write(json.dumps(settings, indent=2).encode()))

    process.run0(claim)
    todo = [s for s in range(num_shards) if not os.path.isfile(shard_path(s))]
    process.barrier()  # every rank has listed the unfinished shards before any new one appears
    print0(f"{num_samples} samples in {num_shards} shards of {cfg.batch_size}; {num_shards - len(todo)} done "
           f"already; {process.world_size} process(es)")

    # --- loop: this rank's share of the unfinished shards, each written as soon as it is done
    mine = todo[process.rank::process.world_size]
    t0 = time.time()
    for s in progress(mine, process.master, "sampling", "shard"):
        indices = range(s * cfg.batch_size, min((s + 1) * cfg.batch_size, num_samples))
        labels = classes_of(indices, num_classes, chosen, cfg.per_label)
        with torch.no_grad():
            latent = sample_latents(model, indices, labels, (channels, size, size), cfg, num_classes, process.device)
            images = decode(pae, latent * std + mean, cfg.decode_precision)  # de-normalised per channel
        if not torch.isfinite(images).all():  # one sync per shard; black images would pass for results
            fail(f"the samples of shard {s} are NaN or inf; the DiT weights in {cfg.ckpt}, the AE {ae_path} or the "
                 f"latent statistics hold a NaN (or a zero std); nothing of this shard was written")
        save_npz(shard_path(s), arr_0=to_uint8(images, cfg.to_uint8), labels=np.array(labels, dtype=np.int64))
    elapsed = time.time() - t0
    done = sum(min((s + 1) * cfg.batch_size, num_samples) - s * cfg.batch_size for s in mine)
    print0(f"rank 0: {done} samples in {elapsed:.1f}s ({done / max(elapsed, 1e-9):.2f} samples/s per process)")
    process.barrier()

    # --- teardown: rank 0 merges the shards in index order into the .npz and the PNG grid
    if process.master:
        shards = [dict(np.load(shard_path(s))) for s in range(num_shards)]
        images = np.concatenate([shard["arr_0"] for shard in shards])
        labels = np.concatenate([shard["labels"] for shard in shards])
        save_npz(cfg.out, arr_0=images, labels=labels)
        grid = torch.from_numpy(images[:len(chosen) * cfg.per_label if chosen else 64]).permute(0, 3, 1, 2)
        atomic_write(png, lambda f: save_image(grid.float() / 255, f, format="png", nrow=cfg.per_label if chosen else 8))
        shutil.rmtree(shard_dir)
        print0(f"wrote {cfg.out} (arr_0 {images.shape} uint8, labels) and {os.path.splitext(cfg.out)[0]}.png")
    process.teardown()
    if process.master and cfg.fid_ref:
        run_fid(cfg)


def run_fid(cfg):
    """fid.py on the written .npz, as its own single process (the torchrun variables are dropped)."""
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fid.py")
    if not os.path.isfile(script):
        fail(f"--fid_ref was given but {script} does not exist")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE",
                                                            "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK")}
    command = [sys.executable, script, cfg.out, "--ref", cfg.fid_ref]
    if cfg.fid_weights:
        command += ["--weights", cfg.fid_weights]
    print0(" ".join(command))
    if subprocess.run(command, env=env).returncode != 0:
        fail(f"fid.py failed on {cfg.out}; the samples are kept, rerun it by hand: {' '.join(command)}")


if __name__ == "__main__":
    main()
