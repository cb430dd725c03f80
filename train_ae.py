r"""
Train the PAE tokenizer and extract the latent cache.

Stages (--stage): refine (P_t/Q_t on frozen VFM features) -> ae (the PAE tokenizer) -> encode (the latent
cache train_dit.py reads) and eval (PSNR, rFID, LPC, GSQ). With no --stage: refine, ae, then encode.

CPU smoke run:  python train_ae.py --preset tiny                       (synthetic data, whole pipeline)
One GPU:        python train_ae.py --data /data/imagenet/train --val_data /data/imagenet/val
8 GPUs:         torchrun --nproc_per_node=8 train_ae.py --data /data/imagenet/train --val_data /data/imagenet/val
Two nodes:      torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 \
                    train_ae.py --data /data/imagenet/train
One stage:      add --stage refine | ae | encode | eval (ae needs --refine_ckpt or OUT_DIR/refine.pt,
                encode/eval need --ae_ckpt or OUT_DIR/ae.pt)
Resume:         add --resume: stage refine continues from OUT_DIR/ckpt_refine.pt, stage ae from OUT_DIR/ckpt_ae.pt
                (model, EMA, optimizers, discriminator, step; data order and noise are functions of the step), a
                stage without one starts afresh; an encode that did not finish (no meta.json) is simply rerun.
Outputs:        OUT_DIR/refine.pt (kind "refine"), OUT_DIR/ae.pt (kind "pae": raw weights + EMA, what encode and
                sample.py use), OUT_DIR/grid_<step>.png, LATENTS/{latents.npy, labels.npy, meta.json}
"""

# -----------------------------------------------------------------------------
# imports

import copy
import datetime
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
import torchvision
from numpy.lib.format import open_memmap
from PIL import Image

import fid
import losses
import model as M
from model import (Dist, IntervalLog, Logger, autocast, batch_indices, batch_layout, bench_modes, check_output,
                   check_resume, count_flops, ema_update, fail, format_duration, gpu_guard, grad_sync, lock_dir,
                   make_optimizer, mixed_seed, parse_config, progress, report, resume_step, save_checkpoint,
                   save_config, step_flips, time_calls, wrap)

# -----------------------------------------------------------------------------
# config


@dataclass
class Config:
    preset: str = "paper"  # paper | tiny (random tiny VFM and decoder, 32 px synthetic images, a few steps)
    stage: str = ""  # refine | ae | encode | eval; "" = refine (unless --refine_ckpt), ae, then encode
    data: str = "synthetic"  # ImageFolder root (class sub-folders, e.g. ImageNet train) or "synthetic"
    val_data: str = ""  # held-out ImageFolder (ImageNet val) for PSNR and eval; "" = synthetic held-out images
    out_dir: str = "out"  # refine.pt, ae.pt, ckpt_<stage>.pt, config.json, log.txt, grid_<step>.png, eval.json
    latents: str = ""  # stage encode writes the latent cache here; "" = OUT_DIR/latents
    refine_ckpt: str = ""  # stage ae: refine checkpoint; "" = OUT_DIR/refine.pt
    ae_ckpt: str = ""  # stages encode and eval: PAE checkpoint; "" = OUT_DIR/ae.pt
    overwrite: bool = False  # replace a finished refine.pt / ae.pt / eval.json / latent cache (else refused)
    image_size: int = 256  # px; ADM center crop of ImageFolder images, size of synthetic images
    synthetic_size: int = 1_281_167  # images in the synthetic dataset (ImageNet-1k train size)
    synthetic_kind: str = "textures"  # textures: 16 classes (shape x texture, random colours); colours: 8 (shape, hue)
    vfm: str = "dinov2"  # dinov2 | dinov3 | siglip2 | mae
    vfm_weights: str = ""  # local VFM weight file; "" = timm / Hugging Face cache
    decoder: str = "L"  # pixel decoder preset: B | L | XL
    batch_size: int = 256  # global batch (all ranks, all accumulation steps)
    micro_batch_size: int = 0  # per-rank images per forward pass (also encode/eval batch); 0 = batch_size / world
    refine_steps: int = 20_000  # stage refine length [our reading: the paper gives none]
    max_steps: int = 125_000  # stage ae length: 25 epochs of ImageNet at batch 256
    lr: float = 1e-4  # peak AdamW lr of both training stages and of the discriminator
    adam_beta1: float = 0.9  # AdamW beta1
    adam_beta2: float = 0.95  # AdamW beta2 [our reading]
    weight_decay: float = 0.05  # on >=2-D weights only
    warmup: float = 0.05  # fraction of the steps with linear warm-up, then cosine
    min_lr_ratio: float = 0.1  # cosine ends at lr * min_lr_ratio
    grad_clip: float = 1.0  # max grad norm; 0 = off
    ema_decay: float = 0.9999  # stage ae EMA (latents are still extracted with the raw weights)
    gram_weight: float = 1.0  # stage refine: lambda_gram of the Gram term [our reading]
    upsample: str = "bilateral"  # structural target's feature up-sampler: bilateral | bilinear [our reading]
    lowpass: float = 0.4  # structural target's low-pass strength
    l1_weight: float = 1.0  # the paper's loss weights: L1 1, LPIPS 1, GAN 0.5, SSR 0.2, MCR 0.5, SCR 1
    lpips_weight: float = 1.0  # LPIPS (VGG16) reconstruction term; 0 = L1 alone, inside MCR too
    gan_weight: float = 0.5  # generator's GAN term, from disc_start on; 0 = no GAN (the discriminator is not trained)
    ssr_weight: float = 0.2  # SSR: token Gram matrix against the refined VFM structure
    mcr_weight: float = 0.5  # MCR: cascaded decodings of latents rotated by 42.5 and 85 degrees
    scr_weight: float = 1.0  # SCR: cosine to the refined targets Z_T, pooled and per token
    disc_start: int = 5000  # step at which the GAN losses switch on
    eval_images: int = 50_000  # stage eval: held-out images for PSNR / rFID (all of them if fewer)
    psnr_images: int = 1000  # held-out images for the periodic PSNR of stage ae
    lpc_images: int = 1000  # stage eval: images for the LPC diagnostic
    lpips_vgg_weights: str = ""  # local torchvision vgg16-397923af.pth; "" = torch hub cache (tiny: random VGG)
    lpips_lin_weights: str = ""  # local LPIPS v0.1 vgg.pth (linear layers); "" = torch hub cache
    fid_weights: str = ""  # Inception weight file for rFID; "" = torch hub cache (no weights: rFID skipped)
    num_workers: int = 8  # data-loader processes per rank
    seed: int = 0  # initial weights, data order, flips and MCR directions derive from it
    log_every: int = 50  # steps
    ckpt_every: int = 2500  # steps; also writes the PNG grid and the held-out PSNR
    resume: bool = False  # continue from OUT_DIR/ckpt_<stage>.pt (and replace its refine.pt / ae.pt when done)
    compile: bool = True  # torch.compile the training step (GPU only; ignored on CPU)
    bench: bool = False  # time the refine step, the ae step (every loss, GAN on) and encode on random images and weights
    bench_steps: int = 5  # timed steps per bench setting
    device: str = "auto"  # auto (the GPU when there is one) | cpu | cuda

    CHOICES = {"stage": ("", "refine", "ae", "encode", "eval"), "synthetic_kind": ("textures", "colours"),
               "vfm": tuple(M.VFM_PRESETS), "decoder": tuple(M.DECODER_PRESETS), "upsample": ("bilateral", "bilinear"),
               "device": M.DEVICES}
    POSITIVE = ("image_size", "synthetic_size", "batch_size", "refine_steps", "max_steps", "lr", "log_every",
                "ckpt_every", "eval_images", "psnr_images", "lpc_images", "bench_steps")
    NONNEGATIVE = ("micro_batch_size", "weight_decay", "grad_clip", "gram_weight", "lowpass", "l1_weight",
                   "lpips_weight", "gan_weight", "ssr_weight", "mcr_weight", "scr_weight", "disc_start",
                   "num_workers", "seed")
    UNIT = ("adam_beta1", "adam_beta2", "warmup", "min_lr_ratio", "ema_decay")


PRESETS = {
    "paper": {},
    # tiny: the CPU quickstart, 8 "colours" classes at 32 px. No LPIPS (its VGG would be random: L1 alone), MCR at 1/10
    # of the paper's weight and no GAN (it starts at the last step): at 32 px, with 48 pixel values per 32-channel
    # token, the paper's MCR holds the reconstructions at flat colour fields and the GAN adds a checker pattern
    "tiny": dict(image_size=32, synthetic_size=2048, synthetic_kind="colours", batch_size=16, refine_steps=100,
                 max_steps=500, lr=3e-3, lpips_weight=0.0, mcr_weight=0.05, disc_start=500,
                 log_every=50, ckpt_every=250, eval_images=256, psnr_images=32, lpc_images=16, num_workers=0,
                 compile=False, out_dir="out/tiny"),
}

# -----------------------------------------------------------------------------
# data: ImageFolder with the ADM center crop, a built-in synthetic dataset, a step-indexed sampler


def center_crop_adm(image, size):
    """ADM's center crop: halve with a box filter while the short side is >= 2*size, bicubic-resize the short
    side to size, then crop the centre. PIL image -> uint8 tensor (3, size, size)."""
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(s // 2 for s in image.size), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(s * scale) for s in image.size), resample=Image.BICUBIC)
    array = np.asarray(image)
    top, left = (array.shape[0] - size) // 2, (array.shape[1] - size) // 2
    return torch.from_numpy(array[top:top + size, left:left + size].copy()).permute(2, 0, 1)


class ImageFolderADM(torch.utils.data.Dataset):
    """root/CLASS/IMAGE files -> (uint8 image (3, S, S), label, skipped). An unreadable file is replaced by the
    next readable one and counted in `skipped`, so a corrupt JPEG costs one warning, not the run."""

    def __init__(self, root, size):
        if not os.path.isdir(root):
            fail(f"image folder {root} does not exist; pass --data DIR (class sub-folders) or --data synthetic")
        try:
            folder = torchvision.datasets.ImageFolder(root)
        except (FileNotFoundError, OSError) as e:
            fail(f"image folder {root} holds no class sub-folders with images ({e})")
        self.samples, self.size, self.num_classes = folder.samples, size, len(folder.classes)
        self.name = os.path.abspath(root)

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        for skipped in range(len(self.samples)):
            path, label = self.samples[(index + skipped) % len(self.samples)]
            try:
                with Image.open(path) as image:
                    return center_crop_adm(image.convert("RGB"), self.size), label, skipped
            except (OSError, ValueError, Image.DecompressionBombError) as e:
                print(f"warning: skipping unreadable image {path} ({type(e).__name__}: {e})", flush=True)
        fail(f"no image in {self.name} can be read")


SHAPES = ("disc", "square", "triangle", "ring")
TEXTURES = ("solid", "stripes", "checker", "dots")
HUES = ("red", "orange", "lime", "green", "cyan", "blue", "violet", "magenta")  # 45 degrees apart
SYNTHETIC_CLASSES = {"textures": len(SHAPES) * len(TEXTURES), "colours": len(HUES)}


class SyntheticImages(torch.utils.data.Dataset):
    """Procedural class-conditional images at any resolution, nothing downloaded, label = index % classes
    (balanced). kind 'textures': 16 classes = (shape, texture), random colours; kind 'colours': 8 classes, class k
    = (shape k % 4, hue k), solid. Colours, position, scale, rotation, texture frequency and background gradient are
    drawn from a generator seeded by (seed, index), so image i is always the same."""

    def __init__(self, count, size, seed=0, kind="textures"):
        self.count, self.size, self.seed, self.kind = count, size, seed, kind
        self.num_classes = SYNTHETIC_CLASSES[kind]
        self.name = f"synthetic(kind={kind}, count={count}, size={size}, seed={seed})"

    def __len__(self):
        return self.count

    def __getitem__(self, index):
        label = index % self.num_classes
        colours = self.kind == "colours"
        shape = SHAPES[label % len(SHAPES)] if colours else SHAPES[label // len(TEXTURES)]
        texture = "solid" if colours else TEXTURES[label % len(TEXTURES)]
        g = torch.Generator().manual_seed(mixed_seed(self.seed, index))
        rand = lambda *n: torch.rand(*n, generator=g)  # noqa: E731
        S = self.size
        y, x = torch.meshgrid((torch.arange(S) + 0.5) / S, (torch.arange(S) + 0.5) / S, indexing="ij")
        angle = rand(1) * 2 * math.pi  # background: a linear gradient between two random colours
        ramp = ((x - 0.5) * angle.cos() + (y - 0.5) * angle.sin()) / math.sqrt(2) + 0.5
        if colours:  # mid greys with a gentle ramp (the only hue is the shape's), a large shape near the centre
            start, end = 0.3 + 0.4 * rand(1, 1, 1), 0.3 + 0.4 * rand(1, 1, 1)
            background = (start + (end - start) * ramp).expand(3, S, S)
            cx, cy, scale = 0.4 + 0.2 * rand(1), 0.4 + 0.2 * rand(1), 0.28 + 0.08 * rand(1)
        else:
            background = rand(3, 1, 1) + (rand(3, 1, 1) - rand(3, 1, 1)) * ramp
            cx, cy, scale = 0.3 + 0.4 * rand(1), 0.3 + 0.4 * rand(1), 0.12 + 0.18 * rand(1)
        rot = rand(1) * 2 * math.pi
        u = ((x - cx) * rot.cos() + (y - cy) * rot.sin()) / scale  # shape coordinates: unit size, rotated
        v = (-(x - cx) * rot.sin() + (y - cy) * rot.cos()) / scale
        radius = (u ** 2 + v ** 2).sqrt()
        inside = {  # signed distance (in shape units) to the outline, negative inside
            "disc": radius - 1,
            "square": torch.maximum(u.abs(), v.abs()) - 0.8,
            "triangle": torch.maximum(torch.maximum(-v - 0.5, 0.866 * u + 0.5 * v - 0.5), -0.866 * u + 0.5 * v - 0.5),
            "ring": (radius - 0.75).abs() - 0.25,
        }[shape]
        mask = (0.5 - inside * scale * S).clamp(0, 1)  # anti-aliased edge one pixel wide
        f = 1.5 + 2.5 * rand(1)  # texture cycles per shape unit, so the texture scales with the shape
        pattern = {
            "solid": torch.zeros_like(u),
            "stripes": (torch.sin(2 * math.pi * f * u) > 0).float(),
            "checker": (torch.sin(2 * math.pi * f * u) * torch.sin(2 * math.pi * f * v) > 0).float(),
            "dots": (((f * u) % 1 - 0.5) ** 2 + ((f * v) % 1 - 0.5) ** 2 < 0.09).float(),
        }[texture]
        if colours:  # the class hue (+-8 degrees), saturated, of random brightness
            hue = (label + (rand(1) - 0.5) * 0.35) / len(HUES)
            ink = hsv_to_rgb(hue, 0.75 + 0.25 * rand(1), 0.7 + 0.3 * rand(1)).view(3, 1, 1)
            paper = ink
        else:
            ink, paper = rand(3, 1, 1), rand(3, 1, 1)
        foreground = ink + (paper - ink) * pattern
        image = background * (1 - mask) + foreground * mask + 0.02 * torch.randn(3, S, S, generator=g)
        return (image.clamp(0, 1) * 255).round().to(torch.uint8), label, 0


def hsv_to_rgb(h, s, v):
    """HSV (tensors of one element, hue in turns) -> RGB tensor (3,)."""
    k = (torch.tensor([5.0, 3.0, 1.0]) + h * 6) % 6
    return v - v * s * torch.clamp(torch.minimum(k, 4 - k), 0, 1)


def make_dataset(cfg, held_out=False):
    """The training images, or the held-out ones (None when there are none)."""
    if held_out:
        if cfg.val_data:
            return ImageFolderADM(cfg.val_data, cfg.image_size)
        if cfg.data == "synthetic":  # a different seed: images never seen in training
            return SyntheticImages(max(cfg.eval_images, cfg.psnr_images), cfg.image_size, cfg.seed + 1,
                                   cfg.synthetic_kind)
        return None
    if cfg.data == "synthetic":
        return SyntheticImages(cfg.synthetic_size, cfg.image_size, cfg.seed, cfg.synthetic_kind)
    return ImageFolderADM(cfg.data, cfg.image_size)


class StepSampler(torch.utils.data.Sampler):
    """This rank's indices of every global batch from `start_step` on, forever: rank r takes the slice [r*b:(r+1)*b]
    of model.batch_indices (whole batches within each epoch), so the data of a step is the same for any world size
    and after a resume."""

    def __init__(self, count, batch_size, rank, world_size, seed, start_step=0):
        if count < batch_size:
            fail(f"the dataset holds {count} images, fewer than one global batch of {batch_size}; "
                 f"lower --batch_size")
        self.count, self.batch_size, self.seed, self.start_step = count, batch_size, seed, start_step
        per_rank = batch_size // world_size
        self.mine = slice(rank * per_rank, (rank + 1) * per_rank)

    def __iter__(self):
        step = self.start_step
        while True:
            yield from batch_indices(step, self.batch_size, self.count, self.seed, drop_tail=True)[self.mine].tolist()
            step += 1


def shard_loader(cfg, process, dataset, lo, hi, batch):
    """Images lo..hi-1 of the dataset in order (encode and eval), `batch` at a time."""
    return torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, range(lo, hi)), batch_size=batch,
                                       num_workers=cfg.num_workers, pin_memory=process.device.type == "cuda")


def to_images01(batch, device):
    """uint8 (B, 3, S, S) -> float in [0, 1] on the device."""
    return batch.to(device, non_blocking=True).float() / 255

# -----------------------------------------------------------------------------
# stage encode: the latent cache train_dit.py reads, written in place by all ranks


@torch.no_grad()
def encode_stage(cfg, process, log, ae_path):
    """All ranks fill their index ranges of the memmaps in place. A complete cache is replaced only with
    --overwrite, and then the new one is written beside it (LATENTS.new) and swapped in once complete, so a crash
    leaves the old cache intact. meta.json, written last, marks a cache complete."""
    final = cfg.latents.rstrip(os.sep)

    def restore():  # a swap interrupted between its two renames: the complete old cache goes back in place
        if not os.path.exists(final) and os.path.isfile(os.path.join(final + ".old", "meta.json")):
            os.replace(final + ".old", final)
            log(f"encode: restored {final} from {final}.old, left by an interrupted --overwrite")

    process.run0(restore)
    replacing = os.path.isfile(os.path.join(final, "meta.json"))
    if replacing and not cfg.overwrite:
        fail(f"{final} holds a complete latent cache; pass --overwrite to replace it or choose another --latents")
    target = final + ".new" if replacing else final
    meta_path = os.path.join(target, "meta.json")
    ae_digest = M.file_digest(ae_path) if process.master else None  # the AE as loaded now, recorded in meta.json
    pae = M.pae_from_checkpoint(ae_path, device=process.device)
    cfg.image_size = pae.image_size  # images are cropped to the size the tokenizer was trained at
    dataset = make_dataset(cfg)
    count = len(dataset)
    num_classes = dataset.num_classes
    C, H, W = pae.encode(torch.zeros(1, 3, cfg.image_size, cfg.image_size, device=process.device)).shape[1:]
    latents_path, labels_path = os.path.join(target, "latents.npy"), os.path.join(target, "labels.npy")
    if process.master:  # rank 0 lays out the files; every rank then fills its own index range in place
        os.makedirs(target, exist_ok=True)
        if os.path.exists(meta_path):
            os.remove(meta_path)  # from here on the directory is an incomplete cache
        # float16, not the release's bf16: 3 more mantissa bits, and latents on the sqrt(32) sphere fit easily
        open_memmap(latents_path, mode="w+", dtype=np.float16, shape=(count, 2, C, H, W)).flush()
        open_memmap(labels_path, mode="w+", dtype=np.int64, shape=(count,)).flush()
    process.barrier()
    latents, labels = open_memmap(latents_path, mode="r+"), open_memmap(labels_path, mode="r+")
    lo, hi = process.rank * count // process.world_size, (process.rank + 1) * count // process.world_size
    batch = cfg.micro_batch_size or max(1, cfg.batch_size // process.world_size)
    log(f"encode: {count} images of {dataset.name} and their flips with {ae_path} -> {target} "
        f"(latents {C}x{H}x{W}, {num_classes} classes, {process.world_size} ranks x batch {batch})")
    counts = torch.zeros(2, device=process.device)  # images skipped as unreadable, latent values not finite
    start, i = time.perf_counter(), lo
    for images, y, skips in progress(shard_loader(cfg, process, dataset, lo, hi, batch), process.master, "encode", "batch"):
        x = to_images01(images, process.device)
        with autocast(process.device):  # fp32 weights under a bf16 autocast (the release casts the weights to bf16)
            pair = torch.stack([pae.encode(x), pae.encode(x.flip(-1))], dim=1)  # (B, 2, C, H, W)
        pair = pair.half()
        counts += torch.stack([skips.sum().to(counts), (~torch.isfinite(pair)).sum().to(counts)])
        latents[i:i + len(x)] = pair.cpu().numpy()
        labels[i:i + len(x)] = y.numpy()
        i += len(x)
    latents.flush(), labels.flush()
    del latents, labels
    skipped, not_finite = (int(round(v)) for v in (process.all_reduce_mean(counts) * process.world_size).tolist())
    process.barrier()
    seconds = time.perf_counter() - start
    incomplete = f"{target} is left without meta.json, i.e. incomplete" + (f"; {final} is unchanged" if replacing
                                                                             else "")
    if not_finite:
        fail(f"encode: {not_finite} latent values are NaN or inf (or overflow float16); look for a NaN weight in "
             f"{ae_path}; {incomplete}")

    def complete():  # rank 0: the statistics, meta.json (last: it marks the cache complete), the swap
        stored = np.load(latents_path, mmap_mode="r")
        pick = np.random.default_rng(cfg.seed).choice(count, size=min(count, 10_000), replace=False)
        sample = stored[np.sort(pick), 0].astype(np.float64)  # un-flipped latents, (n, C, H, W)
        mean, std = sample.mean(axis=(0, 2, 3)), sample.std(axis=(0, 2, 3))
        if not (np.isfinite(mean).all() and np.isfinite(std).all() and std.min() > 0):
            fail(f"encode: the latent statistics are not usable (a channel's std is {std.min()}); {incomplete}")
        meta = {"ae_ckpt": ae_path, "ae_sha256": ae_digest, "channels": int(C), "size": int(H), "count": count,
                "num_classes": num_classes, "mean": mean.tolist(), "std": std.tolist(), "dataset": dataset.name,
                "created": datetime.datetime.now(datetime.timezone.utc).isoformat()}
        M.atomic_write(meta_path, lambda f: f.write(json.dumps(meta, indent=2).encode()))
        if replacing:  # swap the complete new cache in; the old one goes only after
            shutil.rmtree(final + ".old", ignore_errors=True)  # the leftover of a crash in an earlier rmtree
            os.replace(final, final + ".old")
            os.replace(target, final)
            shutil.rmtree(final + ".old")

    process.run0(complete)
    log(f"encode: done, {count} images in {format_duration(seconds)} ({count / seconds:.1f} img/s, each encoded "
        f"twice: image and flip) -> {final}" + (f"; {skipped} unreadable images replaced by the next readable one"
                                                 if skipped else ""))


# -----------------------------------------------------------------------------
# training machinery shared by stages refine and ae


class LossModule(torch.nn.Module):
    """Runs a loss function as forward() of a module that holds the trained networks, so DDP (which syncs the
    gradients of a module called through forward) and torch.compile see the whole step."""

    def __init__(self, fn, **trained):
        super().__init__()
        self.fn, self.trained = fn, torch.nn.ModuleDict(trained)

    def forward(self, *args):
        return self.fn(*args)


def get_lr(cfg, step, total_steps):
    """Linear warm-up over the first `warmup` fraction of the steps, then cosine down to lr * min_lr_ratio."""
    warmup = max(1, round(cfg.warmup * total_steps))
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    done = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * done)))


def micro_batches(cfg, process, loader, step):
    """This rank's micro-batches of a step as (images01, seed): images h-flipped with a coin per global sample
    drawn from (seed, step), and a torch seed per global micro-batch for the loss's own randomness (MCR
    directions), so nothing depends on the world size as long as the micro-batch size is the same."""
    per_rank, micro, accum = batch_layout(cfg, process)
    flips = step_flips(cfg.seed, step, cfg.batch_size)
    out, skipped = [], 0
    for k in range(accum):
        images, _, skips = next(loader)
        first = process.rank * per_rank + k * micro  # global position of this micro-batch in the step's batch
        images = to_images01(images, process.device)  # the loader's pinned batch, copied without blocking, then flipped
        flip = flips[first:first + micro].to(process.device, non_blocking=True).view(-1, 1, 1, 1)
        out.append((torch.where(flip, images.flip(-1), images), mixed_seed(cfg.seed, step, 1, first // micro)))
        skipped += int(skips.sum())
    return out, skipped


def train_loader(cfg, process, dataset, start_step):
    _, micro, _ = batch_layout(cfg, process)
    sampler = StepSampler(len(dataset), cfg.batch_size, process.rank, process.world_size, cfg.seed, start_step)
    return iter(torch.utils.data.DataLoader(dataset, batch_size=micro, sampler=sampler, num_workers=cfg.num_workers,
                                            pin_memory=process.device.type == "cuda", persistent_workers=cfg.num_workers > 0))


def new_pae(cfg, process, pretrained=True):
    """The PAE of the config on the device (random tiny VFM under --preset tiny; random VFM without pretrained)."""
    return M.build_pae(vfm=cfg.vfm, decoder=cfg.decoder, preset="tiny" if cfg.preset == "tiny" else None,
                       vfm_weights=cfg.vfm_weights or None, image_size=cfg.image_size,
                       pretrained=pretrained).to(process.device)


# -----------------------------------------------------------------------------
# stage refine: P_t / Q_t on frozen VFM features


def refine_step(cfg, process, vfm, refiner, opt):
    """(train_step, refine_fn): train_step(batches) runs one optimizer step of P_t / Q_t over this rank's micro-batches
    [(images01, seed)] and returns the summed loss parts; refine_fn(images) is the loss of one micro-batch."""

    def refine_fn(images):
        with torch.no_grad():
            vfm_tokens = vfm(images)  # (B, N, W)
            H_ref = losses.structural_target(images, vfm_tokens, cfg.upsample, cfg.lowpass)
        return losses.refine_loss(refiner, vfm_tokens, H_ref, cfg.gram_weight)

    refine_train = wrap(cfg, process, LossModule(refine_fn, refiner=refiner))

    def train_step(batches):
        parts_sum = {}
        for k, (images, seed) in enumerate(batches):
            torch.manual_seed(seed)
            with grad_sync(refine_train, k == len(batches) - 1), autocast(process.device):
                loss, parts = refine_train(images)
                (loss / len(batches)).backward()
            for key, value in {"loss": loss, **parts}.items():
                parts_sum[key] = parts_sum.get(key, 0) + value.detach().float() / len(batches)
        parts_sum["grad"] = torch.nn.utils.clip_grad_norm_(refiner.parameters(), cfg.grad_clip or float("inf"))
        opt.step()
        opt.zero_grad(set_to_none=True)
        return parts_sum

    return train_step, refine_fn


def refine_stage(cfg, process, log):
    ckpt_path, final_path = os.path.join(cfg.out_dir, "ckpt_refine.pt"), os.path.join(cfg.out_dir, "refine.pt")
    torch.manual_seed(cfg.seed)
    vfm = M.build_vfm("tiny" if cfg.preset == "tiny" else cfg.vfm, weights=cfg.vfm_weights or None).to(process.device)
    probe = torch.zeros(1, 3, cfg.image_size, cfg.image_size, device=process.device)
    refiner = M.build_refiner(vfm(probe).shape[-1], preset="tiny" if cfg.preset == "tiny" else None).to(process.device)
    opt = make_optimizer(cfg, refiner.parameters(), process.device)
    step = resume_step(cfg, ckpt_path, "refine", {"model": refiner, "opt": opt},
                       {"refiner_args": refiner.refiner_args}, log)

    train_step, refine_fn = refine_step(cfg, process, vfm, refiner, opt)
    _, micro, accum = batch_layout(cfg, process)
    dataset = make_dataset(cfg)
    flops = count_flops(lambda: refine_fn(probe.expand(micro, -1, -1, -1))[0].backward()) / micro
    refiner.zero_grad(set_to_none=True)
    n_params = sum(p.numel() for p in refiner.parameters())
    log(f"refine: {n_params / 1e6:.2f}M trainable parameters, {flops / 1e9:.2f} GFLOP per image | data "
        f"{dataset.name}: {len(dataset)} images | world {process.world_size} x micro-batch {micro} x accumulation {accum} "
        f"= batch {cfg.batch_size} | {cfg.refine_steps} steps")
    loader = train_loader(cfg, process, dataset, step)
    meter = IntervalLog(cfg, process, log, "refine", cfg.refine_steps, flops, f"a NaN in the images of {dataset.name} or in "
                        f"the VFM's weights, or a learning rate too high (--lr {cfg.lr})", step or None)
    refiner.train()
    while step < cfg.refine_steps:
        lr = get_lr(cfg, step, cfg.refine_steps)
        for group in opt.param_groups:
            group["lr"] = lr
        batches, skipped = micro_batches(cfg, process, loader, step)
        parts_sum = train_step(batches)
        step += 1
        meter.add(step, parts_sum, skipped)
        if step % cfg.log_every == 0 or step == cfg.refine_steps:
            meter.emit(step, lr)
        if step % cfg.ckpt_every == 0 or step == cfg.refine_steps:
            meter.checkpoint(step, lambda: save_checkpoint(ckpt_path, "refine", refiner, cfg, step, opt=opt,
                                                           refiner_args=refiner.refiner_args))
    process.run0(lambda: save_checkpoint(final_path, "refine", refiner, cfg, step, refiner_args=refiner.refiner_args))
    log(f"refine: done at step {step}, P_t/Q_t in {final_path}")
    return final_path

# -----------------------------------------------------------------------------
# reconstruction metrics: PSNR, rFID, LPC, GSQ, shared by stages ae and eval

THETAS = (42.5, 85.0)  # MCR rotation angles in degrees, theta_m and theta_l
LPC_RHOS = (0.1, 0.5, 1.0, 2.0)  # LPC step sizes relative to |z|


def recon_scores(recon01, images01):
    """Per-image PSNR (dB) and SSIM (losses.ssim: Gaussian window 11, sigma 1.5) of 8-bit images: both are rounded
    to 0..255 first, as saved images would be."""
    recon8, images8 = (recon01.clamp(0, 1) * 255).round(), (images01 * 255).round()
    mse = (recon8 - images8).float().pow(2).mean((1, 2, 3))
    return 10 * torch.log10(255 ** 2 / mse.clamp_min(1e-10)), losses.ssim(recon8 / 255, images8 / 255)


@torch.no_grad()
def write_grid(cfg, pae, dataset, path, device):
    """PNG rows: input | reconstruction | decodings of the 42.5 and 85 degree perturbed latents."""
    images = to_images01(torch.stack([dataset[i][0] for i in range(min(8, len(dataset)))]), device)
    torch.manual_seed(cfg.seed)  # the same perturbation directions at every step
    with autocast(device):
        latent = pae.encode(images)
        rows = [images, pae.decode(latent)] + [pae.decode(z) for z in M.mcr_rotate(latent, THETAS)]
    torchvision.utils.save_image(torch.cat(rows).float().clamp(0, 1), path, nrow=len(images))


@torch.no_grad()
def evaluate(cfg, process, pae, dataset, count, lpips_net=None, inception=None):
    """Reconstruct images 0..count-1 of the dataset, split over the ranks. Returns {"psnr", "ssim"}, plus "lpc" (first
    lpc_images images) and "gsq" with an LPIPS net, plus "rfid" with an Inception net from fid.py."""
    lo, hi = process.rank * count // process.world_size, (process.rank + 1) * count // process.world_size
    batch = cfg.micro_batch_size or max(1, cfg.batch_size // process.world_size)
    sums = torch.zeros(3, dtype=torch.float64, device=process.device)  # PSNR sum, LPC sum, SSIM sum
    moments = [torch.zeros(2048, dtype=torch.float64, device=process.device) for _ in range(2)]  # sum x: real, recon
    cross = [torch.zeros(2048, 2048, dtype=torch.float64, device=process.device) for _ in range(2)]  # sum x x^T
    pooled, labels = [], []
    was_training = pae.training
    pae.eval()
    i = lo
    for images, y, _ in progress(shard_loader(cfg, process, dataset, lo, hi, batch), process.master and lpips_net is not None,
                                 "eval", "batch"):  # no progress mid-training
        x = to_images01(images, process.device)
        with autocast(process.device):
            latent = pae.encode(x)
            recon = pae.decode(latent).float().clamp(0, 1)
        psnr, ssim = recon_scores(recon, x)
        sums[0] += psnr.double().sum()
        sums[2] += ssim.double().sum()
        pooled.append(latent.float().mean((2, 3)).cpu())  # (B, C) for GSQ
        labels.append(y)
        n = min(len(x), cfg.lpc_images - i)
        if lpips_net is not None and n > 0:  # directions seeded by the global image index
            g = torch.Generator(device=process.device).manual_seed(mixed_seed(cfg.seed, i))
            with autocast(process.device):
                sums[1] += losses.lpc(pae.decode, latent[:n].float(), lpips_net, LPC_RHOS, g).double().sum()
        if inception is not None:
            for k, imgs in enumerate((x, recon)):
                uint8 = (imgs * 255).round().to(torch.uint8).permute(0, 2, 3, 1)  # NHWC, rounded
                feats = fid.inception_features(inception, uint8, batch_size=batch)["pool"].double()
                moments[k] += feats.sum(0)
                cross[k] += feats.T @ feats
        i += len(x)
    pae.train(was_training)
    sums = process.all_reduce_mean(sums) * process.world_size
    results = {"psnr": sums[0].item() / count, "ssim": sums[2].item() / count}
    if lpips_net is not None:
        results["lpc"] = sums[1].item() / min(count, cfg.lpc_images)
        pooled, labels = torch.cat(pooled), torch.cat(labels)
        if process.world_size > 1:  # GSQ compares every latent with every other: gather them all
            gathered = [None] * process.world_size
            torch.distributed.all_gather_object(gathered, (pooled, labels))
            pooled, labels = torch.cat([p for p, _ in gathered]), torch.cat([y for _, y in gathered])
        results["gsq"], results["gsq_std"] = losses.gsq(pooled, labels, seed=cfg.seed)
    if inception is not None:
        stats = []
        for k in range(2):  # mean and covariance (np.cov, N - 1) from all-reduced sums: no feature gather
            s, ss = process.all_reduce_mean(moments[k]) * process.world_size, process.all_reduce_mean(cross[k]) * process.world_size
            mu = s / count
            stats += [mu.cpu().numpy(), ((ss - count * torch.outer(mu, mu)) / (count - 1)).cpu().numpy()]
        results["rfid"] = fid.frechet_distance(*stats)
    return results


def make_lpips(cfg):
    """LPIPS with the pretrained VGG16 and v0.1 linear layers; the tiny preset uses a random VGG unless files are given."""
    return losses.LPIPS(pretrained=cfg.preset != "tiny", vgg_weights=cfg.lpips_vgg_weights or None,
                        lin_weights=cfg.lpips_lin_weights or None)


# -----------------------------------------------------------------------------
# stage ae: the PAE tokenizer with all the paper's losses, on our training recipe


def ae_step(cfg, process, pae, refiner, lpips_net, disc, opt, disc_opt, ema=None):
    """(train_step, generator_loss): train_step(batches, gan_on) runs one optimizer step of stage ae over this rank's
    micro-batches [(images01, seed)] (the generator with every loss, the EMA, then the discriminator's hinge loss on
    the step's reconstructions) and returns the summed loss parts; generator_loss(pae, images, gan_on) is one
    micro-batch's generator loss."""
    weights = dict(l1=cfg.l1_weight, lpips=cfg.lpips_weight, gan=cfg.gan_weight, ssr=cfg.ssr_weight,
                   mcr=cfg.mcr_weight, scr=cfg.scr_weight)

    def generator_loss(pae_module, images, gan_on):
        out = pae_module(images, thetas_deg=THETAS if cfg.mcr_weight else ())  # encode, decode, rotated decodes
        total, parts = losses.pae_loss(out, images, lpips_net, refiner, disc if gan_on else None, **weights,
                                       upsample=cfg.upsample, lowpass=cfg.lowpass)
        return total, parts, out["recon"]

    def disc_fn(images, fakes):
        return losses.hinge_d_loss(disc(images * 2 - 1), disc(fakes * 2 - 1))

    pae_train = wrap(cfg, process, pae)
    disc_train = wrap(cfg, process, LossModule(disc_fn, disc=disc))

    def train_step(batches, gan_on):
        accum, parts_sum, fakes = len(batches), {}, []
        disc.requires_grad_(False)  # the generator step only needs gradients through D, not of D
        for k, (images, seed) in enumerate(batches):
            torch.manual_seed(seed)  # MCR directions: a function of (step, global micro-batch)
            with grad_sync(pae_train, k == accum - 1), autocast(process.device):
                total, parts, recon = generator_loss(pae_train, images, gan_on)
                (total / accum).backward()
            fakes.append(recon.detach())
            for key, value in {"loss": total, **parts}.items():
                parts_sum[key] = parts_sum.get(key, 0) + value.detach().float() / accum
        parts_sum["grad"] = torch.nn.utils.clip_grad_norm_(list(pae.trainable_parameters()),
                                                           cfg.grad_clip or float("inf"))
        opt.step()
        opt.zero_grad(set_to_none=True)
        if ema is not None:
            ema_update(ema, pae, cfg.ema_decay)
        disc.requires_grad_(True)
        if gan_on:  # hinge loss for D on this step's reconstructions
            for k, ((images, _), fake) in enumerate(zip(batches, fakes)):
                with grad_sync(disc_train, k == accum - 1), autocast(process.device):
                    disc_loss = disc_train(images, fake)
                    (disc_loss / accum).backward()
                parts_sum["disc"] = parts_sum.get("disc", 0) + disc_loss.detach().float() / accum
            torch.nn.utils.clip_grad_norm_(disc.parameters(), cfg.grad_clip or float("inf"))
            disc_opt.step()
            disc_opt.zero_grad(set_to_none=True)
        return parts_sum

    return train_step, generator_loss


def ae_stage(cfg, process, log, refine_path):
    ckpt_path, final_path = os.path.join(cfg.out_dir, "ckpt_ae.pt"), os.path.join(cfg.out_dir, "ae.pt")
    tiny = cfg.preset == "tiny"
    refiner, refine_ckpt = M.refiner_from_checkpoint(refine_path, process.device)  # P_t supplies the SCR targets, frozen
    torch.manual_seed(cfg.seed)  # the same initial weights (and tiny random LPIPS) on every rank and every run
    lpips_net = make_lpips(cfg).to(process.device) if cfg.lpips_weight else None  # weight 0: L1 alone, MCR too
    pae = new_pae(cfg, process)
    made_for = (refine_ckpt["config"].get("vfm"), refine_ckpt["config"].get("preset") == "tiny",
                refine_ckpt["refiner_args"].get("vfm_width"))
    if made_for != (cfg.vfm, tiny, pae.vfm.width):
        fail(f"{refine_path} was trained for VFM {made_for[0]!r} (preset {refine_ckpt['config'].get('preset')}), "
             f"but this run uses {cfg.vfm!r} (preset {cfg.preset}); run --stage refine for it or pass the matching "
             f"--refine_ckpt")
    disc = M.PatchDiscriminator().to(process.device)
    vfm, pae.vfm = pae.vfm, None  # the EMA shares the frozen VFM instead of holding a second copy
    ema = copy.deepcopy(pae).requires_grad_(False).eval()
    pae.vfm = ema.vfm = vfm
    opt = make_optimizer(cfg, pae.trainable_parameters(), process.device)
    disc_opt = make_optimizer(cfg, disc.parameters(), process.device)
    step = resume_step(cfg, ckpt_path, "pae", {"model": pae, "ema": ema, "opt": opt, "disc": disc,
                                               "disc_opt": disc_opt}, {"pae_args": pae.pae_args}, log)
    train_step, generator_loss = ae_step(cfg, process, pae, refiner, lpips_net, disc, opt, disc_opt, ema)
    _, micro, accum = batch_layout(cfg, process)
    dataset, held_out = make_dataset(cfg), make_dataset(cfg, held_out=True)
    probe = torch.zeros(1, 3, cfg.image_size, cfg.image_size, device=process.device)  # one image: no memory spike
    flops = count_flops(lambda: generator_loss(pae, probe, False)[0].backward())
    pae.zero_grad(set_to_none=True)
    n_params = sum(p.numel() for p in pae.trainable_parameters())
    log(f"ae: {n_params / 1e6:.2f}M trainable parameters, {flops / 1e9:.2f} GFLOP per image (generator, fwd+bwd) | "
        f"P_t from {refine_path} | data {dataset.name}: {len(dataset)} images | world {process.world_size} x micro-batch "
        f"{micro} x accumulation {accum} = batch {cfg.batch_size} | {cfg.max_steps} steps, "
        + (f"GAN from step {cfg.disc_start}" if cfg.disc_start < cfg.max_steps and cfg.gan_weight else "no GAN")
        + ("" if held_out is not None else " | no --val_data: no held-out PSNR"))
    loader = train_loader(cfg, process, dataset, step)
    meter = IntervalLog(cfg, process, log, "ae", cfg.max_steps, flops, f"a NaN in the images of {dataset.name}, a NaN "
                        f"weight in {refine_path} or in the checkpoint this run resumed from, or a learning rate too "
                        f"high (--lr {cfg.lr})", step or None)

    def save(step):
        save_checkpoint(ckpt_path, "pae", pae, cfg, step, ema=ema, opt=opt, pae_args=pae.pae_args,
                        disc=disc.state_dict(), disc_opt=disc_opt.state_dict())
        write_grid(cfg, pae, dataset if held_out is None else held_out,
                   os.path.join(cfg.out_dir, f"grid_{step:07d}.png"), process.device)

    def checkpoint(step):
        meter.checkpoint(step, lambda: save(step))
        if held_out is not None:
            metrics = evaluate(cfg, process, pae, held_out, min(cfg.psnr_images, len(held_out)))
            log(f"ae step {step}: held-out PSNR {metrics['psnr']:.2f} dB (raw weights, the ones encode uses)")

    pae.train()
    while step < cfg.max_steps:
        lr = get_lr(cfg, step, cfg.max_steps)
        for group in opt.param_groups + disc_opt.param_groups:
            group["lr"] = lr
        batches, skipped = micro_batches(cfg, process, loader, step)
        parts_sum = train_step(batches, gan_on=cfg.gan_weight > 0 and step >= cfg.disc_start)
        step += 1
        meter.add(step, parts_sum, skipped)
        if step % cfg.log_every == 0 or step == cfg.max_steps:
            meter.emit(step, lr)
        if step % cfg.ckpt_every == 0 or step == cfg.max_steps:
            checkpoint(step)
    process.run0(lambda: save_checkpoint(final_path, "pae", pae, cfg, step, ema=ema, pae_args=pae.pae_args))
    log(f"ae: done at step {step}, tokenizer in {final_path} (raw weights in 'model', EMA in 'ema')")
    return os.path.abspath(final_path)

# -----------------------------------------------------------------------------
# stage eval: PSNR, rFID, LPC and GSQ of a PAE checkpoint on held-out images


def eval_stage(cfg, process, log, ae_path):
    if cfg.val_data == "" and cfg.data != "synthetic":
        fail("stage eval needs held-out images: pass --val_data DIR (e.g. the ImageNet val folder with class "
             "sub-folders)")
    pae = M.pae_from_checkpoint(ae_path, device=process.device)
    cfg.image_size = pae.image_size  # images are cropped to the size the tokenizer was trained at
    dataset = make_dataset(cfg, held_out=True)
    torch.manual_seed(cfg.seed)  # tiny preset: the same random LPIPS on every rank
    lpips_net = make_lpips(cfg).to(process.device)
    if cfg.fid_weights == "random":
        log("eval: random Inception weights (--fid_weights random): the rFID only tests the plumbing")
    try:
        inception = fid.load_inception(cfg.fid_weights or None, device=process.device, flag="--fid_weights")
    except SystemExit as e:  # no Inception weights: report everything else, and say how to get rFID
        inception = None
        log(f"eval: rFID skipped: {str(e).removeprefix('error: ')}")
    count = min(cfg.eval_images, len(dataset))
    log(f"eval: {ae_path} on {count} images of {dataset.name}")
    metrics = evaluate(cfg, process, pae, dataset, count, lpips_net, inception)
    log("eval: " + " | ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    if process.master:
        text = json.dumps({"ae_ckpt": ae_path, "images": count, **metrics}, indent=2)
        M.atomic_write(os.path.join(cfg.out_dir, "eval.json"), lambda f: f.write(text.encode()))
    return metrics

# -----------------------------------------------------------------------------
# --bench: the three stages' throughput at the configured size, on random images and weights (nothing downloaded)


def bench(cfg, process):
    """img/s, MFU (FLOPs counted once), peak memory and graph breaks of stage refine's step, stage ae's step (every
    loss, GAN on; MFU from the generator's FLOPs) and of encoding (image and flip), compile off and on."""
    micro = cfg.micro_batch_size or min(32, max(1, cfg.batch_size // process.world_size))
    device = process.device
    images = torch.rand(micro, 3, cfg.image_size, cfg.image_size, device=device)
    batches = [(images, 0)]
    for compiled in bench_modes(cfg):
        run = replace(cfg, compile=compiled)
        torch.manual_seed(cfg.seed)
        pae = new_pae(run, process, pretrained=False)
        refiner = M.build_refiner(pae.vfm.width, preset="tiny" if cfg.preset == "tiny" else None).to(device)
        train_step, refine_fn = refine_step(run, process, pae.vfm, refiner,
                                            make_optimizer(cfg, refiner.parameters(), device))
        flops = count_flops(lambda: refine_fn(images[:1])[0].backward())
        refiner.zero_grad(set_to_none=True)
        seconds = time_calls(lambda: train_step(batches), cfg.bench_steps, device)
        report(f"train_ae refine micro-batch {micro}", micro / seconds, "img", flops, device, compiled,
               f"{flops / 1e9:.1f} GFLOP/img fwd+bwd")
        refiner.requires_grad_(False).eval()
        disc = M.PatchDiscriminator().to(device)
        train_step, generator_loss = ae_step(run, process, pae, refiner, losses.LPIPS(pretrained=False).to(device),
                                             disc, make_optimizer(cfg, pae.trainable_parameters(), device),
                                             make_optimizer(cfg, disc.parameters(), device))
        flops = count_flops(lambda: generator_loss(pae, images[:1], True)[0].backward())
        pae.zero_grad(set_to_none=True)
        seconds = time_calls(lambda: train_step(batches, gan_on=True), cfg.bench_steps, device)
        report(f"train_ae ae micro-batch {micro}", micro / seconds, "img", flops, device, compiled,
               f"{flops / 1e9:.1f} GFLOP/img generator fwd+bwd (+ discriminator)")
        pae.eval()
        encode = torch.compile(pae.encode) if compiled else pae.encode

        def encode_pair():
            with torch.no_grad(), autocast(device):
                return torch.stack([encode(images), encode(images.flip(-1))], dim=1)

        flops = count_flops(lambda: pae.encode(images[:1]))
        seconds = time_calls(encode_pair, cfg.bench_steps, device)
        report(f"train_ae encode batch {micro}", micro / seconds, "img", 2 * flops, device, compiled,
               f"{flops / 1e9:.1f} GFLOP per encode; each image is encoded with its flip")

# -----------------------------------------------------------------------------
# main


def main(argv=None):
    cfg = parse_config(Config, argv, PRESETS)
    tiny = cfg.preset == "tiny"
    if tiny and (cfg.vfm, cfg.decoder) != (Config.vfm, Config.decoder):
        fail("--preset tiny builds its own tiny VFM and decoder; drop --vfm/--decoder, or use --preset paper")
    gpu_guard(cfg.device, not tiny and f"the paper-size tokenizer (VFM {cfg.vfm}, decoder {cfg.decoder})")
    if cfg.bench:
        process = Dist(cfg.device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        bench(cfg, process)
        return process.teardown()
    cfg.latents = os.path.abspath(cfg.latents or os.path.join(cfg.out_dir, "latents"))

    # --- plan: every output is checked before anything is written, so a mistaken rerun changes nothing
    plan = [cfg.stage] if cfg.stage else (["ae"] if cfg.refine_ckpt else ["refine", "ae"]) + ["encode"]
    for stage in {"refine", "ae"} & set(plan):
        check_resume(cfg, os.path.join(cfg.out_dir, f"ckpt_{stage}.pt"), [os.path.join(cfg.out_dir, f"{stage}.pt")])
    if "encode" in plan and os.path.isfile(os.path.join(cfg.latents, "meta.json")) and not cfg.overwrite:
        fail(f"{cfg.latents} already holds a complete latent cache; pass --overwrite to replace it (the new one is "
             f"swapped in only when complete) or choose another --latents")
    if "eval" in plan:
        check_output(os.path.join(cfg.out_dir, "eval.json"), cfg.overwrite)
    if cfg.stage in ("encode", "eval") and not os.path.isfile(cfg.ae_ckpt or os.path.join(cfg.out_dir, "ae.pt")):
        fail(f"stage {cfg.stage} needs a tokenizer: {cfg.ae_ckpt or os.path.join(cfg.out_dir, 'ae.pt')} does not "
             f"exist; pass --ae_ckpt PATH")

    # --- setup
    process = Dist(cfg.device)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    process.run0(lambda: lock_dir(cfg.out_dir) or save_config(  # encode and eval keep the training run's config.json
        cfg, cfg.out_dir, "config.json" if {"refine", "ae"} & set(plan) else f"config_{cfg.stage}.json"))
    log = Logger(cfg.out_dir, process.master)
    log(json.dumps(asdict(cfg)))
    if cfg.data == "synthetic" and not tiny:
        log("warning: training the paper-size PAE on the built-in synthetic images; pass --data DIR for ImageNet")

    # --- stages
    if cfg.stage == "":
        log(f"no --stage given: running {' -> '.join(plan)}" + (f" (P_t from --refine_ckpt {cfg.refine_ckpt})"
                                                                 if cfg.refine_ckpt else ""))
    refine_path = cfg.refine_ckpt or os.path.join(cfg.out_dir, "refine.pt")
    ae_path = os.path.abspath(cfg.ae_ckpt or os.path.join(cfg.out_dir, "ae.pt"))
    for stage in plan:
        if stage == "refine":
            refine_path = refine_stage(cfg, process, log)
        elif stage == "ae":
            ae_path = ae_stage(cfg, process, log, refine_path)
        elif stage == "encode":
            encode_stage(cfg, process, log, ae_path)
        else:
            eval_stage(cfg, process, log, ae_path)

    # --- teardown
    process.teardown()


if __name__ == "__main__":
    main()
