r"""
FID, sFID, Inception Score, Precision and Recall as the ADM evaluator computes them, in plain PyTorch.

CPU smoke run:  python fid.py samples.npz --ref samples.npz --preset tiny
One GPU:        python fid.py samples.npz --ref VIRTUAL_imagenet256_labeled.npz
8 GPUs:         torchrun --nproc_per_node=8 fid.py samples.npz --ref VIRTUAL_imagenet256_labeled.npz --batch_size 2048
Two nodes:      torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 \
                    fid.py samples.npz --ref VIRTUAL_imagenet256_labeled.npz --batch_size 4096
Stats file:     python fid.py path/to/images/ --save_stats my_ref.npz      (then --ref my_ref.npz)
Offline:        add --weights pt_inception-2015-12-05-6726825d.pth          (default: download once to the hub cache)

SAMPLES and --ref each are an ADM-style .npz (arr_0: uint8 N x H x W x 3, any size), a folder of images
(searched recursively) or a statistics .npz (mu, sigma, mu_s, sigma_s, optionally the pool3 features "pool"
used for precision/recall; VIRTUAL_imagenet256_labeled.npz holds the statistics plus arr_0). Under torchrun
each rank extracts its share of the images and the features are gathered. Prints a table and one JSON line.
"""

# -----------------------------------------------------------------------------
# imports

import copy
import glob
import json
import os
import struct
import sys
import zipfile
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from scipy.special import log_softmax, rel_entr
from torchvision.models.inception import (BasicConv2d, Inception3, InceptionA, InceptionAux, InceptionB, InceptionC,
                                          InceptionD, InceptionE)

from model import (DEVICES, Dist, atomic_write, check_output, count_flops, fail, file_digest, parse_config, print0,
                   progress, report, time_calls)

# -----------------------------------------------------------------------------
# config


@dataclass
class Config:
    samples: str = ""  # images to score: .npz (arr_0), folder, or statistics .npz; may also come first, flag-less
    ref: str = ""  # reference, same kinds (VIRTUAL_imagenet256_labeled.npz for published numbers); "" = IS only
    save_stats: str = ""  # write the samples' mu, sigma, mu_s, sigma_s, pool to this path ending in .npz (folders made)
    overwrite: bool = False  # replace an existing --save_stats file (else refused)
    weights: str = ""  # local pt_inception-2015-12-05-6726825d.pth; "" = download once into the torch hub cache
    batch_size: int = 256  # global images per forward pass, split evenly over the ranks
    preset: str = "paper"  # paper | tiny (batch 32, for a CPU laptop)
    bench: bool = False  # time feature extraction (img/s) on random 256 px images and random weights; no files needed
    device: str = "auto"  # auto (the GPU when there is one) | cpu | cuda

    CHOICES = {"device": DEVICES}
    POSITIVE = ("batch_size",)


PRESETS = {"paper": {}, "tiny": {"batch_size": 32}}

# -----------------------------------------------------------------------------
# the FID Inception-v3: torchvision's Inception3 layout with the TF graph's pooling

WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
               "pt_inception-2015-12-05-6726825d.pth")  # the TF graph's weights, ported by pytorch-fid
WEIGHTS_SHA256_PREFIX = "6726825d"
DIMS = {"pool": 2048, "logits": 1008, "spatial": 2023}
TO_UINT8 = ("truncate", "round")  # to_uint8() modes, the first the published numbers' convention


def tf_avg_pool(x):
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)  # TF ignores the padding


class FIDInceptionA(InceptionA):
    def _forward(self, x):
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return [self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)), b3, self.branch_pool(tf_avg_pool(x))]


class FIDInceptionC(InceptionC):
    def _forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        b7dbl = self.branch7x7dbl_3(self.branch7x7dbl_2(self.branch7x7dbl_1(x)))
        b7dbl = self.branch7x7dbl_5(self.branch7x7dbl_4(b7dbl))
        return [self.branch1x1(x), b7, b7dbl, self.branch_pool(tf_avg_pool(x))]


class FIDInceptionE(InceptionE):
    max_pool = False  # True in Mixed_7c: the TF graph max-pools there (stride 1, padding 1)

    def _forward(self, x):
        b3, b3dbl = self.branch3x3_1(x), self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.max_pool else tf_avg_pool(x)
        return [self.branch1x1(x), torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1),
                torch.cat([self.branch3x3dbl_3a(b3dbl), self.branch3x3dbl_3b(b3dbl)], 1), self.branch_pool(pooled)]


class FIDInception(Inception3):
    """Module names are torchvision's, so pt_inception-2015-12-05-6726825d.pth loads with strict=True."""

    def __init__(self):
        super().__init__(num_classes=1008, aux_logits=False, init_weights=False, inception_blocks=[
            BasicConv2d, FIDInceptionA, InceptionB, FIDInceptionC, InceptionD, FIDInceptionE, InceptionAux])
        self.Mixed_7c.max_pool = True

    def forward(self, x):
        """x: (B, 3, 299, 299) normalised to [-1, 1] -> pool (B, 2048), logits (B, 1008), spatial (B, 2023)."""
        for name in ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1", "Conv2d_3b_1x1", "Conv2d_4a_3x3",
                     "maxpool2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c"):
            x = getattr(self, name)(x)
        branches = self.Mixed_6d._forward(x)  # branches[0] is the TF graph's mixed_6/conv (after its ReLU)
        spatial = branches[0][:, :7].permute(0, 2, 3, 1).flatten(1)  # (B, 17*17*7) in TF's NHWC order
        x = torch.cat(branches, 1)
        for name in ("Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c"):
            x = getattr(self, name)(x)
        pool = self.avgpool(x).flatten(1)  # (B, 2048) = TF's pool_3
        return {"pool": pool, "logits": pool @ self.fc.weight.T, "spatial": spatial}  # ADM's IS logits: no bias


def random_state_dict(net, seed=0):
    """Seeded random weights in the file's 472-tensor layout that keep activations O(1) through all 94 convs."""
    g, state = torch.Generator().manual_seed(seed), {}
    for name, t in net.state_dict().items():
        if name.endswith(("running_var", "bn.weight")):
            state[name] = 0.5 + torch.rand(t.shape, generator=g)
        elif name.endswith(("conv.weight", "fc.weight")):
            state[name] = torch.randn(t.shape, generator=g) * (2 / t[0].numel()) ** 0.5  # He init
        elif not name.endswith("num_batches_tracked"):  # bn.bias, running_mean, fc.bias
            state[name] = 0.1 * torch.randn(t.shape, generator=g)
    return state


def weights_file(weights, flag="--weights"):
    """Path of `weights` (hash checked) or of the hub cache's copy (downloaded); flag: the option named in messages."""
    if weights:
        if not os.path.isfile(weights):
            fail(f"Inception weight file {weights} does not exist; download {WEIGHTS_URL} and pass it with {flag}")
        digest = file_digest(weights)
        if not digest.startswith(WEIGHTS_SHA256_PREFIX):
            print0(f"warning: {weights} has SHA-256 {digest[:8]}..., not {WEIGHTS_SHA256_PREFIX}...; scores will "
                   f"not be comparable to published ones", file=sys.stderr)
        return weights
    path, error = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(WEIGHTS_URL)), None
    if int(os.environ.get("LOCAL_RANK", 0)) == 0 and not os.path.isfile(path):  # one download per node
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            torch.hub.download_url_to_file(WEIGHTS_URL, path, hash_prefix=WEIGHTS_SHA256_PREFIX)
        except (OSError, RuntimeError) as e:
            error = f"{type(e).__name__}: {e}"
    if dist.is_initialized():
        dist.barrier()  # every rank waits for the download, and every rank fails alike without it
    if not os.path.isfile(path):
        fail(f"the FID Inception weights could not be downloaded ({error or 'not found after the download'}); download "
             f"{WEIGHTS_URL} on a machine with internet access and pass it with {flag} PATH (or put it at {path})")
    return path


def load_inception(weights=None, device="cpu", flag="--weights"):
    """The FID Inception, eval mode, on `device`; weights: None = the standard file, a path to a copy, or "random"."""
    net = FIDInception()
    if weights == "random":
        net.load_state_dict(random_state_dict(net))
    else:
        path = weights_file(weights, flag)
        try:
            net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        except Exception as e:
            fail(f"{path} is not the FID Inception state dict ({type(e).__name__}: {str(e).splitlines()[0]}); "
                 f"use {os.path.basename(WEIGHTS_URL)}")
    return net.eval().requires_grad_(False).to(device)


# -----------------------------------------------------------------------------
# images: TF-graph preprocessing, readers for .npz and folders, feature extraction


def tf_resize_bilinear(x, size=299):
    """ADM's TF1 ResizeBilinear (no align_corners, half-pixel centres or antialias; TF's fp32 order), BHWC to size^2."""
    def along_dim1(t):  # TF's LegacyScaler source positions along dim 1, gathering whole contiguous slices
        n = t.shape[1]
        src = torch.arange(size, dtype=torch.float32, device=t.device) * (torch.tensor(float(n)) / size)
        lower, upper = t.index_select(1, src.floor().long()), t.index_select(1, src.ceil().long().clamp(max=n - 1))
        return lower + (upper - lower) * (src - src.floor())[:, None, None]
    x = along_dim1(x.transpose(1, 2).contiguous())  # along W first, as TF: (B, size, H, C)
    return along_dim1(x.transpose(1, 2).contiguous())  # then along H: (B, size, size, C)


def preprocess(images, device):
    """uint8 (B, H, W, 3) array/tensor or list of (H, W, 3) arrays -> (B, 3, 299, 299) in [-1, 1], as TF's graph."""
    if isinstance(images, list):
        if len({im.shape for im in images}) > 1:  # mixed sizes (a folder): resize one by one
            return torch.cat([preprocess(im[None], device) for im in images])
        images = np.stack(images)
    x = images if torch.is_tensor(images) else torch.from_numpy(np.array(images))  # a copy: memmaps are read-only
    x = ((tf_resize_bilinear(x.to(device).float()) - 128) / 128).permute(0, 3, 1, 2)  # channels_last strides
    return x if x.device.type == "cpu" else x.contiguous()  # oneDNN's NHWC convs: 1.4x on CPU; GPU: unmeasured


@contextmanager
def exact_fp32():
    """TF32 off while extracting (the reference ran in full fp32); the caller's setting is restored after."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def to_uint8(images01, mode="truncate"):
    """(B, 3, H, W) in [0, 1] -> uint8 (B, H, W, 3) tensor on the same device: clamp(255x, 0, 255) truncated (as
    released, and as the published FIDs were computed) or rounded (unbiased, +0.5/255 brighter on average)."""
    scaled = (images01.float() * 255).clamp(0, 255)
    return (scaled.round() if mode == "round" else scaled).to(torch.uint8).permute(0, 2, 3, 1)


def rgb_image(image):
    """An open PIL image as 8-bit RGB. 16-bit grey (I;16, I;16B, I;16L; I holding 16-bit data), which convert("RGB")
    clips at 255, scales by 255/65535, rounded; PIL reads 16-bit RGB(A) PNG/TIFF as 8-bit (the high byte) itself."""
    if image.mode == "I" or image.mode.startswith("I;16"):
        grey = np.rint(np.asarray(image, dtype=np.float64) * 255 / 65535).clip(0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    return image.convert("RGB")


def check_images(images, name):  # an ImageFolder reads every file as RGB uint8
    if not isinstance(images, ImageFolder) and (images.ndim != 4 or images.shape[-1] != 3
                                                or not str(images.dtype).endswith("uint8")):
        fail(f"{name} must be uint8 images of shape (N, H, W, 3), got {images.dtype} {tuple(images.shape)}")


@torch.inference_mode()
def inception_features(net, images, batch_size=250, show_progress=False):
    """{"pool": (N, 2048), "logits": (N, 1008), "spatial": (N, 2023)} float32 of uint8 NHWC images, all N here."""
    check_images(images, "the images")
    device = next(net.parameters()).device
    feats = {k: [torch.empty(0, d, device=device)] for k, d in DIMS.items()}
    with exact_fp32():
        for start in progress(range(0, len(images), batch_size), show_progress, "inception", "batch"):
            batch = images[start:start + batch_size]
            batch = batch.read() if isinstance(batch, ImageFolder) else batch
            for k, v in net(preprocess(batch, device)).items():
                feats[k].append(v)
    return {k: torch.cat(v) for k, v in feats.items()}


def gathered_features(net, images, batch_size):
    """inception_features() of all images on every rank: under torchrun each rank extracts a contiguous share."""
    world, rank = (dist.get_world_size(), dist.get_rank()) if dist.is_initialized() else (1, 0)
    bounds = [len(images) * r // world for r in range(world + 1)]
    feats = inception_features(net, images[bounds[rank]:bounds[rank + 1]], batch_size, show_progress=rank == 0)
    if world == 1:
        return feats
    largest = max(b - a for a, b in zip(bounds, bounds[1:]))
    for k, v in feats.items():  # all_gather needs equal sizes: pad, gather, trim
        parts = [torch.empty(largest, v.shape[1], device=v.device) for _ in range(world)]
        dist.all_gather(parts, torch.cat([v, v.new_zeros(largest - len(v), v.shape[1])]))
        feats[k] = torch.cat([p[:b - a] for p, a, b in zip(parts, bounds, bounds[1:])])
    return feats


class ImageFolder:
    """Image files under root (recursive, sorted). A slice is a lazy view; read() decodes it; failures go to .failed."""
    EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")

    def __init__(self, root):
        self.root, self.failed, self.pool = root, [], ThreadPoolExecutor(min(16, os.cpu_count()))
        self.files = sorted(p for p in glob.glob(os.path.join(root, "**", "*"), recursive=True)
                            if p.lower().endswith(self.EXTENSIONS))

    def __len__(self):
        return len(self.files)

    def __getitem__(self, index):
        view = copy.copy(self)
        view.files = self.files[index]
        return view

    def read(self):
        return list(self.pool.map(self.read_file, self.files))

    def read_file(self, path):
        try:
            with Image.open(path) as im:
                return np.asarray(rgb_image(im))
        except (OSError, ValueError, SyntaxError):  # PIL's errors for truncated, corrupt and non-image files
            self.failed.append(path)
            return np.zeros((299, 299, 3), np.uint8)  # a stand-in; statistics() stops after the pass


def npy_header(f):
    """(shape, fortran_order, dtype) of the .npy stream f, which is left at the start of the data."""
    version = np.lib.format.read_magic(f)
    return (np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0)(f)


def npz_images(path, header_only=False):
    """arr_0 of an ADM .npz, memory-mapped if stored (ranks read their share); header_only: a zero-memory stand-in."""
    with zipfile.ZipFile(path) as zf:
        if "arr_0.npy" not in zf.namelist():
            fail(f"{path} has no arr_0 (uint8 N x H x W x 3 images) and no mu/sigma statistics")
        info = zf.getinfo("arr_0.npy")
        if header_only:
            with zf.open(info) as f:
                shape, _, dtype = npy_header(f)
            return np.broadcast_to(np.zeros((), dtype), shape)
        if info.compress_type != zipfile.ZIP_STORED:
            return np.load(path)["arr_0"]
    with open(path, "rb") as f:  # the member's data follow its local header (30 bytes + name + extra field)
        f.seek(info.header_offset + 26)
        name_len, extra_len = struct.unpack("<HH", f.read(4))
        f.seek(info.header_offset + 30 + name_len + extra_len)
        shape, fortran_order, dtype = npy_header(f)
        offset = f.tell()
    return np.memmap(path, dtype=dtype, mode="r", shape=shape, offset=offset, order="F" if fortran_order else "C")


# -----------------------------------------------------------------------------
# statistics and metrics


def needs_images(names, path):
    """Whether an .npz with these members is scored from arr_0 (mu needs sigma, mu_s sigma_s; a pool is no stats)."""
    for first, second in (("mu", "sigma"), ("mu_s", "sigma_s")):
        if (first in names) != (second in names):
            held, lacking = (first, second) if first in names else (second, first)
            fail(f"{path} holds {held} but no {lacking}; recompute the statistics: fid.py IMAGES --save_stats NEW.npz")
    if "mu" not in names and "arr_0" not in names:
        fail(f"{path} has no arr_0 (uint8 N x H x W x 3 images) and no mu/sigma statistics")
    return "arr_0" in names and not ("mu" in names and "pool" in names)  # ADM's reference: arr_0 gives the pool


def statistics(source, net, batch_size=250):
    """{"mu", "sigma", "mu_s", "sigma_s", "pool"} of a uint8 NHWC array/tensor, an .npz of images, a folder or a
    statistics .npz (returned as stored; pool3 features of its arr_0 are added, as ADM does for its reference)."""
    if isinstance(source, dict):
        return source
    stats, images = {}, source
    if isinstance(source, str):
        if os.path.isdir(source):
            images = ImageFolder(source)
            if len(images) == 0:
                fail(f"no image files ({', '.join(ImageFolder.EXTENSIONS)}) under {source}")
        elif not os.path.isfile(source):
            fail(f"{source} does not exist; give an .npz of images, a folder of images or a statistics .npz")
        else:
            try:
                with np.load(source) as f:
                    stats, names = {k: f[k] for k in ("mu", "sigma", "mu_s", "sigma_s", "pool") if k in f}, f.files
            except (OSError, ValueError, zipfile.BadZipFile) as e:
                fail(f"{source} cannot be read as an .npz ({type(e).__name__}); give an .npz, a folder or stats")
            images = npz_images(source) if needs_images(names, source) else None
    if images is None:
        return stats
    check_images(images, f"{source if isinstance(source, str) else 'the images'}: arr_0")
    if len(images) < 2:
        fail(f"{source if isinstance(source, str) else 'the images'} hold {len(images)} image(s); FID needs at "
             f"least 2 to estimate a covariance")
    if len(images) < DIMS["pool"]:
        print0(f"warning: {len(images)} images, fewer than the {DIMS['pool']} Inception features: the covariance "
               f"is rank-deficient and the FID is biased high; published numbers use 50,000", file=sys.stderr)
    feats = {k: v.double().cpu().numpy() for k, v in gathered_features(net, images, batch_size).items()}
    if isinstance(images, ImageFolder):
        failed = images.failed
        if dist.is_initialized():
            lists = [None] * dist.get_world_size()
            dist.all_gather_object(lists, failed)
            failed = sum(lists, [])
        if failed:
            fail(f"{len(failed)} of {len(images)} image files under {images.root} cannot be read ("
                 f"{', '.join(sorted(failed)[:3])}{', ...' if len(failed) > 3 else ''}); fix or remove them")
    computed = {"mu": feats["pool"].mean(0), "sigma": np.cov(feats["pool"], rowvar=False),
                "mu_s": feats["spatial"].mean(0), "sigma_s": np.cov(feats["spatial"], rowvar=False),
                "pool": feats["pool"].astype(np.float32)}
    return {**computed, **stats}  # stored statistics win (ADM's reference: mu/sigma over all of ImageNet)


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """||mu1 - mu2||^2 + tr S1 + tr S2 - 2 tr sqrt(S1 S2) in float64, via the eigenvalues of PSD sqrt(S1) S2 sqrt(S1):
    ADM's sqrtm number (4e-13 apart at 2048-d), 5x faster and stable for a singular S1 S2 (no 1e-6 I retry needed)."""
    mu1, sigma1, mu2, sigma2 = (torch.as_tensor(np.asarray(a), dtype=torch.float64) for a in (mu1, sigma1, mu2, sigma2))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        fail(f"the two sets of statistics have different dimensions (mu {tuple(mu1.shape)} vs {tuple(mu2.shape)}, "
             f"sigma {tuple(sigma1.shape)} vs {tuple(sigma2.shape)}); both must come from the same Inception layer")
    if not all(torch.isfinite(a).all() for a in (mu1, sigma1, mu2, sigma2)):
        fail("the statistics contain NaN or inf; recompute them from finite features")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2-3 s at 2048-d on one core; extra threads gain little and lose 3x on shared cores
    try:
        eigenvalues, vectors = torch.linalg.eigh(sigma1)
        root1 = (vectors * eigenvalues.clamp(min=0).sqrt()) @ vectors.T
        tr_covmean = torch.linalg.eigvalsh(root1 @ sigma2 @ root1).clamp(min=0).sqrt().sum()
    finally:
        torch.set_num_threads(threads)
    scale = ((mu1 - mu2).square().sum() + sigma1.trace() + sigma2.trace()).item()
    value = scale - 2 * tr_covmean.item()
    return 0.0 if -1e-4 * scale < value < 0 else value  # a rounded distance of 0 (a set against itself) reads 0


def inception_score(logits, split_size=5000):
    """ADM's IS: exp(E KL(p(y|x) || p(y))) over consecutive splits of split_size, averaged. logits: (N, 1008)."""
    log_p = log_softmax(np.asarray(logits, dtype=np.float64), axis=1)
    splits = (np.exp(log_p[start:start + split_size]) for start in range(0, len(log_p), split_size))  # p(y|x)
    return float(np.mean([np.exp(rel_entr(p, p.mean(0, keepdims=True)).sum(1).mean()) for p in splits]))


@torch.inference_mode()
def precision_recall(ref_feats, sample_feats, k=3, device="cpu", rows=4096):
    """Kynkaanniemi et al.'s k-NN manifolds as in ADM: each set's balls reach its points' k-th nearest neighbours."""
    ref, smp = (torch.as_tensor(np.asarray(f), dtype=torch.float32, device=device) for f in (ref_feats, sample_feats))
    if ref.shape[1] != smp.shape[1]:
        fail(f"reference and sample features have different dimensions ({ref.shape[1]} vs {smp.shape[1]})")

    def sq_dists(a, b):  # (A, B) squared Euclidean distances, as ADM's _batch_pairwise_distances
        return (a.square().sum(1, keepdim=True) - 2 * a @ b.T + b.square().sum(1)).clamp(min=0)

    def radii(x):  # (N,) squared distance to the k-th nearest neighbour, itself excluded
        return torch.cat([sq_dists(x[i:i + rows], x).kthvalue(k + 1, dim=1).values for i in range(0, len(x), rows)])

    def inside(x, centres, r):
        return torch.cat([(sq_dists(x[i:i + rows], centres) <= r).any(1) for i in range(0, len(x), rows)])

    with exact_fp32():  # precision: samples inside reference balls, then recall: references inside sample balls
        return tuple(inside(a, b, radii(b)).double().mean().item() for a, b in ((smp, ref), (ref, smp)))


def compute_metrics(samples, ref=None, net=None, batch_size=250):
    """{"fid", "sfid", "is", "precision", "recall", "n"} (None: not computable) of statistics() inputs; all ranks."""
    if net is None:
        net = load_inception(device=f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu")
    s, r = statistics(samples, net, batch_size), statistics(ref, net, batch_size) if ref is not None else {}
    metrics = {"fid": None, "sfid": None, "is": None, "precision": None, "recall": None, "n": None}
    if "pool" in s:
        metrics["n"] = len(s["pool"])
        metrics["is"] = inception_score(s["pool"] @ net.fc.weight.cpu().double().numpy().T)
    if "mu" in r:
        metrics["fid"] = frechet_distance(s["mu"], s["sigma"], r["mu"], r["sigma"])
    if "mu_s" in r and "mu_s" in s:
        metrics["sfid"] = frechet_distance(s["mu_s"], s["sigma_s"], r["mu_s"], r["sigma_s"])
    if "pool" in r and "pool" in s and min(len(r["pool"]), len(s["pool"])) > 3:  # k = 3 neighbours need 4 points
        metrics["precision"], metrics["recall"] = precision_recall(r["pool"], s["pool"], device=net.fc.weight.device)
    return metrics


def print_metrics(metrics):
    """compute_metrics() as a table, then as one JSON line: the last line on stdout, for scripts (rank 0 only)."""
    names = {"fid": "FID", "sfid": "sFID", "is": "IS", "precision": "Precision", "recall": "Recall", "n": "images"}
    for key, name in names.items():
        print0(f"{name:<10} {'-' if metrics[key] is None else metrics[key] if key == 'n' else f'{metrics[key]:.4f}'}")
    print0(json.dumps(metrics))


# -----------------------------------------------------------------------------
# main


def check_source(path, what):
    """Before the Inception pass: a folder of images or a readable .npz of images (arr_0) or Inception-sized stats."""
    if os.path.isdir(path):
        if not ImageFolder(path).files:
            fail(f"{what} {path} holds no image files ({', '.join(ImageFolder.EXTENSIONS)})")
        return
    if not os.path.isfile(path):
        fail(f"{what} {path} does not exist; give an .npz of images, a folder of images or a statistics .npz")
    if not path.endswith(".npz"):
        fail(f"{what} {path} is not an .npz (images in arr_0, or mu/sigma statistics) nor a folder of images")
    try:
        with np.load(path) as f:
            shapes, names = {k: f[k].shape for k in ("mu", "sigma", "mu_s", "sigma_s") if k in f.files}, f.files
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        fail(f"{what} {path} cannot be read as an .npz ({type(e).__name__})")
    want = {"mu": (DIMS["pool"],), "sigma": (DIMS["pool"],) * 2, "mu_s": (DIMS["spatial"],),
            "sigma_s": (DIMS["spatial"],) * 2}
    wrong = [f"{k} {shape}" for k, shape in shapes.items() if shape != want[k]]
    if wrong:
        fail(f"{what} {path} holds statistics of other dimensions ({', '.join(wrong)}; FID Inception: mu "
             f"{want['mu']}, mu_s {want['mu_s']}); they come from another network")
    if needs_images(names, f"{what} {path}"):
        check_images(npz_images(path, header_only=True), f"{what} {path}: arr_0")


def bench(cfg, process, batches=4):
    """img/s of Inception feature extraction (TF resize to 299, fp32, TF32 off) on random 256 px uint8 images."""
    net, per_rank = load_inception("random", process.device), cfg.batch_size // process.world_size
    images = torch.randint(0, 256, (batches * per_rank, 256, 256, 3), dtype=torch.uint8)
    with exact_fp32():
        flops = count_flops(lambda: net(preprocess(images[:1], process.device)))
    seconds = time_calls(lambda: inception_features(net, images, per_rank), 1, process.device, warmup=1)
    report(f"fid.py Inception, batch {per_rank}", len(images) / seconds, "img", flops, process.device, False,
           f"{flops / 1e9:.1f} GFLOP/img; 50,000 samples take {50_000 / (len(images) / seconds):.0f} s here")


def main():
    argv = sys.argv[1:]
    if argv and not argv[0].startswith("-"):
        argv = ["--samples", *argv]  # `python fid.py SAMPLES ...`
    cfg = parse_config(Config, argv, PRESETS)
    if cfg.bench:
        process = Dist(cfg.device)
        bench(cfg, process)
        return process.teardown()
    if not cfg.samples:
        fail("give the images to score: python fid.py SAMPLES [--ref REF] (see --help)")
    for path, what in ((cfg.samples, "SAMPLES"), (cfg.ref, "--ref")):  # before the weights load (or download)
        if path:
            check_source(path, what)
    if cfg.save_stats:
        if not cfg.save_stats.endswith(".npz"):
            fail(f"--save_stats {cfg.save_stats} must end in .npz, the only kind of statistics file --ref reads")
        check_output(cfg.save_stats, cfg.overwrite, inputs=(cfg.samples, cfg.ref, cfg.weights))
    process = Dist(cfg.device)
    if cfg.batch_size % process.world_size:
        fail(f"--batch_size {cfg.batch_size} is not divisible by the {process.world_size} ranks")
    torch.backends.cudnn.benchmark = True  # fixed input shape: let cuDNN pick its fastest fp32 kernels

    net = load_inception(cfg.weights or None, process.device)
    stats = statistics(cfg.samples, net, cfg.batch_size // process.world_size)

    def save():  # check_output found the nearest existing folder writable, so the missing ones can be made
        os.makedirs(os.path.dirname(os.path.abspath(cfg.save_stats)), exist_ok=True)
        atomic_write(cfg.save_stats, lambda f: np.savez(f, **stats))
        print0(f"wrote {cfg.save_stats}")

    if cfg.save_stats:
        process.run0(save)
    print_metrics(compute_metrics(stats, cfg.ref or None, net, cfg.batch_size // process.world_size))
    process.teardown()


if __name__ == "__main__":
    main()
