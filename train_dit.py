r"""
Train LightningDiT with flow matching on a PAE latent cache.

CPU smoke run:  python train_dit.py --preset tiny --latents out/tiny/latents
One GPU:        python train_dit.py --latents out/latents --micro_batch_size 64   (gradient accumulation: batch 1024)
8 GPUs:         torchrun --nproc_per_node=8 train_dit.py --latents out/latents
Two nodes:      torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 \
                    train_dit.py --latents out/latents
Resume:         add --resume (continues from OUT_DIR/ckpt.pt)
Benchmark:      python train_dit.py --bench --model XL/1   (random latents; img/s, MFU, memory; compile off/on)
"""

# -----------------------------------------------------------------------------
# imports

import copy
import dataclasses
import functools
import json
import os
import queue
import tempfile
import threading
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
from numpy.lib.format import open_memmap
from torch.nn.parallel import DistributedDataParallel as DDP
from torchvision.utils import save_image

import sample
from losses import flow_matching_loss, sample_timesteps
from model import (DEVICES, Dist, Logger, autocast, batch_layout, build_dit, cache_ae, check_finite, count_flops, dit_preset,
                   ema_update, fail, format_duration, gpu_guard, load_checkpoint, lock_dir, make_optimizer,
                   bench_modes, pae_from_checkpoint, parse_config, peak_flops, read_latent_meta, report, save_checkpoint,
                   save_config, mixed_seed, time_calls)

# -----------------------------------------------------------------------------
# config


@dataclass
class Config:
    preset: str = "paper"  # paper | tiny (CPU-sized model and batch)
    latents: str = "out/latents"  # latent cache directory written by train_ae.py --stage encode
    out_dir: str = "out/dit"  # checkpoints, config.json, log.txt
    model: str = "XL/1"  # DiT preset SIZE/PATCH: tiny, S, B, L, XL with patch 1 or 2
    qk_norm: bool = False  # QK RMSNorm in attention (on for the 800-epoch recipe)
    grad_ckpt: bool = False  # activation checkpointing per block (saves memory, costs ~30% speed)
    batch_size: int = 1024  # global batch (all ranks, all accumulation steps)
    micro_batch_size: int = 0  # per-rank batch of one forward pass; 0 = batch_size / world_size
    max_steps: int = 100_000  # 80 epochs of ImageNet at batch 1024; 1M steps for 800 epochs
    lr: float = 2e-4  # constant (released LightningDiT config)
    adam_beta1: float = 0.9  # AdamW beta1
    adam_beta2: float = 0.95  # AdamW beta2 (released LightningDiT config)
    weight_decay: float = 0.0  # on >=2-D weights only
    grad_clip: float = 0.0  # max grad norm; 0 = off (the paper does not clip)
    ema_decay: float = 0.9999  # EMA of the weights, updated every step; sampling uses it
    time_shift: float = 0.7  # logit-normal timesteps shifted towards noise, s = 0.7
    label_dropout: float = 0.1  # labels replaced by the null class for classifier-free guidance
    seed: int = 0  # initial weights and every step's data order, noise, t, flips and label drops
    log_every: int = 100  # steps
    ckpt_every: int = 5000  # steps; a checkpoint is also written at the end
    sample_every: int = 10_000  # steps; PNG grid of EMA samples (sample.py's 80ep settings) via the cache's AE; 0 = off
    resume: bool = False  # continue from out_dir/ckpt.pt
    overwrite: bool = False  # start a new run in place of an existing out_dir/ckpt.pt (else refused)
    compile: bool = True  # torch.compile the model
    bench: bool = False  # time bench_steps steps on random latents (no cache needed), compile off and on
    bench_steps: int = 20  # timed steps per bench setting
    ae_ckpt: str = ""  # AE for the sample grids; "" = the one the cache was encoded with (its file is checked)
    device: str = "auto"  # auto (the GPU when there is one) | cpu | cuda

    CHOICES = {"device": DEVICES}
    POSITIVE = ("batch_size", "max_steps", "lr", "time_shift", "log_every", "ckpt_every", "bench_steps")
    NONNEGATIVE = ("micro_batch_size", "weight_decay", "grad_clip", "seed", "sample_every")
    UNIT = ("adam_beta1", "adam_beta2", "ema_decay", "label_dropout")


PRESETS = {
    "paper": {},
    "tiny": dict(model="tiny/1", batch_size=32, max_steps=1500, lr=2e-3, ema_decay=0.99, log_every=250,
                 ckpt_every=500, sample_every=750, compile=False,  # EMA 0.9999 would still be 86% the initial model
                 out_dir="out/tiny/dit", latents="out/tiny/latents"),
}

# -----------------------------------------------------------------------------
# data: the memory-mapped latent cache


class LatentCache:
    """latents.npy (N, 2, C, H, W) float16 [image, flip], labels.npy (N,), meta.json (written by encode)."""

    def __init__(self, path):
        meta_path = os.path.join(path, "meta.json")
        if not os.path.isdir(path):
            fail(f"latent directory {path} does not exist; write it with `train_ae.py --stage encode` or pass "
                 f"--latents DIR")
        if not os.path.isfile(meta_path):
            fail(f"latent directory {path} has no meta.json, so the cache is incomplete (an interrupted encode?); "
                 f"rerun `train_ae.py --stage encode --overwrite`")
        self.meta = read_latent_meta(meta_path)
        try:
            self.latents = np.load(os.path.join(path, "latents.npy"), mmap_mode="r")
            self.labels = np.load(os.path.join(path, "labels.npy"))
        except (OSError, ValueError) as e:
            fail(f"latent cache {path} cannot be read ({e}); rerun `train_ae.py --stage encode --overwrite`")
        C, S, N = self.meta["channels"], self.meta["size"], self.meta["count"]
        if self.latents.shape != (N, 2, C, S, S) or self.labels.shape != (N,):
            fail(f"latent cache {path} holds latents {self.latents.shape} and labels {self.labels.shape}, but its "
                 f"meta.json says {N} latents of {C}x{S}x{S}; rerun `train_ae.py --stage encode --overwrite`")
        self.count, self.channels, self.size, self.num_classes = N, C, S, self.meta["num_classes"]
        if N and not 0 <= self.labels.min() <= self.labels.max() < self.num_classes:
            fail(f"latent cache {path} has labels from {self.labels.min()} to {self.labels.max()}, outside the "
                 f"{self.num_classes} classes of its meta.json (label {self.num_classes} is the null class of "
                 f"guidance); fix num_classes or the labels and rerun the encode")
        self.mean = torch.tensor(self.meta["mean"], dtype=torch.float32).view(1, C, 1, 1)
        self.std = torch.tensor(self.meta["std"], dtype=torch.float32).view(1, C, 1, 1)
        self._perms = {}

    def indices(self, step, batch_size, seed):
        """Global sample indices of a step: a pure function of the step, so resume needs no data state."""
        positions = np.arange(step * batch_size, (step + 1) * batch_size)
        out = np.empty(batch_size, dtype=np.int64)
        for epoch in np.unique(positions // self.count):
            perms = self._perms  # one read, one write: the reader thread and the main thread may both call this
            if epoch not in perms:  # one shuffle per epoch, from (seed, epoch)
                perms = self._perms = {epoch: np.random.default_rng((seed, int(epoch))).permutation(self.count)}
            sel = positions // self.count == epoch
            out[sel] = perms[epoch][positions[sel] % self.count]
        return out

    def read(self, indices, flips, pin=False):
        """Raw latents (B, C, H, W) float16 and labels (B,) of the given rows, on the CPU; pinned for a GPU, so the
        copy to it does not block."""
        order = np.argsort(indices)  # sorted reads are kinder to the memory map
        rows = self.latents[indices[order], flips[order].astype(np.int64)]
        latents = torch.empty(len(indices), self.channels, self.size, self.size, dtype=torch.float16, pin_memory=pin)
        latents[torch.from_numpy(order)] = torch.from_numpy(rows)
        labels = torch.from_numpy(self.labels[indices])
        return latents, labels.pin_memory() if pin else labels

    def to(self, device):
        """Keep the statistics on the device, so normalising a step's latents copies nothing from the host."""
        self.mean, self.std = self.mean.to(device), self.std.to(device)
        return self

    def normalise(self, latents):
        """(x - mean) / std per channel, in fp32 (the statistics must be on the latents' device: to())."""
        return (latents.float() - self.mean) / self.std


def step_seed(cfg, step, stream):
    """A 32-bit seed for one random stream of one step (0: flips, 1: the rest), mixed from (seed, step, stream)."""
    return mixed_seed(cfg.seed, step, stream)


def step_flips(cfg, step):
    """The whole global batch's horizontal flips of a step (bool array), from a CPU generator of its own: the reader
    thread needs them on the host to pick the memory-mapped rows."""
    gen = torch.Generator().manual_seed(step_seed(cfg, step, 0))
    return (torch.rand(cfg.batch_size, generator=gen) < 0.5).numpy()


def step_randomness(cfg, step, shape, device):
    """Label drops, timesteps and noise of the whole global batch, drawn on the device from a generator seeded by
    (seed, step): every rank draws all of them and keeps its slice, so they are identical for any world size and
    after a resume. On CUDA the Philox generator makes them bit-identical across runs and GPU counts on the same GPU
    model; they differ from the CPU's draws."""
    gen = torch.Generator(device=device).manual_seed(step_seed(cfg, step, 1))
    B = cfg.batch_size
    drop = torch.rand(B, generator=gen, device=device) < cfg.label_dropout
    t = sample_timesteps(B, cfg.time_shift, generator=gen, device=device)
    noise = torch.randn(B, *shape, generator=gen, device=device)
    return drop, t, noise


class Prefetcher:
    """A background thread reads this rank's latents and labels of the next steps into (pinned) CPU memory while the
    current step runs; get(step) hands them over and starts their copy to the device without blocking. A step's
    data is a pure function of the step, so a resumed run just starts the thread at its step. An error in the thread
    is raised by get(); close() stops the thread (call it in a finally, so an error in the loop never hangs)."""

    def __init__(self, data, cfg, rows, start_step, device, depth=2):
        self.data, self.cfg, self.rows, self.device = data, cfg, rows, device
        self.queue, self.stopped = queue.Queue(maxsize=depth), threading.Event()
        self.thread = threading.Thread(target=self._read, args=(start_step,), daemon=True)
        self.thread.start()

    def _put(self, item):
        while not self.stopped.is_set():
            try:
                return self.queue.put(item, timeout=0.1)
            except queue.Full:
                pass

    def _read(self, step):
        try:
            while not self.stopped.is_set():
                indices = self.data.indices(step, self.cfg.batch_size, self.cfg.seed)[self.rows]
                flips = step_flips(self.cfg, step)[self.rows]
                self._put((step, *self.data.read(indices, flips, pin=self.device.type == "cuda")))
                step += 1
        except Exception as e:  # handed to the main thread, which raises it
            self._put((None, e, None))

    def get(self, step):
        got, latents, labels = self.queue.get()
        if got is None:
            raise latents
        assert got == step, f"the reader delivered step {got} for step {step}"
        return latents.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)

    def close(self):
        self.stopped.set()
        self.thread.join()


# -----------------------------------------------------------------------------
# training step (shared by training and --bench)


def train_step(cfg, model, raw_model, opt, micro_batches, device):
    """One optimizer step over micro-batches of (latent, t, label, noise); returns (loss, grad norm) on device."""
    total = torch.zeros((), device=device)
    for i, (x1, t, y, x0) in enumerate(micro_batches):
        xt = t.view(-1, 1, 1, 1) * x1 + (1 - t.view(-1, 1, 1, 1)) * x0
        sync = i == len(micro_batches) - 1  # DDP all-reduces only on the last micro-batch
        with (model.no_sync() if isinstance(model, DDP) and not sync else torch.enable_grad()), autocast(device):
            loss = flow_matching_loss(model(xt, t, y), x1 - x0) / len(micro_batches)
            loss.backward()
        total += loss.detach()
    grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.grad_clip or float("inf"))
    opt.step()
    opt.zero_grad(set_to_none=True)
    return total, grad_norm


def flops_per_image(model, channels, size, num_classes, device):
    """Training FLOPs (forward + backward) of one image, counted once by FlopCounterMode."""
    x = torch.zeros(1, channels, size, size, device=device)
    t, y = torch.full((1,), 0.5, device=device), torch.zeros(1, dtype=torch.long, device=device)
    flops = count_flops(lambda: model(x, t, y).float().sum().backward())
    model.zero_grad(set_to_none=True)
    return flops


def bench(cfg, d):
    """img/s, MFU, peak memory and graph breaks of training steps on random latents (no cache needed), compile off
    and on; then the input pipeline at the paper's layout."""
    channels, size, num_classes = 32, 16, 1000
    micro = cfg.micro_batch_size or min(64, cfg.batch_size // d.world_size)  # 64 fits an 80 GB card for XL/1
    for compiled in bench_modes(cfg):
        torch.manual_seed(cfg.seed)
        raw = build_dit(cfg.model, channels, size, num_classes=num_classes, qk_norm=cfg.qk_norm,
                        grad_ckpt=cfg.grad_ckpt).to(d.device)
        flops = flops_per_image(raw, channels, size, num_classes, d.device)
        model = torch.compile(raw) if compiled else raw
        opt = make_optimizer(cfg, raw.parameters(), d.device)
        batch = [(torch.randn(micro, channels, size, size, device=d.device), torch.rand(micro, device=d.device),
                  torch.randint(0, num_classes, (micro,), device=d.device),
                  torch.randn(micro, channels, size, size, device=d.device))]
        step = functools.partial(train_step, cfg, model, raw, opt, batch, d.device)  # no closure over the del below
        seconds = time_calls(step, cfg.bench_steps, d.device, warmup=3)
        report(f"train_dit {cfg.model} micro-batch {micro}", micro / seconds, "img", flops, d.device, compiled,
               f"{flops / 1e9:.1f} GFLOP/img fwd+bwd | {seconds:.3f} s/step")
        del model, raw, opt, step
    bench_input(cfg, d)


def bench_input(cfg, d, steps=20, count=2048):
    """Host time per step of the input pipeline at the paper's layout, global batch 1024 on 8 ranks (128 rows on
    this one), from a random on-disk cache of `count` latents 32x16x16: the main thread's hand-over and launches,
    the reader thread's memory-mapped read (in the background), and the device's randomness and normalisation
    (kernels on a GPU; on a CPU they run on the host and are shown apart)."""
    layout = dataclasses.replace(cfg, batch_size=1024)
    shape, rows = (32, 16, 16), slice(0, 128)
    with tempfile.TemporaryDirectory() as root:
        rng = np.random.default_rng(0)
        latents = open_memmap(os.path.join(root, "latents.npy"), mode="w+", dtype=np.float16, shape=(count, 2, *shape))
        latents[:] = rng.standard_normal(latents.shape, dtype=np.float32)
        latents.flush()
        np.save(os.path.join(root, "labels.npy"), rng.integers(0, 1000, count))
        with open(os.path.join(root, "meta.json"), "w") as f:
            json.dump({"ae_ckpt": "", "channels": 32, "size": 16, "count": count, "num_classes": 1000,
                       "mean": [0.0] * 32, "std": [1.0] * 32}, f)
        data = LatentCache(root).to(d.device)
        start = time.perf_counter()
        for step in range(steps):
            data.read(data.indices(step, 1024, cfg.seed)[rows], step_flips(layout, step)[rows])
        read_ms = 1000 * (time.perf_counter() - start) / steps
        reader = Prefetcher(data, layout, rows, 0, d.device)
        host = device = 0.0
        try:
            for step in range(steps):
                time.sleep(read_ms / 1000 * 1.5)  # stands in for the model's step, which the reader overlaps
                start = time.perf_counter()
                x1, y = reader.get(step)
                middle = time.perf_counter()
                drop, t, noise = step_randomness(layout, step, shape, d.device)
                x1 = data.normalise(x1)
                if d.device.type == "cuda":
                    torch.cuda.synchronize()
                end = time.perf_counter()
                host, device = host + middle - start, device + end - middle
        finally:
            reader.close()
    host_ms, device_ms = 1000 * host / steps, 1000 * device / steps
    budget = 1000 * 128 / 600  # ms per step at the goal of 600 img/s per GPU
    print(f"bench train_dit input, batch 1024 on 8 ranks (128 rows here): main thread {host_ms:.2f} ms/step "
          f"({100 * host_ms / budget:.2f}% of the {budget:.0f} ms step at 600 img/s) | reader thread {read_ms:.1f} "
          f"ms/step in the background | randomness + normalisation on {d.device.type} {device_ms:.1f} ms/step",
          flush=True)


def grid_ae(cfg, data, log):
    """The AE that decodes the sample grids (model.cache_ae): None (no grids) when the cache's own is gone."""
    path, own = cache_ae(data.meta, cfg.ae_ckpt)
    if path is None:
        log(f"no sample grids: the AE {data.meta['ae_ckpt']!r} named in meta.json does not exist (pass --ae_ckpt)")
    elif not own:
        log(f"sample grids are decoded with --ae_ckpt {path}, which is not the AE the cache was encoded with")
    return path


@torch.no_grad()
def sample_grid(cfg, ema, data, ae_path, step, device, log):
    """8 classes x 8 EMA samples with sample.py's default settings, decoded by the grid AE."""
    pae = pae_from_checkpoint(ae_path, device, decode_only=True)
    settings = sample.parse_config(sample.Config, [], sample.PRESETS)
    classes = np.linspace(0, data.num_classes - 1, 8).round().astype(int)
    labels = np.repeat(classes, 8).tolist()
    with autocast(device):
        latents = sample.sample_latents(ema, list(range(64)), labels, (data.channels, data.size, data.size),
                                        settings, data.num_classes, device)
    images = pae.decode(latents.float() * data.std + data.mean)
    path = os.path.join(cfg.out_dir, f"samples_{step:07d}.png")
    save_image(images.float().clamp(0, 1), path, nrow=8)
    log(f"step {step}: sample grid {path} (rows: classes {classes.tolist()})")


# -----------------------------------------------------------------------------
# main


def main(argv=None):
    cfg = parse_config(Config, argv, PRESETS)
    dit_preset(cfg.model)  # a valid name, before anything else
    gpu_guard(cfg.device, not cfg.model.startswith("tiny/") and f"LightningDiT-{cfg.model} at batch {cfg.batch_size}")

    # --- setup
    d = Dist(cfg.device)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    if cfg.bench:
        bench(cfg, d)
        return d.teardown()
    per_rank, micro, accum = batch_layout(cfg, d)
    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
    if cfg.resume and not os.path.isfile(ckpt_path):
        fail(f"--resume was given but {ckpt_path} does not exist; drop --resume to start a new run")
    if not cfg.resume and not cfg.overwrite and os.path.exists(ckpt_path):
        fail(f"{ckpt_path} already exists; pass --resume to continue that run, --overwrite to start a new one in "
             f"its place, or choose another --out_dir")
    cfg.latents = os.path.abspath(cfg.latents)

    # --- data
    data = LatentCache(cfg.latents).to(d.device)
    d.run0(lambda: lock_dir(cfg.out_dir))
    shape = (data.channels, data.size, data.size)
    model_args = dict(preset=cfg.model, in_channels=data.channels, input_size=data.size,
                      num_classes=data.num_classes, qk_norm=cfg.qk_norm)

    # --- model, EMA, compile, DDP
    torch.manual_seed(cfg.seed)
    raw_model = build_dit(cfg.model, data.channels, data.size, num_classes=data.num_classes, qk_norm=cfg.qk_norm,
                          grad_ckpt=cfg.grad_ckpt).to(d.device)
    # --- optimizer
    opt = make_optimizer(cfg, raw_model.parameters(), d.device)

    # --- resume
    step = 0
    ema = copy.deepcopy(raw_model).requires_grad_(False).eval()
    if cfg.resume:
        ckpt = load_checkpoint(ckpt_path, "dit")
        if ckpt["model_args"] != model_args:
            fail(f"{ckpt_path} was trained with {ckpt['model_args']}, but this run has {model_args} "
                 f"(model flags or latent cache differ); use the same --model/--qk_norm/--latents")
        raw_model.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        opt.load_state_dict(ckpt["opt"])
        step = ckpt["step"]
    model = torch.compile(raw_model) if cfg.compile else raw_model
    if d.world_size > 1:
        model = DDP(model, device_ids=[d.local_rank] if d.device.type == "cuda" else None)

    d.run0(lambda: save_config(cfg, cfg.out_dir))
    log = Logger(cfg.out_dir, d.master)
    log(json.dumps(asdict(cfg)))
    ae_path = d.run0(lambda: grid_ae(cfg, data, log)) if cfg.sample_every else None  # rank 0 draws the grids
    n_params = sum(p.numel() for p in raw_model.parameters())
    flops = flops_per_image(raw_model, data.channels, data.size, data.num_classes, d.device)
    peak = peak_flops(d.device)
    log(f"model {cfg.model}: {n_params / 1e6:.2f}M parameters, {flops / 1e9:.2f} GFLOP per image (fwd+bwd) | "
        f"data {data.count} latents {data.channels}x{data.size}x{data.size}, {data.num_classes} classes | "
        f"world {d.world_size} x micro-batch {micro} x accumulation {accum} = batch {cfg.batch_size}"
        + (f" | resumed at step {step}" if cfg.resume else ""))

    # --- loop
    causes = (f"a NaN in the latent cache {cfg.latents}, a tiny std in its meta.json, a learning rate too high "
              f"(--lr {cfg.lr})" + (f", or a NaN weight in {ckpt_path}, which this run resumed from" if cfg.resume
                                    else ""))
    saved_step = step if cfg.resume else None

    def save(step):
        nonlocal saved_step
        if n_logged:  # the guard before every checkpoint: the steps since the last log line (one sync)
            check_finite(step, dict(zip(("loss", "grad norm"), d.all_reduce_mean(torch.stack([loss_sum, grad_sum]))
                                        .tolist())), causes, saved_step)
        d.run0(lambda: save_checkpoint(ckpt_path, "dit", raw_model, cfg, step, ema=ema, opt=opt,
                                       model_args=model_args, latent_meta=data.meta))
        saved_step = step

    model.train()
    loss_sum, grad_sum, n_logged = torch.zeros((), device=d.device), torch.zeros((), device=d.device), 0
    host_seconds = 0.0  # the main thread's input work (hand-over, copy launch, randomness) over the log interval
    timer_step, timer_start = None, None
    first = step
    mine = slice(d.rank * per_rank, (d.rank + 1) * per_rank)
    reader = Prefetcher(data, cfg, mine, step, d.device)
    try:
        while step < cfg.max_steps:
            host_start = time.perf_counter()
            x1, y = reader.get(step)
            drop, t, noise = step_randomness(cfg, step, shape, d.device)
            x1 = data.normalise(x1)
            y = torch.where(drop[mine], data.num_classes, y)  # null class for CFG
            t, x0 = t[mine], noise[mine]
            batches = [(x1[i:i + micro], t[i:i + micro], y[i:i + micro], x0[i:i + micro])
                       for i in range(0, per_rank, micro)]
            host_seconds += time.perf_counter() - host_start
            if step == 0 and d.master:  # the zero-initialised model predicts 0: loss = E|x1 - x0|^2/dim + 1
                expected = torch.cat([(b[0] - b[3]).pow(2).mean().view(1) for b in batches]).mean().item() + 1
            loss, grad_norm = train_step(cfg, model, raw_model, opt, batches, d.device)
            ema_update(ema, raw_model, cfg.ema_decay)
            loss_sum += loss
            grad_sum += grad_norm
            n_logged += 1
            step += 1
            if step == first + 1:
                if d.master and first == 0:
                    log(f"step 0 sanity: loss {loss.item():.4f}, expected {expected:.4f} (velocity MSE of a zero "
                        f"prediction + cosine term 1; about 3 for normalised latents)")
                if d.device.type == "cuda":
                    torch.cuda.synchronize()
                timer_step, timer_start = step, time.perf_counter()  # throughput excludes the warm-up step
            if step % cfg.log_every == 0 or step == cfg.max_steps:
                stats = torch.stack([loss_sum, grad_sum]) / n_logged
                d.all_reduce_mean(stats)
                elapsed = time.perf_counter() - timer_start
                img_s = (step - timer_step) * cfg.batch_size / elapsed if step > timer_step else float("nan")
                mfu = f"{100 * img_s * flops / (peak * d.world_size):.1f}%" if peak else "-"
                mem = f"{torch.cuda.max_memory_allocated(d.device) / 2**30:.1f}GiB" if d.device.type == "cuda" else "-"
                eta = format_duration((cfg.max_steps - step) * cfg.batch_size / img_s) if img_s == img_s else "-"
                host_ms = 1000 * host_seconds / n_logged
                loss_v, grad_v = stats.tolist()  # one device sync per log line
                log(f"step {step}/{cfg.max_steps} | loss {loss_v:.4f} | lr {cfg.lr:.2e} | grad {grad_v:.3f} | "
                    f"{img_s:.1f} img/s | MFU {mfu} | mem {mem} | host {host_ms:.1f}ms/step | ETA {eta}")
                check_finite(step, {"loss": loss_v, "grad norm": grad_v}, causes, saved_step)
                loss_sum.zero_(), grad_sum.zero_()
                n_logged, host_seconds = 0, 0.0
            if step % cfg.ckpt_every == 0 or step == cfg.max_steps:
                save(step)
            if cfg.sample_every and step % cfg.sample_every == 0:
                d.run0(lambda: ae_path and sample_grid(cfg, ema, data, ae_path, step, d.device, log))
    finally:
        reader.close()

    # --- teardown
    log(f"done: {step} steps, checkpoint {ckpt_path}")
    d.teardown()


if __name__ == "__main__":
    main()
