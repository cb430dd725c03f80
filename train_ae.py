r"""
Train the PAE tokenizer and extract the latent cache.

Stages (--stage): refine (P_t/Q_t on frozen VFM features) -> ae (the PAE tokenizer) -> encode (the latent
cache train_dit.py reads) and eval (PSNR, SSIM, rFID, LPC, GSQ, SSC, eRank). With no --stage: refine, ae,
encode.

CPU smoke run:  python train_ae.py --preset tiny                       (synthetic data, whole pipeline)
One GPU:        python train_ae.py --data /data/imagenet/train --val_data /data/imagenet/val
8 GPUs:         torchrun --nproc_per_node=8 train_ae.py --data /data/imagenet/train --val_data /data/imagenet/val
Two nodes:      torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 \
                    train_ae.py --data /data/imagenet/train
One stage:      add --stage refine | ae | encode | eval (ae needs --refine_ckpt or OUT_DIR/refine.pt,
                encode/eval need --ae_ckpt or OUT_DIR/ae.pt)
Resume:         add --resume auto: each stage continues OUT_DIR/ckpt_<stage>.pt if there is one, a finished stage
                or complete cache is kept (an encode without meta.json is rerun); the line for a scheduler.
Outputs:        OUT_DIR/{refine.pt, ae.pt (raw weights + EMA), grid_<step>.png}, LATENTS/{latents.npy, labels.npy,
                meta.json}
"""

# -----------------------------------------------------------------------------
# imports

import colorsys
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
from model import (Dist, Logger, RESUME, Run, autocast, batch_indices, batch_layout, bench_modes, check_output,
                   check_resume, count_flops, ema_update, fail, format_duration, gpu_guard, grad_sync, lock_dir,
                   make_optimizer, mixed_seed, parse_config, progress, report, save_checkpoint, save_config, step_flips,
                   time_calls, wrap)

# -----------------------------------------------------------------------------
# config

MCR_THETAS = {"cascade": (42.5, 85.0), "small": (42.5,), "large": (85.0,), "none": ()}  # degrees (--mcr_mode)


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
    refine_depth: int = 4  # ViT blocks of Q_t [our reading]
    upsample: str = "bilateral"  # structural target's feature up-sampler: bilateral | bilinear [our reading]
    bilateral_sigmas: str = "0.5,0.1"  # bilateral up-sampler: spatial sigma (tokens), range sigma (RGB) [our reading]
    lowpass: float = 0.4  # structural target's low-pass strength
    l1_weight: float = 1.0  # the paper's loss weights: L1 1, LPIPS 1, GAN 0.5, SSR 0.2, MCR 0.5, SCR 1
    lpips_weight: float = 1.0  # LPIPS (VGG16) reconstruction term; 0 = L1 alone, inside MCR too
    gan_weight: float = 0.5  # generator's GAN term, from disc_start on; 0 = no GAN (the discriminator is not trained)
    ssr_weight: float = 0.2  # SSR: token Gram matrix against the refined VFM structure
    mcr_weight: float = 0.5  # MCR: cascaded decodings of latents rotated by 42.5 and 85 degrees
    scr_weight: float = 1.0  # SCR: cosine to the refined targets Z_T, pooled and per token
    kl_weight: float = 0.0  # > 0: a diagonal-Gaussian posterior on the latent and its KL (ablation; paper: 1e-6)
    fusion: str = "sft"  # how the DAM's detail enters: sft (the paper's) | add | concat (the release's fusion modes)
    train_vfm: bool = False  # ablation: no DAM; the VFM itself is fine-tuned (the targets stay the frozen VFM's)
    vfm_lr_scale: float = 0.1  # with --train_vfm: the VFM's lr as a fraction of --lr [our reading]
    targets: str = "refined"  # SCR's target: refined (P_t of stage refine) | raw (VFM tokens, no refine stage)
    raw_target: str = "pca"  # targets raw: VFM tokens -> 32 channels by pca (first 256 images) | random [our reading]
    ssr_target: str = "h_ref"  # SSR's Gram target: h_ref (the structural target) | z_t (the SCR target) [our reading]
    scr_mode: str = "full"  # SCR's terms: full (pooled + per token) | pooled | patch
    mcr_mode: str = "cascade"  # MCR's rotations: cascade (42.5 then 85 degrees) | small (42.5) | large (85) | none
    disc_start: int = 5000  # step at which the GAN losses switch on
    disc_layers: int = 3  # PatchGAN strided layers [our reading]
    disc_norm: str = "group"  # PatchGAN norm: group (batch-size independent) | batch (pix2pix, taming) [our reading]
    disc_lr_scale: float = 1.0  # the discriminator's lr as a multiple of --lr
    disc_betas: str = "0.5,0.9"  # the discriminator's Adam betas (taming's); no weight decay or clipping by default
    disc_weight_decay: float = 0.0  # the discriminator's weight decay
    eval_images: int = 50_000  # stage eval: held-out images for PSNR / rFID (all of them if fewer)
    psnr_images: int = 1000  # held-out images for the periodic PSNR of stage ae
    lpc_images: int = 1000  # stage eval: images for the LPC diagnostic
    lpc_rhos: str = "0.1,0.5,1,2"  # LPC step sizes relative to |z|, weighted by 1/rho [our reading]
    gsq_protocol: str = "100,5"  # GSQ: classes per draw, draws (the paper's)
    ssim_window: str = "11,1.5"  # SSIM Gaussian window: taps, sigma (Wang et al.)
    ssc_images: int = 1000  # stage eval: images for SSC (masked data only: synthetic, or --ssc_masks)
    ssc_masks: str = ""  # label PNGs (one id per object) named like the --val_data images, for SSC
    ssc_sigma: float = 0.1  # SSC affinity exp(<z_i, z_j> / sigma) [our reading]
    ssc_clusters: int = 0  # SSC spectral clusters; 0 = the number of objects in the image's mask [our reading]
    to_uint8: str = "truncate"  # reconstructions to 8 bits for PSNR, SSIM and rFID, as sample.py: truncate | round
    lpips_vgg_weights: str = ""  # local torchvision vgg16-397923af.pth; "" = torch hub cache (tiny: random VGG)
    lpips_lin_weights: str = ""  # local LPIPS v0.1 vgg.pth (linear layers); "" = torch hub cache
    fid_weights: str = ""  # Inception weight file for rFID; "" = torch hub cache (no weights: rFID skipped)
    num_workers: int = 8  # data-loader processes per rank
    seed: int = 0  # initial weights, data order, flips and MCR directions derive from it
    log_every: int = 50  # steps
    ckpt_every: int = 2500  # steps; also writes the PNG grid and the held-out PSNR
    resume: str = "false"  # true (a bare --resume) | auto: each stage continues OUT_DIR/ckpt_<stage>.pt if it exists
    allow_change: str = ""  # with --resume: fields that may differ from the checkpoint's, e.g. lr,batch_size or dataset
    compile: bool = True  # torch.compile the training step
    bench: bool = False  # time the refine step, the ae step (every loss, GAN on) and encode on random data and weights
    bench_steps: int = 5  # timed steps per bench setting
    device: str = "auto"  # auto (the GPU when there is one) | cpu | cuda

    CHOICES = {"stage": ("", "refine", "ae", "encode", "eval"), "synthetic_kind": ("textures", "colours"),
               "vfm": tuple(M.VFM_PRESETS), "decoder": tuple(M.DECODER_PRESETS), "upsample": ("bilateral", "bilinear"),
               "device": M.DEVICES, "resume": RESUME, "fusion": ("sft", "add", "concat"), "targets": ("refined", "raw"),
               "raw_target": ("pca", "random"), "ssr_target": ("h_ref", "z_t"), "scr_mode": ("full", "pooled", "patch"),
               "mcr_mode": tuple(MCR_THETAS), "disc_norm": ("group", "batch"), "to_uint8": fid.TO_UINT8}
    BARE = {"resume": "true"}
    FREE = ("preset", "stage", "data", "val_data", "out_dir", "latents", "refine_ckpt", "ae_ckpt", "overwrite",
            "vfm_weights", "micro_batch_size", "refine_steps", "max_steps", "eval_images", "psnr_images", "lpc_images",
            "lpips_vgg_weights", "lpips_lin_weights", "fid_weights", "num_workers", "log_every", "ckpt_every",
            "lpc_rhos", "gsq_protocol", "ssim_window", "ssc_images", "ssc_masks", "ssc_sigma", "ssc_clusters",
            "to_uint8", "resume", "allow_change", "compile", "bench", "bench_steps", "device")  # may change on resume
    POSITIVE = ("image_size", "synthetic_size", "batch_size", "refine_steps", "max_steps", "lr", "log_every",
                "ckpt_every", "eval_images", "psnr_images", "lpc_images", "bench_steps", "refine_depth", "disc_layers",
                "vfm_lr_scale", "disc_lr_scale", "ssc_images", "ssc_sigma")
    NONNEGATIVE = ("micro_batch_size", "weight_decay", "grad_clip", "gram_weight", "lowpass", "l1_weight",
                   "lpips_weight", "gan_weight", "ssr_weight", "mcr_weight", "scr_weight", "disc_start",
                   "num_workers", "seed", "kl_weight", "disc_weight_decay", "ssc_clusters")
    UNIT = ("adam_beta1", "adam_beta2", "warmup", "min_lr_ratio", "ema_decay")


PRESETS = {
    "paper": {},
    # tiny: the CPU quickstart, 8 "colours" classes at 32 px. No LPIPS (its VGG would be random: L1 alone), MCR at 1/10
    # of the paper's weight and no GAN (it starts at the last step): at 32 px, with 48 pixel values per 32-channel
    # token, the paper's MCR holds the reconstructions at flat colour fields and the GAN adds a checker pattern
    "tiny": dict(image_size=32, synthetic_size=2048, synthetic_kind="colours", batch_size=16, refine_steps=100,
                 refine_depth=1, max_steps=500, lr=3e-3, lpips_weight=0.0, mcr_weight=0.05, disc_start=500,
                 log_every=50, ckpt_every=250, eval_images=256, psnr_images=32, lpc_images=16, num_workers=0,
                 compile=False, out_dir="out/tiny")}

# -----------------------------------------------------------------------------
# data: ImageFolder with the ADM center crop, a built-in synthetic dataset, a step-indexed sampler


def center_crop_adm(image, size, nearest=False):
    """ADM's center crop: halve with a box filter while the short side is >= 2*size, bicubic-resize the short
    side to size, then crop the centre. PIL image -> uint8 tensor (3, size, size); nearest: a label map (the SSC
    masks) resampled by nearest neighbour -> (size, size)."""
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(s // 2 for s in image.size), resample=Image.NEAREST if nearest else Image.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(s * scale) for s in image.size), Image.NEAREST if nearest else Image.BICUBIC)
    array = np.asarray(image)
    top, left = (array.shape[0] - size) // 2, (array.shape[1] - size) // 2
    crop = torch.from_numpy(array[top:top + size, left:left + size].copy())
    return crop if nearest else crop.permute(2, 0, 1)


class ImageFolderADM(torch.utils.data.Dataset):
    """root/CLASS/IMAGE files -> (uint8 image (3, S, S), label, unreadable). An unreadable file is replaced by the
    next readable one and counted once (unreadable = 1 at its own index): a warning and a duplicate, not the end of
    the run; the log lines say how many. 16-bit images are scaled to 8 bits (fid.rgb_image), not clipped."""

    def __init__(self, root, size, masks=""):
        if not os.path.isdir(root):
            fail(f"image folder {root} does not exist; pass --data DIR (class sub-folders) or --data synthetic")
        try:
            folder = torchvision.datasets.ImageFolder(root)
        except (FileNotFoundError, OSError) as e:
            fail(f"image folder {root} holds no class sub-folders with images ({e})")
        self.samples, self.size, self.num_classes = folder.samples, size, len(folder.classes)
        self.name, self.masks = os.path.abspath(root), masks

    def mask(self, index):
        """Object labels (S, S) of image `index` for SSC: the label PNG at the image's path under --ssc_masks (one id
        per object, COCO-panoptic style), cropped as the image is, by nearest neighbour."""
        image = self.samples[index][0]
        path = os.path.join(self.masks, os.path.splitext(os.path.relpath(image, self.name))[0] + ".png")
        if not os.path.isfile(path):
            fail(f"--ssc_masks has no label image {path} for {self.samples[index][0]}; give one PNG per image, "
                 f"named like it")
        with Image.open(path) as labels:
            return center_crop_adm(labels.convert("I"), self.size, nearest=True).long()

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        for offset in range(len(self.samples)):
            path, label = self.samples[(index + offset) % len(self.samples)]
            try:
                with Image.open(path) as image:
                    return center_crop_adm(fid.rgb_image(image), self.size), label, int(offset > 0)
            except (OSError, ValueError, Image.DecompressionBombError) as e:
                if offset == 0:
                    print(f"warning: unreadable image {path} ({type(e).__name__}: {e}); the next readable one stands "
                          f"in for it", flush=True)
        fail(f"no image in {self.name} can be read")


SHAPES = ("disc", "square", "triangle", "ring")
TEXTURES = ("solid", "stripes", "checker", "dots")
HUES = ("red", "orange", "lime", "green", "cyan", "blue", "violet", "magenta")  # 45 degrees apart
SYNTHETIC_CLASSES = {"textures": len(SHAPES) * len(TEXTURES), "colours": len(HUES)}


class SyntheticImages(torch.utils.data.Dataset):
    """Procedural class-conditional images at any size, label = index % classes. textures: 16 classes (shape,
    texture), random colours; colours: 8, class k = (shape k % 4, hue k), solid. Everything else is drawn from a
    generator seeded by (seed, index), so image i is always the same."""

    def __init__(self, count, size, seed=0, kind="textures"):
        self.count, self.size, self.seed, self.kind = count, size, seed, kind
        self.num_classes = SYNTHETIC_CLASSES[kind]
        self.name = f"synthetic(kind={kind}, count={count}, size={size}, seed={seed})"

    def __len__(self):
        return self.count

    def __getitem__(self, index):
        return self.render(index)[:3]

    def mask(self, index):
        """Object labels (S, S) for SSC: 1 on the shape, 0 on the background."""
        return (self.render(index)[3] > 0.5).long()

    def render(self, index):
        """(uint8 image (3, S, S), label, 0 unreadable, the shape's anti-aliased coverage (S, S))."""
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
            saturation, value = 0.75 + 0.25 * rand(1).item(), 0.7 + 0.3 * rand(1).item()
            ink = torch.tensor(colorsys.hsv_to_rgb(hue.item(), saturation, value)).view(3, 1, 1)
            paper = ink
        else:
            ink, paper = rand(3, 1, 1), rand(3, 1, 1)
        foreground = ink + (paper - ink) * pattern
        image = background * (1 - mask) + foreground * mask + 0.02 * torch.randn(3, S, S, generator=g)
        return (image.clamp(0, 1) * 255).round().to(torch.uint8), label, 0, mask


def make_dataset(cfg, held_out=False):
    """The training images, or the held-out ones (None when there are none)."""
    if held_out:
        if cfg.val_data:
            return ImageFolderADM(cfg.val_data, cfg.image_size, cfg.ssc_masks)
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


def shard_loader(cfg, process, dataset, count):
    """(loader, lo, batch): this rank's share lo..hi-1 of images 0..count-1 in order (encode and eval)."""
    lo, hi = process.rank * count // process.world_size, (process.rank + 1) * count // process.world_size
    batch = cfg.micro_batch_size or max(1, cfg.batch_size // process.world_size)
    return torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, range(lo, hi)), batch_size=batch,
                                       num_workers=cfg.num_workers, pin_memory=process.device.type == "cuda"), lo, batch


def to_images01(batch, device):
    """uint8 (B, 3, S, S) -> float in [0, 1] on the device."""
    return batch.to(device, non_blocking=True).float() / 255

# -----------------------------------------------------------------------------
# stage encode: the latent cache train_dit.py reads, written in place by all ranks


@torch.no_grad()
def encode_stage(cfg, process, log, ae_path):
    """All ranks fill their index ranges of the memmaps in place; meta.json, written last, marks the cache complete.
    --overwrite writes the new cache beside the old (LATENTS.new) and swaps it in once complete."""
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
    loader, lo, batch = shard_loader(cfg, process, dataset, count)
    log(f"encode: {count} images of {dataset.name} and their flips with {ae_path} -> {target} "
        f"(latents {C}x{H}x{W}, {num_classes} classes, {process.world_size} ranks x batch {batch})")
    counts = torch.zeros(2, device=process.device)  # images skipped as unreadable, latent values not finite
    start, i = time.perf_counter(), lo
    for images, y, skips in progress(loader, process.master, "encode", "batch"):
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
    if 2 * skipped > count:
        fail(f"encode: {skipped} of the {count} images of {dataset.name} cannot be read; fix the folder; {incomplete}")
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


def accumulate(process, module, batches, loss_fn, parts_sum, name="loss"):
    """loss_fn(module, images) -> (loss, parts, kept) for each of this rank's micro-batches [(images01, seed)]: the
    backward of loss / count (DDP syncs the gradients on the last one only), the loss (as `name`) and its parts
    averaged into parts_sum, the torch seed set per global micro-batch first (MCR directions). -> [kept]."""
    kept = []
    for k, (images, seed) in enumerate(batches):
        torch.manual_seed(seed)
        with grad_sync(module, k == len(batches) - 1), autocast(process.device):
            loss, parts, keep = loss_fn(module, images)
            (loss / len(batches)).backward()
        kept.append(keep)
        for key, value in {name: loss, **parts}.items():
            parts_sum[key] = parts_sum.get(key, 0) + value.detach().float() / len(batches)
    return kept


def fit(cfg, process, run, step, total, loader, train_step, optimizers, write, after_checkpoint=lambda step: None):
    """The loop of stages refine and ae from `step` to `total` (lr schedule times each group's lr_scale, step, log
    line, checkpoint: write(step) on rank 0 then after_checkpoint(step), stop signal) -> the last step."""
    while step < total:
        lr = get_lr(cfg, step, total)
        for group in (group for opt in optimizers for group in opt.param_groups):
            group["lr"] = lr * group.get("lr_scale", 1.0)
        batches, skipped = micro_batches(cfg, process, loader, step)
        parts = train_step(batches, step)
        step += 1
        run.add(step, parts, skipped)
        if step % cfg.log_every == 0 or step == total:
            run.emit(step, lr)
        if step % cfg.ckpt_every == 0 or step == total:
            run.checkpoint(step, lambda: write(step))
            after_checkpoint(step)
        if run.stop_requested():
            run.stop(step, lambda: write(step))
    run.close()
    return step


def get_lr(cfg, step, total_steps):
    """Linear warm-up over the first `warmup` fraction of the steps, then cosine down to lr * min_lr_ratio."""
    warmup = max(1, round(cfg.warmup * total_steps))
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    done = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * done)))


def micro_batches(cfg, process, loader, step):
    """This rank's micro-batches of a step as (images01 flipped by model.step_flips, torch seed of the global
    micro-batch for the loss's randomness): independent of the world size at a fixed micro-batch size."""
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
                                            pin_memory=process.device.type == "cuda",
                                            persistent_workers=cfg.num_workers > 0))


def new_pae(cfg, process, pretrained=True):
    """The PAE of the config on the device (random tiny VFM under --preset tiny; random VFM without pretrained),
    with the ablations that change the network (recorded in pae_args only when not the paper's)."""
    ablations = {k: v for k, v in dict(fusion=cfg.fusion, train_vfm=cfg.train_vfm, kl=cfg.kl_weight > 0).items()
                 if v != {"fusion": "sft"}.get(k, False)}
    return M.build_pae(vfm=cfg.vfm, decoder=cfg.decoder, preset="tiny" if cfg.preset == "tiny" else None,
                       vfm_weights=cfg.vfm_weights or None, image_size=cfg.image_size, pretrained=pretrained,
                       **ablations).to(process.device)


# -----------------------------------------------------------------------------
# stage refine: P_t / Q_t on frozen VFM features


def refine_step(cfg, process, vfm, refiner, opt):
    """(train_step, refine_fn): train_step(batches, step) runs one optimizer step of P_t / Q_t over this rank's
    micro-batches and returns the summed loss parts; refine_fn(refiner, images) is the loss of one micro-batch."""

    def refine_fn(module, images):
        with torch.no_grad():
            vfm_tokens = vfm(images)  # (B, N, W)
            H_ref = losses.structural_target(images, vfm_tokens, **h_ref_args(cfg))
        return (*losses.refine_loss(module, vfm_tokens, H_ref, cfg.gram_weight), None)

    refine_train = wrap(cfg, process, refiner)

    def train_step(batches, step=None):
        parts_sum = {}
        accumulate(process, refine_train, batches, refine_fn, parts_sum)
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
    refiner = M.build_refiner(vfm(probe).shape[-1], depth=cfg.refine_depth).to(process.device)
    opt = make_optimizer(cfg, refiner.parameters(), process.device)
    train_step, refine_fn = refine_step(cfg, process, vfm, refiner, opt)
    _, micro, accum = batch_layout(cfg, process)
    dataset = make_dataset(cfg)
    flops = count_flops(lambda: refine_fn(refiner, probe.expand(micro, -1, -1, -1))[0].backward()) / micro
    refiner.zero_grad(set_to_none=True)
    run = Run(cfg, process, log, "refine", ckpt_path, cfg.refine_steps, flops, f"a NaN in the images of "
              f"{dataset.name} or in the VFM's weights, or a learning rate too high (--lr {cfg.lr})")
    step = run.resume("refine", {"model": refiner, "opt": opt}, {"refiner_args": refiner.refiner_args},
                      {"dataset": dict(name=dataset.name, images=len(dataset))})
    if step >= cfg.refine_steps and os.path.isfile(final_path):
        run.close()
        return final_path
    process.run0(lambda: save_config(cfg, cfg.out_dir))
    log(f"refine: {sum(p.numel() for p in refiner.parameters()) / 1e6:.2f}M trainable parameters, {flops / 1e9:.2f} "
        f"GFLOP per image | data {dataset.name}: {len(dataset)} images | world {process.world_size} x micro-batch "
        f"{micro} x accumulation {accum} = batch {cfg.batch_size} | {cfg.refine_steps} steps")
    refiner.train()
    step = fit(cfg, process, run, step, cfg.refine_steps, train_loader(cfg, process, dataset, step), train_step, [opt],
               lambda step: save_checkpoint(ckpt_path, "refine", refiner, cfg, step, opt=opt, **run.extras()))
    process.run0(lambda: save_checkpoint(final_path, "refine", refiner, cfg, step, **run.extras()))
    log(f"refine: done at step {step}, P_t/Q_t in {final_path}")
    return final_path

# -----------------------------------------------------------------------------
# reconstruction metrics: PSNR, rFID, LPC, GSQ, shared by stages ae and eval

def numbers(cfg, name, count=None):
    """A comma-list field as positive floats (e.g. --disc_betas 0.5,0.9), or one sentence."""
    try:
        values = [float(v) for v in getattr(cfg, name).split(",")]
    except ValueError:
        values = []
    if not values or count and len(values) != count or not all(0 < v < math.inf for v in values):
        fail(f"--{name} {getattr(cfg, name)!r} must be {count or 'some'} positive numbers, comma-separated")
    return values


def recon_scores(cfg, recon01, images01):
    """Per-image PSNR (dB) and SSIM (losses.ssim, --ssim_window) of 8-bit images: the input, and the reconstruction
    converted as a sample would be (--to_uint8)."""
    recon8, images8 = fid.to_uint8(recon01, cfg.to_uint8).permute(0, 3, 1, 2).float(), (images01 * 255).round()
    mse = (recon8 - images8).pow(2).mean((1, 2, 3))
    window, sigma = numbers(cfg, "ssim_window", 2)
    ssim = losses.ssim(recon8 / 255, images8 / 255, int(window), sigma)
    return 10 * torch.log10(255 ** 2 / mse.clamp_min(1e-10)), ssim


@torch.no_grad()
def write_grid(cfg, pae, dataset, path, device):
    """PNG rows: input | reconstruction | decodings of the latent rotated by each MCR angle (--mcr_mode)."""
    images = to_images01(torch.stack([dataset[i][0] for i in range(min(8, len(dataset)))]), device)
    torch.manual_seed(cfg.seed)  # the same perturbation directions at every step
    with autocast(device):
        latent = pae.encode(images)
        rows = [images, pae.decode(latent)] + [pae.decode(z) for z in M.mcr_rotate(latent, MCR_THETAS[cfg.mcr_mode])]
    torchvision.utils.save_image(torch.cat(rows).float().clamp(0, 1), path, nrow=len(images))


@torch.no_grad()
def evaluate(cfg, process, pae, dataset, count, lpips_net=None, inception=None):
    """Reconstruct images 0..count-1 of the dataset, split over the ranks -> {"psnr", "ssim", "unreadable"}; with an
    LPIPS net (stage eval) also the latent diagnostics "lpc" (the first lpc_images), "gsq", "gsq_std", "erank" and,
    where the dataset has object masks, "ssc" (the first ssc_images); with an Inception net "rfid"."""
    loader, lo, batch = shard_loader(cfg, process, dataset, count)
    sums = torch.zeros(6, dtype=torch.float64, device=process.device)  # PSNR, LPC, SSIM, unreadable, SSC, SSC count
    moments = [torch.zeros(2048, dtype=torch.float64, device=process.device) for _ in range(2)]  # sum x: real, recon
    cross = [torch.zeros(2048, 2048, dtype=torch.float64, device=process.device) for _ in range(2)]  # sum x x^T
    masked = lpips_net is not None and (isinstance(dataset, SyntheticImages) or bool(getattr(dataset, "masks", "")))
    pooled, labels, i = [], [], lo
    was_training = pae.training
    pae.eval()
    for images, y, unreadable in progress(loader, process.master and lpips_net is not None, "eval", "batch"):
        x = to_images01(images, process.device)
        with autocast(process.device):
            latent = pae.encode(x)
            recon = pae.decode(latent).float()
        psnr, ssim = recon_scores(cfg, recon, x)
        sums[[0, 2, 3]] += torch.stack([psnr.sum(), ssim.sum(), unreadable.sum().to(psnr)]).double()
        pooled.append(latent.float().mean((2, 3)).cpu())  # (B, C) for GSQ and eRank
        labels.append(y)
        n = min(len(x), cfg.lpc_images - i)
        if lpips_net is not None and n > 0:  # directions seeded by the global image index
            g = torch.Generator(device=process.device).manual_seed(mixed_seed(cfg.seed, i))
            with autocast(process.device):
                sums[1] += losses.lpc(pae.decode, latent[:n].float(), lpips_net, numbers(cfg, "lpc_rhos"), g).sum()
        for j in range(min(len(x), cfg.ssc_images - i) if masked else 0):  # the replaced images' masks differ
            score = float("nan") if unreadable[j] else losses.ssc(latent[j:j + 1], dataset.mask(i + j)[None],
                                                                  cfg.ssc_sigma, cfg.ssc_clusters)
            sums[4:] += torch.tensor([score, 1.0], dtype=torch.float64) if score == score else 0
        if inception is not None:
            for k, imgs in enumerate((x, recon)):
                feats = fid.inception_features(inception, fid.to_uint8(imgs, cfg.to_uint8), batch)["pool"].double()
                moments[k] += feats.sum(0)
                cross[k] += feats.T @ feats
        i += len(x)
    pae.train(was_training)
    sums = process.all_reduce_mean(sums) * process.world_size
    results = {"psnr": sums[0].item() / count, "ssim": sums[2].item() / count, "unreadable": round(sums[3].item())}
    if lpips_net is not None:
        results["lpc"] = sums[1].item() / min(count, cfg.lpc_images)
        pooled, labels = torch.cat(pooled), torch.cat(labels)
        if process.world_size > 1:  # GSQ compares every latent with every other: gather them all
            gathered = [None] * process.world_size
            torch.distributed.all_gather_object(gathered, (pooled, labels))
            pooled, labels = torch.cat([p for p, _ in gathered]), torch.cat([y for _, y in gathered])
        classes, draws = numbers(cfg, "gsq_protocol", 2)
        results["gsq"], results["gsq_std"] = losses.gsq(pooled, labels, int(classes), int(draws), cfg.seed)
        results["erank"] = losses.erank(pooled)
        if masked:
            results["ssc"] = sums[4].item() / sums[5].item() if sums[5] else float("nan")
    if inception is not None:
        stats = []
        for k in range(2):  # mean and covariance (np.cov, N - 1) from all-reduced sums: no feature gather
            s = process.all_reduce_mean(moments[k]) * process.world_size
            ss = process.all_reduce_mean(cross[k]) * process.world_size
            mu = s / count
            stats += [mu.cpu().numpy(), ((ss - count * torch.outer(mu, mu)) / (count - 1)).cpu().numpy()]
        results["rfid"] = fid.frechet_distance(*stats)
    return results


def h_ref_args(cfg):
    """The structural target's settings (losses.structural_target)."""
    return dict(upsample=cfg.upsample, lowpass=cfg.lowpass, sigmas=tuple(numbers(cfg, "bilateral_sigmas", 2)))


class RawTarget(torch.nn.Module):
    """--targets raw: SCR's target from the raw VFM tokens (B, N, W), no refine stage: centred, projected to 32
    channels, on the sqrt(32) sphere [our reading]; the projection (--raw_target): pca, the top 32 axes of the first
    256 training images' tokens, or random, a fixed orthonormal map."""

    @torch.no_grad()
    def __init__(self, cfg, vfm, dataset, device):
        super().__init__()
        images = to_images01(torch.stack([dataset[i][0] for i in range(min(256, len(dataset)))]), device)
        tokens = torch.cat([vfm(chunk) for chunk in images.split(32)]).flatten(0, 1).double()  # (n * N, W)
        self.register_buffer("mean", tokens.mean(0).float())
        if cfg.raw_target == "pca":
            self.register_buffer("basis", torch.linalg.svd(tokens - tokens.mean(0), full_matrices=False)[2][
                :M.LATENT_CHANNELS].T.float().contiguous())
        else:
            noise = torch.randn(tokens.shape[1], M.LATENT_CHANNELS, generator=torch.Generator().manual_seed(cfg.seed))
            self.register_buffer("basis", torch.linalg.qr(noise)[0].to(device))

    def target(self, vfm_tokens):  # (B, N, W) -> (B, N, 32)
        return M.sphere((vfm_tokens.float() - self.mean) @ self.basis, dim=-1)


def make_lpips(cfg):
    """LPIPS with the pretrained VGG16 and v0.1 linear layers (tiny preset: a random VGG, unless files are given)."""
    return losses.LPIPS(pretrained=cfg.preset != "tiny", vgg_weights=cfg.lpips_vgg_weights or None,
                        lin_weights=cfg.lpips_lin_weights or None)


# -----------------------------------------------------------------------------
# stage ae: the PAE tokenizer with all the paper's losses, on our training recipe


def ae_step(cfg, process, pae, refiner, lpips_net, disc, opt, disc_opt, ema=None, target_vfm=None):
    """(train_step, generator_loss): train_step(batches, step) is one step of stage ae over this rank's micro-batches
    (the generator with every loss, the EMA, then D's hinge loss on the reconstructions) -> the loss parts;
    generator_loss(pae, images, gan_on) one micro-batch's. target_vfm: the frozen VFM of the targets (--train_vfm)."""
    weights = dict(l1=cfg.l1_weight, lpips=cfg.lpips_weight, gan=cfg.gan_weight, ssr=cfg.ssr_weight,
                   mcr=cfg.mcr_weight if MCR_THETAS[cfg.mcr_mode] else 0.0, scr=cfg.scr_weight, kl=cfg.kl_weight)

    def generator_loss(pae_module, images, gan_on):
        out = pae_module(images, thetas_deg=MCR_THETAS[cfg.mcr_mode] if weights["mcr"] else ())  # + rotated decodes
        if target_vfm is not None:
            out["vfm_tokens"] = target_vfm(images)
        total, parts = losses.pae_loss(out, images, lpips_net, refiner, disc if gan_on else None, **weights,
                                       h_ref=h_ref_args(cfg), ssr_target=cfg.ssr_target, scr_mode=cfg.scr_mode)
        return total, parts, out["recon"]

    def disc_loss(disc_module, images_and_fake):  # hinge loss: real and reconstructed images in one pass
        real, fake = disc_module(torch.cat(images_and_fake) * 2 - 1).chunk(2)
        return losses.hinge_d_loss(real, fake), {}, None

    pae_train, disc_train = wrap(cfg, process, pae), wrap(cfg, process, disc)

    def train_step(batches, step):
        gan_on = cfg.gan_weight > 0 and step >= cfg.disc_start
        disc.requires_grad_(False)  # the generator step only needs gradients through D, not of D
        parts_sum = {}
        fakes = accumulate(process, pae_train, batches, lambda module, images: generator_loss(module, images, gan_on),
                           parts_sum)
        parts_sum["grad"] = torch.nn.utils.clip_grad_norm_(pae.trainable_parameters(), cfg.grad_clip or float("inf"))
        opt.step()
        opt.zero_grad(set_to_none=True)
        if ema is not None:
            ema_update(ema, pae, cfg.ema_decay)
        disc.requires_grad_(True)
        if gan_on:  # D on this step's reconstructions; not clipped (taming's discriminator)
            accumulate(process, disc_train, [((images, fake.detach()), seed) for (images, seed), fake in
                                             zip(batches, fakes)], disc_loss, parts_sum, "disc")
            disc_opt.step()
            disc_opt.zero_grad(set_to_none=True)
        return parts_sum

    return train_step, generator_loss


def ae_stage(cfg, process, log, refine_path):
    ckpt_path, final_path = os.path.join(cfg.out_dir, "ckpt_ae.pt"), os.path.join(cfg.out_dir, "ae.pt")
    dataset, held_out = make_dataset(cfg), make_dataset(cfg, held_out=True)
    torch.manual_seed(cfg.seed)  # the same initial weights (and tiny random LPIPS) on every rank and every run
    lpips_net = make_lpips(cfg).to(process.device) if cfg.lpips_weight else None  # weight 0: L1 alone, MCR too
    pae = new_pae(cfg, process)
    target_vfm = new_pae(cfg, process).vfm if cfg.train_vfm else None  # the targets stay those of the frozen VFM
    targets = f"raw VFM tokens ({cfg.raw_target})" if cfg.targets == "raw" else refine_path
    if cfg.targets == "raw":
        refiner, identity = RawTarget(cfg, target_vfm or pae.vfm, dataset, process.device), {}
    else:  # P_t of the refine stage supplies the SCR targets, frozen
        refiner, refine_ckpt = M.refiner_from_checkpoint(refine_path, process.device)
        identity = {"refine_sha256": M.file_digest(refine_path)}
        made_for = (refine_ckpt["config"].get("vfm"), refine_ckpt["config"].get("preset") == "tiny",
                    refine_ckpt["refiner_args"].get("vfm_width"))
        if made_for != (cfg.vfm, cfg.preset == "tiny", pae.vfm.width):
            fail(f"{refine_path} was trained for VFM {made_for[0]!r} (preset {refine_ckpt['config'].get('preset')}), "
                 f"but this run uses {cfg.vfm!r} (preset {cfg.preset}); run --stage refine for it or pass the "
                 f"matching --refine_ckpt")
    disc = M.PatchDiscriminator(layers=cfg.disc_layers, norm=cfg.disc_norm).to(process.device)
    if cfg.train_vfm:
        ema = copy.deepcopy(pae).requires_grad_(False).eval()
    else:
        vfm, pae.vfm = pae.vfm, None  # the EMA shares the frozen VFM instead of holding a second copy
        ema = copy.deepcopy(pae).requires_grad_(False).eval()
        pae.vfm = ema.vfm = vfm
    vfm_params = set(pae.vfm.parameters())
    opt = make_optimizer(cfg, {1.0: [p for p in pae.trainable_parameters() if p not in vfm_params],
                               cfg.vfm_lr_scale: [p for p in pae.trainable_parameters() if p in vfm_params]},
                         process.device)
    disc_opt = make_optimizer(cfg, {cfg.disc_lr_scale: disc.parameters()}, process.device,
                              numbers(cfg, "disc_betas", 2), cfg.disc_weight_decay)
    train_step, generator_loss = ae_step(cfg, process, pae, refiner, lpips_net, disc, opt, disc_opt, ema, target_vfm)
    _, micro, accum = batch_layout(cfg, process)
    probe = torch.zeros(1, 3, cfg.image_size, cfg.image_size, device=process.device)  # one image: no memory spike
    flops = count_flops(lambda: generator_loss(pae, probe, False)[0].backward())
    pae.zero_grad(set_to_none=True)
    run = Run(cfg, process, log, "ae", ckpt_path, cfg.max_steps, flops, f"a NaN in the images of {dataset.name}, a "
              f"NaN weight in {refine_path} or {ckpt_path}, or a learning rate too high (--lr {cfg.lr})")
    step = run.resume("pae", {"model": pae, "ema": ema, "opt": opt, "disc": disc, "disc_opt": disc_opt},
                      {"pae_args": pae.pae_args}, {"dataset": dict(name=dataset.name, images=len(dataset)), **identity})
    if step >= cfg.max_steps and os.path.isfile(final_path):
        run.close()
        return os.path.abspath(final_path)
    process.run0(lambda: save_config(cfg, cfg.out_dir))
    log(f"ae: {sum(p.numel() for p in pae.trainable_parameters()) / 1e6:.2f}M trainable parameters, {flops / 1e9:.2f} "
        f"GFLOP per image (generator, fwd+bwd) | targets {targets} | data {dataset.name}: {len(dataset)} images "
        f"| world {process.world_size} x micro-batch {micro} x accumulation {accum} = batch {cfg.batch_size} | "
        f"{cfg.max_steps} steps, " + (f"GAN from step {cfg.disc_start}" if cfg.disc_start < cfg.max_steps and
                                      cfg.gan_weight else "no GAN")
        + ("" if held_out is not None else " | no --val_data: no held-out PSNR"))

    def write(step):  # rank 0: the checkpoint and the reconstruction grid
        save_checkpoint(ckpt_path, "pae", pae, cfg, step, ema=ema, opt=opt, disc=disc.state_dict(),
                        disc_opt=disc_opt.state_dict(), **run.extras())
        write_grid(cfg, pae, dataset if held_out is None else held_out,
                   os.path.join(cfg.out_dir, f"grid_{step:07d}.png"), process.device)

    def held_out_psnr(step):
        if held_out is not None:
            metrics = evaluate(cfg, process, pae, held_out, min(cfg.psnr_images, len(held_out)))
            log(f"ae step {step}: held-out PSNR {metrics['psnr']:.2f} dB (raw weights, the ones encode uses)")

    pae.train()
    step = fit(cfg, process, run, step, cfg.max_steps, train_loader(cfg, process, dataset, step), train_step,
               [opt, disc_opt], write, held_out_psnr)
    process.run0(lambda: save_checkpoint(final_path, "pae", pae, cfg, step, ema=ema, **run.extras()))
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
    if 2 * metrics["unreadable"] > count:
        fail(f"{metrics['unreadable']} of the {count} images of {dataset.name} cannot be read; fix the folder")
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
        refiner = M.build_refiner(pae.vfm.width, cfg.refine_depth).to(device)
        train_step, refine_fn = refine_step(run, process, pae.vfm, refiner,
                                            make_optimizer(cfg, refiner.parameters(), device))
        flops = count_flops(lambda: refine_fn(refiner, images[:1])[0].backward())
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
        seconds = time_calls(lambda: train_step(batches, cfg.disc_start), cfg.bench_steps, device)
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
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if cfg.bench:
        bench(cfg, process := Dist(cfg.device))
        return process.teardown()
    cfg.latents = os.path.abspath(cfg.latents or os.path.join(cfg.out_dir, "latents"))

    # --- plan: every output is checked before anything is written, so a mistaken rerun changes nothing
    plan = [cfg.stage] if cfg.stage else (["ae"] if cfg.refine_ckpt or cfg.targets == "raw" else ["refine", "ae"]) + [
        "encode"]
    for stage in {"refine", "ae"} & set(plan):
        check_resume(cfg, os.path.join(cfg.out_dir, f"ckpt_{stage}.pt"), [os.path.join(cfg.out_dir, f"{stage}.pt")])
    cache_done = "encode" in plan and os.path.isfile(os.path.join(cfg.latents, "meta.json")) and not cfg.overwrite
    if cache_done and cfg.resume != "auto":
        fail(f"{cfg.latents} already holds a complete latent cache; pass --overwrite to replace it (the new one is "
             f"swapped in only when complete) or choose another --latents")
    if "eval" in plan:
        check_output(os.path.join(cfg.out_dir, "eval.json"), cfg.overwrite)
    if cfg.stage in ("encode", "eval") and not os.path.isfile(cfg.ae_ckpt or os.path.join(cfg.out_dir, "ae.pt")):
        fail(f"stage {cfg.stage} needs a tokenizer: {cfg.ae_ckpt or os.path.join(cfg.out_dir, 'ae.pt')} does not "
             f"exist; pass --ae_ckpt PATH")

    # --- setup (the training stages write config.json once they have checked what they resume)
    process = Dist(cfg.device)
    process.run0(lambda: lock_dir(cfg.out_dir) or (cfg.stage in ("encode", "eval") and save_config(
        cfg, cfg.out_dir, f"config_{cfg.stage}.json")))
    log = Logger(cfg.out_dir, process.master)
    log(json.dumps(asdict(cfg)))
    if cfg.data == "synthetic" and not tiny:
        log("warning: training the paper-size PAE on the built-in synthetic images; pass --data DIR for ImageNet")
    if cache_done:
        plan.remove("encode")
        log(f"encode: {cfg.latents} is complete already (--resume auto): nothing to do")

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
        else:
            (encode_stage if stage == "encode" else eval_stage)(cfg, process, log, ae_path)

    # --- teardown
    process.teardown()


if __name__ == "__main__":
    main()
