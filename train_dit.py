r"""
Train LightningDiT with flow matching on a PAE latent cache.

CPU smoke run:  python train_dit.py --preset tiny --latents out/tiny/latents
One GPU:        python train_dit.py --latents out/latents --micro_batch_size 64   (gradient accumulation: batch 1024)
8 GPUs:         torchrun --nproc_per_node=8 train_dit.py --latents out/latents
Two nodes:      torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 \
                    train_dit.py --latents out/latents
Resume:         add --resume auto (continues OUT_DIR/ckpt.pt if it exists, else starts: the line for a scheduler)
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
import threading
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torchvision.utils import save_image

import sample
from losses import flow_matching_loss, sample_timesteps
from model import (DEVICES, Dist, Logger, RESUME, Run, autocast, batch_indices, batch_layout, bench_modes, build_dit,
                   cache_ae, check_resume, count_flops, dit_preset, ema_update, fail, gpu_guard, grad_sync, lock_dir,
                   make_optimizer, mixed_seed, pae_from_checkpoint, parse_config, read_latent_meta, report,
                   save_checkpoint, save_config, step_flips, time_calls, wrap)

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
    keep_every: int = 25_000  # steps; EMA snapshot OUT_DIR/snapshots/{step:07d}.pt (20 epochs, 2.7 GB XL/1); 0 = off
    resume: str = "false"  # true (bare --resume): continue OUT_DIR/ckpt.pt; auto: continue it if it exists, else start
    allow_change: str = ""  # with --resume: fields that may change from the checkpoint: lr,batch_size, latent_meta...
    overwrite: bool = False  # start a new run in place of an existing out_dir/ckpt.pt (else refused)
    compile: bool = True  # torch.compile the model
    bench: bool = False  # time bench_steps steps on random latents (no cache needed), compile off and on
    bench_steps: int = 20  # timed steps per bench setting
    ae_ckpt: str = ""  # AE for the sample grids; "" = the one the cache was encoded with (its file is checked)
    device: str = "auto"  # auto (the GPU when there is one) | cpu | cuda

    CHOICES = {"device": DEVICES, "resume": RESUME}
    BARE = {"resume": "true"}
    POSITIVE = ("batch_size", "max_steps", "lr", "time_shift", "log_every", "ckpt_every", "bench_steps")
    NONNEGATIVE = ("micro_batch_size", "weight_decay", "grad_clip", "seed", "sample_every", "keep_every")
    FREE = ("preset", "latents", "out_dir", "grad_ckpt", "micro_batch_size", "max_steps", "log_every", "ckpt_every",
            "sample_every", "keep_every", "resume", "allow_change", "overwrite", "compile", "bench", "bench_steps",
            "ae_ckpt", "device")  # a resume may change these: logging, output and speed, and the length
    UNIT = ("adam_beta1", "adam_beta2", "ema_decay", "label_dropout")


PRESETS = {
    "paper": {},
    "tiny": dict(model="tiny/1", batch_size=32, max_steps=1500, lr=2e-3, ema_decay=0.99, log_every=250,
                 ckpt_every=500, sample_every=750, compile=False,  # EMA 0.9999 would still be 86% the initial model
                 out_dir="out/tiny/dit", latents="out/tiny/latents")}

# -----------------------------------------------------------------------------
# data: the memory-mapped latent cache


class LatentCache:
    """latents.npy (N, 2, C, H, W) float16 [image, flip], labels.npy (N,), meta.json (written by encode)."""

    def __init__(self, path):
        meta_path = os.path.join(path, "meta.json")
        if os.path.isfile(path):
            fail(f"--latents {path} is a file; pass the latent cache's folder (the one train_ae.py --stage encode "
                 f"wrote, holding latents.npy, labels.npy and meta.json)")
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


def step_batches(cfg, data, reader, step, rows, micro, device):
    """This rank's micro-batches of a step as (x1 normalised, t, label or the null class, x0). The label drops,
    timesteps and noise of the whole global batch come from a device generator seeded by (seed, step); each rank keeps
    its rows, so any world size and a resumed run see the same (on CUDA, bit-identical on the same GPU model)."""
    gen, B = torch.Generator(device=device).manual_seed(mixed_seed(cfg.seed, step, 1)), cfg.batch_size
    drop = torch.rand(B, generator=gen, device=device) < cfg.label_dropout
    t = sample_timesteps(B, cfg.time_shift, generator=gen, device=device)
    noise = torch.randn(B, data.channels, data.size, data.size, generator=gen, device=device)
    x1, y = reader.get(step)
    x1, y = data.normalise(x1), torch.where(drop[rows], data.num_classes, y)  # dropped labels: the null class
    t, x0 = t[rows], noise[rows]
    return [(x1[i:i + micro], t[i:i + micro], y[i:i + micro], x0[i:i + micro]) for i in range(0, len(x1), micro)]


class Prefetcher:
    """A thread reads this rank's latents and labels of the next steps into (pinned) memory while a step runs;
    get(step) hands them over and starts their copy to the device without blocking, or raises the thread's error;
    close() (in a finally) stops it."""

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
                indices = batch_indices(step, self.cfg.batch_size, self.data.count, self.cfg.seed)[self.rows]
                flips = step_flips(self.cfg.seed, step, self.cfg.batch_size).numpy()[self.rows]
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
# the training step, its FLOPs, --bench and the periodic sample grid


def train_step(cfg, model, raw_model, opt, micro_batches, device):
    """One optimizer step over micro-batches of (latent, t, label, noise); returns (loss, grad norm) on device."""
    total = torch.zeros((), device=device)
    for i, (x1, t, y, x0) in enumerate(micro_batches):
        xt = t.view(-1, 1, 1, 1) * x1 + (1 - t.view(-1, 1, 1, 1)) * x0
        with grad_sync(model, i == len(micro_batches) - 1), autocast(device):
            loss = flow_matching_loss(model(xt, t, y), x1 - x0) / len(micro_batches)
            loss.backward()
        total += loss.detach()
    grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.grad_clip or float("inf"))
    opt.step()
    opt.zero_grad(set_to_none=True)
    return total, grad_norm


def flops_per_image(model, channels, size, num_classes, device):
    """Training FLOPs (forward + backward) of one image."""
    x = torch.zeros(1, channels, size, size, device=device)
    t, y = torch.full((1,), 0.5, device=device), torch.zeros(1, dtype=torch.long, device=device)
    flops = count_flops(lambda: model(x, t, y).float().sum().backward())
    model.zero_grad(set_to_none=True)
    return flops


def bench(cfg, process):
    """img/s, MFU, peak memory and graph breaks of training steps on random latents (no cache needed), compile off
    and on. The input pipeline's cost shows in the training log's host ms/step."""
    channels, size, num_classes = 32, 16, 1000
    micro = cfg.micro_batch_size or min(64, cfg.batch_size // process.world_size)  # 64 fits an 80 GB card for XL/1
    device = process.device
    for compiled in bench_modes(cfg):
        torch.manual_seed(cfg.seed)
        raw = build_dit(cfg.model, channels, size, num_classes=num_classes, qk_norm=cfg.qk_norm,
                        grad_ckpt=cfg.grad_ckpt).to(device)
        flops = flops_per_image(raw, channels, size, num_classes, device)
        model = wrap(dataclasses.replace(cfg, compile=compiled), process, raw)
        opt = make_optimizer(cfg, raw.parameters(), device)
        batch = [(torch.randn(micro, channels, size, size, device=device), torch.rand(micro, device=device),
                  torch.randint(0, num_classes, (micro,), device=device),
                  torch.randn(micro, channels, size, size, device=device))]
        step = functools.partial(train_step, cfg, model, raw, opt, batch, device)  # no closure over the del below
        seconds = time_calls(step, cfg.bench_steps, device, warmup=3)
        report(f"train_dit {cfg.model} micro-batch {micro}", micro / seconds, "img", flops, device, compiled,
               f"{flops / 1e9:.1f} GFLOP/img fwd+bwd | {seconds:.3f} s/step")
        del model, raw, opt, step


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

    # --- setup: processes, precision, and every refusal before anything is written
    process = Dist(cfg.device)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if cfg.bench:
        bench(cfg, process)
        return process.teardown()
    per_rank, micro, accum = batch_layout(cfg, process)
    ckpt_path, cfg.latents = os.path.join(cfg.out_dir, "ckpt.pt"), os.path.abspath(cfg.latents)
    snapshots = os.path.join(cfg.out_dir, "snapshots")
    if not check_resume(cfg, ckpt_path, required=True) and os.path.isdir(snapshots) and os.listdir(snapshots):
        fail(f"{snapshots} holds the snapshots of an earlier run; move them away before a new run starts here")

    # --- data: the latent cache, then the folder lock and the log
    data = LatentCache(cfg.latents).to(process.device)
    process.run0(lambda: lock_dir(cfg.out_dir))
    log = Logger(cfg.out_dir, process.master)

    # --- model, EMA, compile, DDP
    torch.manual_seed(cfg.seed)
    model_args = dict(preset=cfg.model, in_channels=data.channels, input_size=data.size,
                      num_classes=data.num_classes, qk_norm=cfg.qk_norm)
    raw_model = build_dit(**model_args, grad_ckpt=cfg.grad_ckpt).to(process.device)
    ema = copy.deepcopy(raw_model).requires_grad_(False).eval()
    model = wrap(cfg, process, raw_model)

    # --- optimizer
    opt = make_optimizer(cfg, raw_model.parameters(), process.device)

    # --- resume (the same run, or one sentence), then the run's config and summary
    flops = flops_per_image(raw_model, data.channels, data.size, data.num_classes, process.device)
    run = Run(cfg, process, log, "dit", ckpt_path, cfg.max_steps, flops, f"a NaN in the latent cache {cfg.latents}, "
              f"a tiny std in its meta.json, a learning rate too high (--lr {cfg.lr}), or a NaN weight in {ckpt_path}")
    step = run.resume("dit", {"model": raw_model, "ema": ema, "opt": opt}, {"model_args": model_args},
                      {"latent_meta": data.meta})
    if step >= cfg.max_steps:
        run.close()
        return process.teardown()
    process.run0(lambda: save_config(cfg, cfg.out_dir))
    log(json.dumps(asdict(cfg)))
    ae_path, own = cfg.sample_every and process.run0(lambda: cache_ae(data.meta, cfg.ae_ckpt)) or (None, True)
    if cfg.sample_every and not (ae_path and own):  # rank 0 draws the grids with the cache's AE, or --ae_ckpt
        log(f"sample grids decoded with --ae_ckpt {ae_path}, which is not the AE the cache was encoded with" if ae_path
            else f"no sample grids: the AE {data.meta['ae_ckpt']!r} named in meta.json does not exist (--ae_ckpt)")
    log(f"model {cfg.model}: {sum(p.numel() for p in raw_model.parameters()) / 1e6:.2f}M parameters, "
        f"{flops / 1e9:.2f} GFLOP per image (fwd+bwd) | data {data.count} latents {data.channels}x{data.size}x"
        f"{data.size}, {data.num_classes} classes | world {process.world_size} x micro-batch {micro} x accumulation "
        f"{accum} = batch {cfg.batch_size}")

    def write():  # rank 0: the rolling checkpoint, and at a keep step the EMA snapshot (sampling needs nothing more)
        save_checkpoint(ckpt_path, "dit", raw_model, cfg, step, ema=ema, opt=opt, **run.extras())
        snapshot = os.path.join(snapshots, f"{step:07d}.pt")
        if cfg.keep_every and step % cfg.keep_every == 0 and not os.path.exists(snapshot):  # a resumed run
            save_checkpoint(snapshot, "dit", None, cfg, step, ema=ema, **run.extras())  # recomputes the same one

    # --- loop
    rows = slice(process.rank * per_rank, (process.rank + 1) * per_rank)  # this rank's share of the global batch
    reader, host_seconds = Prefetcher(data, cfg, rows, step, process.device), 0.0
    model.train()
    try:
        while step < cfg.max_steps:
            # data: the main thread's host time (hand-over, copy launch, randomness) is reported in the log line
            start = time.perf_counter()
            batches = step_batches(cfg, data, reader, step, rows, micro, process.device)
            host_seconds += time.perf_counter() - start
            # step
            loss, grad_norm = train_step(cfg, model, raw_model, opt, batches, process.device)
            ema_update(ema, raw_model, cfg.ema_decay)
            if step == 0:  # the zero-initialised model predicts 0: loss = E|x1 - x0|^2 / dim + the cosine term 1
                want = torch.stack([(x1 - x0).pow(2).mean() for x1, _, _, x0 in batches]).mean() + 1
                got, want = process.all_reduce_mean(torch.stack([loss, want])).tolist()
                log(f"step 0 sanity: loss {got:.4f}, expected {want:.4f} (velocity MSE of a zero prediction + "
                    f"cosine term 1; about 3 for normalised latents)")
            step += 1
            # log
            run.add(step, {"loss": loss, "grad": grad_norm})
            if step % cfg.log_every == 0 or step == cfg.max_steps:
                run.emit(step, cfg.lr, f"host {1000 * host_seconds / run.n:.1f}ms/step")
                host_seconds = 0.0
            # checkpoint, snapshot, sample grid, stop signal
            if step % cfg.ckpt_every == 0 or step == cfg.max_steps or cfg.keep_every and step % cfg.keep_every == 0:
                run.checkpoint(step, write)
            if cfg.sample_every and step % cfg.sample_every == 0:
                process.run0(lambda: ae_path and sample_grid(cfg, ema, data, ae_path, step, process.device, log))
            if run.stop_requested():
                run.stop(step, write)
    finally:
        reader.close()
        run.close()

    # --- teardown
    log(f"done: {step} steps, checkpoint {ckpt_path}")
    process.teardown()


if __name__ == "__main__":
    main()
