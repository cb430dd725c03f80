"""
The whole test suite: CPU only, tiny configs.  Run:  python -m pytest -q test_all.py
"""

import dataclasses
import json
import math
import os
import re
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib

import lpips as lpips_pkg
import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image

import fid
import losses
import model
import sample
import train_ae
import train_dit
from losses import flow_matching_loss, sample_timesteps, shift_time
from model import apply_rope, build_dit, build_pae, load_checkpoint, rope_2d, save_checkpoint

REPO = os.path.dirname(os.path.abspath(__file__))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: on a loaded 2-core machine two spinning OpenMP threads make tiny runs ~6x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _run(args, nproc=1, timeout=300):
    """Run a script with python (nproc=1) or torchrun (2 Gloo processes); returns stdout+stderr, asserts rc 0."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if nproc == 1:
        cmd = [sys.executable] + args
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               f"--master_port={_free_port()}"] + args
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def _write_cache(path, count=16, channels=4, size=8, num_classes=3, seed=0):
    """A latent cache in exactly the format encode writes."""
    os.makedirs(path, exist_ok=True)
    rng = np.random.default_rng(seed)
    latents = rng.standard_normal((count, 2, channels, size, size)).astype(np.float16) * 2 + 0.5
    latents[:, 1] = latents[:, 0, :, :, ::-1]
    np.save(os.path.join(path, "latents.npy"), latents)
    np.save(os.path.join(path, "labels.npy"), np.arange(count, dtype=np.int64) % num_classes)
    flat = latents[:, 0].astype(np.float64).transpose(1, 0, 2, 3).reshape(channels, -1)
    meta = {"ae_ckpt": "none", "channels": channels, "size": size, "count": count, "num_classes": num_classes,
            "mean": flat.mean(1).tolist(), "std": flat.std(1).tolist(), "dataset": "test", "created": "now"}
    with open(os.path.join(path, "meta.json"), "w") as f:
        json.dump(meta, f)
    return path


def _dit_args(tmp_path, latents, name="run", **extra):
    args = {"preset": "tiny", "latents": str(latents), "out_dir": str(tmp_path / name), "batch_size": 8,
            "max_steps": 6, "log_every": 2, "ckpt_every": 3, **extra}
    return [f"--{k}={v}" for k, v in args.items()]


def _log(out_dir):
    with open(os.path.join(out_dir, "log.txt")) as f:
        return f.read()


def _logged_losses(out_dir):
    return [float(line.split("| loss ")[1].split()[0]) for line in _log(out_dir).splitlines() if "| loss " in line]


# -----------------------------------------------------------------------------
# LightningDiT (model.py) and flow matching (losses.py)


def test_dit_parameter_counts():
    with torch.device("meta"):
        xl, b = build_dit("XL/1"), build_dit("B/1")
    assert round(sum(p.numel() for p in xl.parameters()) / 1e6, 2) == 675.26
    assert round(sum(p.numel() for p in b.parameters()) / 1e6, 2) == 130.56
    assert not xl.pos_embed.requires_grad  # the sin-cos embedding is frozen but counted


def test_dit_untrained_outputs_exactly_zero():
    model = build_dit("S/2", in_channels=32, input_size=16, qk_norm=True)
    out = model(torch.randn(3, 32, 16, 16), torch.rand(3), torch.tensor([0, 5, 1000]))
    assert out.shape == (3, 32, 16, 16) and torch.equal(out, torch.zeros_like(out))


def test_rope_depends_only_on_relative_offset():
    grid, head_dim = 6, 16
    cos, sin = rope_2d(head_dim, grid)
    q, k = torch.randn(head_dim), torch.randn(head_dim)
    rq = apply_rope(q.expand(grid * grid, head_dim), cos, sin)
    rk = apply_rope(k.expand(grid * grid, head_dim), cos, sin)
    scores = (rq @ rk.T).view(grid, grid, grid, grid)  # [row_q, col_q, row_k, col_k]
    for dr, dc in [(0, 0), (1, 2), (-3, 1), (2, -2)]:
        vals = [scores[r, c, r + dr, c + dc] for r in range(grid) for c in range(grid)
                if 0 <= r + dr < grid and 0 <= c + dc < grid]
        assert torch.allclose(torch.stack(vals), vals[0].expand(len(vals)), atol=1e-5)
    assert not torch.allclose(scores[0, 0, 0, 1], scores[0, 0, 1, 0])  # rows and columns rotate differently
    assert torch.allclose(rq.norm(dim=1), q.norm().expand(grid * grid))  # a rotation preserves norms


def test_timestep_shift_and_sampling():
    t = torch.linspace(0, 1, 101)
    shifted = shift_time(t, 0.7)
    assert shifted[0] == 0 and shifted[-1] == 1 and bool((shifted.diff() > 0).all()) and bool((shifted <= t).all())
    samples = sample_timesteps(200_000, 0.7, generator=torch.Generator().manual_seed(0))
    u = torch.randn(200_000, generator=torch.Generator().manual_seed(1))
    assert abs(samples.mean() - shift_time(torch.sigmoid(u), 0.7).mean()) < 3e-3  # logit-normal, then shifted


def test_flow_matching_loss_at_zero_prediction_is_analytic():
    x1, x0 = torch.randn(64, 8, 4, 4), torch.randn(64, 8, 4, 4)
    v = x1 - x0
    loss = flow_matching_loss(torch.zeros_like(v), v)
    assert torch.allclose(loss, v.pow(2).mean() + 1)  # cosine of a zero vector is 0, so that term is 1
    assert abs(loss.item() - 3) < 0.1  # E|x1 - x0|^2 / dim = 2 for unit-variance latents
    assert flow_matching_loss(v, v).abs() < 1e-6


def test_train_dit_step0_sanity_and_overfit(tmp_path):
    cache = _write_cache(tmp_path / "latents", count=2, num_classes=2)  # one latent per class: learnable exactly
    train_dit.main(_dit_args(tmp_path, cache, max_steps=300, log_every=50, ckpt_every=300, label_dropout=0,
                             lr=1e-2))
    log = _log(tmp_path / "run")
    sanity = log.split("step 0 sanity: loss ")[1]
    loss0, expected = float(sanity.split(",")[0]), float(sanity.split("expected ")[1].split()[0])
    assert abs(loss0 - expected) < 1e-4 and 2.5 < loss0 < 3.5
    losses = _logged_losses(tmp_path / "run")
    assert losses[-1] < 0.25 * loss0, losses


def test_class_conditioning_works_on_latents_whose_classes_differ(tmp_path):
    """Independent of any tokenizer: each class is a blob around its own mean; the tiny DiT's samples of class k must
    land nearest class k's mean, with and without guidance, and the null class (label dropout) covers them all."""
    C, S, K, N = 4, 4, 4, 256
    rng = np.random.default_rng(0)
    means = rng.standard_normal((K, C, 1, 1)) * 2
    labels = np.arange(N) % K
    latents = (means[labels] + 0.5 * rng.standard_normal((N, C, S, S))).astype(np.float16)
    cache = _write_cache(tmp_path / "latents", count=N, channels=C, size=S, num_classes=K)
    np.save(cache / "latents.npy", np.stack([latents, latents[..., ::-1]], 1))
    np.save(cache / "labels.npy", labels.astype(np.int64))
    flat = latents.astype(np.float64).transpose(1, 0, 2, 3).reshape(C, -1)
    meta = json.load(open(cache / "meta.json"))
    json.dump({**meta, "mean": flat.mean(1).tolist(), "std": flat.std(1).tolist()}, open(cache / "meta.json", "w"))
    train_dit.main(_dit_args(tmp_path, cache, batch_size=32, max_steps=1000, log_every=500, ckpt_every=1000))
    ckpt = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)
    net = build_dit(**ckpt["model_args"])
    net.load_state_dict(ckpt["ema"])
    centres = (torch.tensor(means, dtype=torch.float32).view(K, C) - torch.tensor(flat.mean(1)).float()) / \
        torch.tensor(flat.std(1)).float()  # the class means in the normalised space the DiT samples in

    def nearest(class_labels, scale):
        cfg = sample.parse_config(sample.Config, ["--preset", "tiny", "--cfg_scale", str(scale), "--num_steps", "25"],
                                  sample.PRESETS)
        with torch.no_grad():
            x = sample.sample_latents(net.eval(), list(range(len(class_labels))), class_labels, (C, S, S), cfg, K,
                                      torch.device("cpu"))
        return ((x.mean((2, 3))[:, None] - centres[None]) ** 2).sum(-1).argmin(1)

    asked = [k for k in range(K) for _ in range(16)]
    for scale in (1.0, 2.5):
        accuracy = (nearest(asked, scale) == torch.tensor(asked)).float().mean().item()
        assert accuracy >= 0.95, (scale, accuracy)
    unconditional = np.bincount(nearest([K] * 64, 1.0).numpy(), minlength=K)  # label K = the null class
    assert unconditional.min() >= 6, unconditional  # all classes, roughly evenly: the null row learned the mixture
    train_dit.main(_dit_args(tmp_path, cache, name="nodrop", label_dropout=0.0, max_steps=20, ckpt_every=20))
    torch.manual_seed(0)
    initial = build_dit(**ckpt["model_args"]).y_embed.weight
    trained = {name: torch.load(tmp_path / name / "ckpt.pt", weights_only=True)["model"]["y_embed.weight"]
               for name in ("run", "nodrop")}
    assert torch.equal(trained["nodrop"][K], initial[K]) and not torch.equal(trained["run"][K], initial[K])


def test_checkpoint_schema_and_resume_is_exact(tmp_path):
    cache = _write_cache(tmp_path / "latents")
    train_dit.main(_dit_args(tmp_path, cache, name="full"))
    train_dit.main(_dit_args(tmp_path, cache, name="again"))
    train_dit.main(_dit_args(tmp_path, cache, name="split", max_steps=3))
    train_dit.main(_dit_args(tmp_path, cache, name="split", resume=True))
    full = torch.load(tmp_path / "full" / "ckpt.pt", weights_only=True)
    split = torch.load(tmp_path / "split" / "ckpt.pt", weights_only=True)
    again = torch.load(tmp_path / "again" / "ckpt.pt", weights_only=True)  # the same seed: the same run, bit for bit
    assert all(torch.equal(v, again[key][k]) for key in ("model", "ema") for k, v in full[key].items())
    assert full["kind"] == "dit" and full["step"] == split["step"] == 6
    assert full["model_args"]["in_channels"] == 4 and full["config"]["latents"] == str(cache)
    for key in ("model", "ema"):
        assert not any(k.startswith(("_orig_mod.", "module.")) for k in full[key])
        for name, value in full[key].items():
            assert torch.equal(value, split[key][name]), name
    assert "resuming from" in _log(tmp_path / "split") and "at step 3" in _log(tmp_path / "split")


def test_prefetcher_delivers_each_steps_rows_and_stops_cleanly(tmp_path, monkeypatch):
    data = train_dit.LatentCache(str(_write_cache(tmp_path / "latents")))
    cfg = model.parse_config(train_dit.Config, ["--preset", "tiny", "--batch_size", "8"], train_dit.PRESETS)
    rows = slice(4, 8)  # rank 1 of 2
    reader = train_dit.Prefetcher(data, cfg, rows, 5, torch.device("cpu"))  # a resumed run starts at its step
    for step in (5, 6, 7):
        latents, labels = reader.get(step)
        indices = model.batch_indices(step, 8, data.count, cfg.seed)[rows]
        want = torch.from_numpy(data.latents[indices, model.step_flips(cfg.seed, step, 8)[rows].numpy().astype(int)])
        assert torch.equal(latents, want) and torch.equal(labels, torch.from_numpy(data.labels[indices]))
    reader.close()
    assert not reader.thread.is_alive()
    threads = threading.active_count()
    monkeypatch.setattr(data, "read", lambda *a, **k: 1 / 0)  # the reader fails: get() raises its error
    reader = train_dit.Prefetcher(data, cfg, rows, 0, torch.device("cpu"))
    with pytest.raises(ZeroDivisionError):
        reader.get(0)
    reader.close()
    monkeypatch.undo()
    monkeypatch.setattr(train_dit, "train_step", lambda *a: 1 / 0)  # the step fails: the run ends, no thread left
    with pytest.raises(ZeroDivisionError):
        train_dit.main(_dit_args(tmp_path, str(tmp_path / "latents")))
    assert threading.active_count() == threads


def test_ddp_two_processes_match_one(tmp_path):  # slow: two processes, one of them compiling
    cache = _write_cache(tmp_path / "latents")
    train_dit.main(_dit_args(tmp_path, cache, name="one", lr=1e-3))
    _run(["train_dit.py", *_dit_args(tmp_path, cache, name="two", lr=1e-3, compile="true")], nproc=2)
    one = torch.load(tmp_path / "one" / "ckpt.pt", weights_only=True)["model"]
    two = torch.load(tmp_path / "two" / "ckpt.pt", weights_only=True)["model"]
    assert not any(k.startswith(("_orig_mod.", "module.")) for k in two)  # saved from the raw module
    worst = max((one[k] - two[k]).abs().max().item() for k in one)
    assert worst < 1e-5, worst  # fp32 on CPU: only the order of the gradient reduction differs
    moved = max((one[k] - build_dit("tiny/1", 4, 8, num_classes=3).state_dict()[k]).abs().max().item()
                for k in one if "adaLN" in k)
    assert moved > 1e-3  # the runs really trained


def test_train_dit_errors(tmp_path, capsys):
    cache = _write_cache(tmp_path / "latents")

    def error_of(args):
        with pytest.raises(SystemExit) as e:
            train_dit.main(args)
        return str(e.value)

    assert "does not exist" in error_of(_dit_args(tmp_path, tmp_path / "nowhere"))
    os.makedirs(tmp_path / "partial")
    assert "no meta.json" in error_of(_dit_args(tmp_path, tmp_path / "partial"))
    assert "not divisible" in error_of(_dit_args(tmp_path, cache, batch_size=8, micro_batch_size=3))
    assert "--resume was given" in error_of(_dit_args(tmp_path, cache, resume=True))
    assert "unknown DiT model" in error_of(_dit_args(tmp_path, cache, model="XXL/1"))
    with pytest.raises(SystemExit):
        train_dit.main(_dit_args(tmp_path, cache, bogus_flag=1))  # unknown flags fail before anything runs
    train_dit.main(_dit_args(tmp_path, cache, max_steps=2))
    assert "already exists" in error_of(_dit_args(tmp_path, cache, max_steps=2))
    other = _write_cache(tmp_path / "other", channels=6)
    assert "trained with" in error_of(_dit_args(tmp_path, other, max_steps=4, resume=True))
    bad = tmp_path / "bad.pt"
    save_checkpoint(str(bad), "pae", torch.nn.Linear(2, 2), {"a": 1}, 0)
    with pytest.raises(SystemExit, match="'pae' checkpoint, but a 'dit'"):
        load_checkpoint(str(bad), "dit")
    bad.write_bytes(open(bad, "rb").read()[:100])
    with pytest.raises(SystemExit, match="truncated"):
        load_checkpoint(str(bad), "dit")
    meta = json.load(open(cache / "meta.json"))
    meta["count"] = 99
    json.dump(meta, open(cache / "meta.json", "w"))
    assert "meta.json says 99" in error_of(_dit_args(tmp_path, cache, out_dir=str(tmp_path / "x")))


# -----------------------------------------------------------------------------
# PAE tokenizer (model.py) and its losses (losses.py)

LPIPS_LIN = os.path.join(os.path.dirname(lpips_pkg.__file__), "weights", "v0.1", "vgg.pth")


def _tiny(seed=0):
    torch.manual_seed(seed)
    return model.build_pae(preset="tiny")


def _images(n=4, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g)


@pytest.fixture(scope="module")
def lpips_net():
    torch.manual_seed(0)
    return losses.LPIPS(pretrained=False, lin_weights=LPIPS_LIN)


def test_pae_paper_parameter_counts():
    with torch.device("meta"):
        pae = model.build_pae(pretrained=False)  # DINOv2-L + decoder L
    count = lambda m: sum(p.numel() for p in m.parameters() if p.requires_grad)
    fixed = lambda m: sum(p.numel() for p in m.parameters() if not p.requires_grad)
    table = {name: (count(getattr(pae, name)), fixed(getattr(pae, name)))
             for name in ("dam", "projector", "deprojector", "decoder")}
    assert table == {"dam": (103_496_704, 262_144), "projector": (4_490_272, 0), "deprojector": (4_491_264, 0),
                     "decoder": (304_149_248, 263_168)}  # exactly the released modules' counts (random init)
    assert sum(p.numel() for p in pae.trainable_parameters()) == 416_627_488
    assert count(pae.vfm) == 0 and abs(sum(p.numel() for p in pae.vfm.parameters()) / 303.2e6 - 1) < 0.01
    assert pae.vfm.grid == 16 and pae.image_size == 256 and pae.decoder.patch == 16
    with pytest.raises(SystemExit, match="does not exist"):
        model.build_pae(vfm_weights="/nonexistent/dinov2.pth")
    with pytest.raises(SystemExit, match="valid names: dinov2, dinov3, siglip2, mae, tiny"):
        model.build_pae(vfm="dinov4")


def test_released_architecture_details_a_forward_pass_cannot_see():
    """The released PAE's LayerNorm eps, init, biases, resize and sin-cos order, pinned one by one."""
    torch.manual_seed(0)
    pae = build_pae(preset="tiny")
    block = pae.dam.blocks[0]
    assert {m.eps for m in (block.norm1, block.norm2, block.norm_vfm, block.norm3, pae.dam.norm)} == {1e-5}
    assert pae.dam.norm.elementwise_affine  # H_z = LayerNorm(...) with a learnable scale and shift
    assert {m.eps for m in pae.decoder.modules() if isinstance(m, torch.nn.LayerNorm)} == {1e-12}  # ViT-MAE config
    assert torch.equal(pae.decoder.cls_token, torch.zeros_like(pae.decoder.cls_token))
    for attn in (pae.projector.attn, pae.deprojector.attn):
        assert attn.q.bias is None and attn.k.bias is None and attn.v.bias is None and attn.proj.bias is not None
    assert block.self_attn.q.bias is not None and pae.decoder.blocks[0].attn.v.bias is not None
    for linear in (block.mlp[0], pae.decoder.blocks[0].attn.q, pae.deprojector.attn.k, pae.decoder.head):
        bound = 1 / math.sqrt(linear.in_features)  # PyTorch's default init, not xavier (sqrt(6 / (in + out)))
        assert linear.weight.abs().max() <= bound and linear.weight.abs().max() > 0.9 * bound
        assert linear.bias is None or linear.bias.abs().min() > 0  # default biases are not zero
    assert torch.equal(pae.dam.sft.weight, torch.zeros_like(pae.dam.sft.weight))  # zero SFT head
    images = _images(2, 40)  # 40 px -> 32 px: bicubic without antialias, as released
    expected = (F.interpolate(images, size=32, mode="bicubic", align_corners=False) - pae.vfm.mean) / pae.vfm.std
    torch.testing.assert_close(pae.vfm.preprocess(images), expected, rtol=0, atol=0)
    table = model.sincos_2d(16, 4)  # row r, column c at index 4r + c: [sin(c w), cos(c w), sin(r w), cos(r w)]
    omega = 1 / 10000 ** (torch.arange(4, dtype=torch.float64) / 4)
    r, c = 2, 3
    want = torch.cat([(c * omega).sin(), (c * omega).cos(), (r * omega).sin(), (r * omega).cos()]).float()
    torch.testing.assert_close(table[4 * r + c], want)


@pytest.mark.parametrize("vfm", ["dinov3", "siglip2", "mae"])
def test_other_vfms_shapes_on_meta(vfm):
    with torch.device("meta"):
        pae = model.build_pae(vfm=vfm, decoder="B", pretrained=False)
        out = pae(torch.rand(2, 3, 256, 256), (42.5,))
    width = 1152 if vfm == "siglip2" else 1024
    assert out["vfm_tokens"].shape == (2, 256, width) and out["latent"].shape == (2, 32, 16, 16)
    assert out["recon"].shape == out["rotated"][0].shape == (2, 3, 256, 256)


def test_pae_init_identity_sphere_and_frozen_vfm():
    pae, images = _tiny(), _images()
    vfm_tokens = pae.vfm(images)
    assert not vfm_tokens.requires_grad and vfm_tokens.shape == (4, 64, 64)  # 8x8 grid, class token dropped
    h_z = pae.dam(pae.vfm.preprocess(images), vfm_tokens)
    torch.testing.assert_close(h_z, F.layer_norm(vfm_tokens, (64,)), rtol=0, atol=1e-6)  # zero-init SFT
    latent = pae.encode(images)
    assert latent.shape == (4, 32, 8, 8)
    assert (latent.norm(dim=1) / math.sqrt(32) - 1).abs().max() < 1e-3  # the RMS norm's eps 1e-6 on small tokens
    vfm_before = {k: v.clone() for k, v in pae.vfm.net.state_dict().items()}
    trainable = pae.trainable_parameters()
    assert not any(p is q for p in trainable for q in pae.vfm.parameters())
    opt = torch.optim.AdamW(trainable, lr=1e-3)
    out = pae(images, (42.5, 85.0))
    (out["recon"].mean() + sum(r.mean() for r in out["rotated"]) + out["latent"].pow(3).mean()).backward()
    opt.step()
    assert all(p.grad is None for p in pae.vfm.parameters())
    assert all(torch.equal(v, vfm_before[k]) for k, v in pae.vfm.net.state_dict().items())
    assert pae.dam.sft.weight.grad.abs().sum() > 0  # the modulation does learn


def test_mcr_rotation_angles_and_shared_direction():
    latent = model.sphere(torch.randn(3, 32, 4, 4))
    z_m, z_l = model.mcr_rotate(latent, (42.5, 85.0))
    for z, theta in ((z_m, 42.5), (z_l, 85.0)):
        torch.testing.assert_close(z.norm(dim=1), latent.norm(dim=1), rtol=0, atol=1e-4)
        cos = F.cosine_similarity(z, latent, dim=1).clamp(-1, 1)
        assert (torch.rad2deg(torch.acos(cos.double())) - theta).abs().max() < 1e-3
    d_m = (z_m - math.cos(math.radians(42.5)) * latent) / math.sin(math.radians(42.5))
    d_l = (z_l - math.cos(math.radians(85.0)) * latent) / math.sin(math.radians(85.0))
    torch.testing.assert_close(d_m, d_l, rtol=0, atol=1e-4)  # one shared direction for both angles


def test_mcr_cascade_stops_gradient_at_targets(lpips_net):
    recon, x_m, x_l = (torch.rand(2, 3, 16, 16, requires_grad=True) for _ in range(3))
    losses.mcr_loss(recon, [x_m, x_l], lpips_net).backward()
    assert recon.grad is None  # the clean decoding is only ever a target
    grad_m = x_m.grad.clone()
    x_m.grad = None
    (losses.l1_lpips(x_m, recon.detach(), lpips_net).sum() / 2).backward()
    torch.testing.assert_close(grad_m, x_m.grad)  # x_m gets no gradient from being x_l's target
    assert x_l.grad.abs().sum() > 0


def test_ssr_and_scr_values():
    z = torch.randn(2, 16, 32)
    basis = torch.linalg.qr(torch.randn(64, 32))[0]  # (64, 32), orthonormal columns
    assert losses.ssr_loss(z, z @ basis.T) < 1e-10  # equal Gram, different widths
    rotation = torch.linalg.qr(torch.randn(32, 32))[0]
    target = torch.randn(2, 16, 64)
    torch.testing.assert_close(losses.ssr_loss(z @ rotation, target), losses.ssr_loss(z, target))
    assert losses.ssr_loss(z, target) > 0.01
    assert losses.scr_loss(z, 3 * z).abs() < 1e-6
    torch.testing.assert_close(losses.scr_loss(z, -z), torch.tensor(4.0))  # 2 per term: pooled + per token


def test_hinge_and_discriminator():
    assert losses.hinge_d_loss(torch.ones(4), -torch.ones(4)) == 0
    assert losses.hinge_d_loss(torch.zeros(4), torch.zeros(4)) == 2
    assert losses.hinge_d_loss(torch.full((4,), 3.0), torch.full((4,), 0.5)) == 1.5
    logits = model.PatchDiscriminator(16)(torch.randn(2, 3, 64, 64))
    assert logits.shape == (2, 1, 6, 6)  # 3 stride-2 layers then two stride-1 4x4 convs: 64 -> 8 -> 7 -> 6


@pytest.mark.filterwarnings("ignore::UserWarning")  # the lpips package calls torchvision's deprecated API
def test_lpips_matches_reference_package(lpips_net):
    torch.manual_seed(1)
    ref = lpips_pkg.LPIPS(net="vgg", pnet_rand=True, verbose=False)  # random VGG16 + shipped v0.1 lin layers
    vgg = {}
    for i in range(1, 6):
        vgg.update(getattr(ref.net, f"slice{i}").state_dict())  # keys keep torchvision's feature indices
    lpips_net.vgg.load_state_dict(vgg)
    x, y = torch.rand(3, 3, 64, 64) * 2 - 1, torch.rand(3, 3, 64, 64) * 2 - 1
    ours = lpips_net(x, y)
    assert ours.shape == (3,)
    assert (ours - ref(x, y).flatten()).abs().max() < 1e-5
    assert lpips_net(x, x).abs().max() < 1e-7


def test_structural_target_preserves_constants_and_follows_edges():
    B, g, W = 1, 4, 8
    images = torch.zeros(B, 3, 64, 64)
    images[..., 32:] = 1  # left half black, right half white: the edge lies between token columns 1 and 2
    constant = torch.randn(1, 1, W).expand(B, g * g, W)
    for mode in ("bilateral", "bilinear"):
        torch.testing.assert_close(losses.structural_target(images, constant, mode), constant, rtol=0, atol=1e-5)
    side = torch.tensor([-1.0, -1, 1, 1]).repeat(g).view(1, g * g, 1).expand(B, -1, W)  # -1 left, +1 right
    bilateral = losses.structural_target(images, side, "bilateral", lowpass=0)
    bilinear = losses.structural_target(images, side, "bilinear", lowpass=0)
    assert (bilateral * side).min() > 0.999 and (bilinear * side).min() < 0.98  # the guide keeps the sides apart
    assert (losses.structural_target(images, side, "bilateral") * side).min() < (bilateral * side).min()  # blur
    line = torch.zeros(1, 3, 256, 256)
    line[..., 100] = 1  # a 1-px white line on black: every colour weight of its pixels underflows in fp32
    assert torch.isfinite(losses.structural_target(line, torch.randn(1, 256, W), "bilateral")).all()


def test_refiner_targets_and_loss():
    torch.manual_seed(0)
    refiner = model.build_refiner(64, depth=1)
    vfm_tokens = torch.randn(2, 16, 64)
    z_t = refiner.target(vfm_tokens)
    assert z_t.shape == (2, 16, 32) and (z_t.norm(dim=-1) / math.sqrt(32) - 1).abs().max() < 1e-4
    assert refiner.reconstruct(z_t).shape == (2, 16, 64)
    loss, parts = losses.refine_loss(refiner, vfm_tokens, vfm_tokens, gram_weight=2.0)
    torch.testing.assert_close(loss, parts["rec"] + 2.0 * parts["gram"])
    assert model.build_refiner(**refiner.refiner_args) is not None


def test_checkpoint_roundtrip_without_vfm_weights(tmp_path):
    pae = _tiny(seed=3)
    images = _images()
    assert not any(k.startswith("vfm.") for k in pae.state_dict())
    path = str(tmp_path / "ae.pt")
    model.save_checkpoint(path, "pae", pae, {"preset": "tiny"}, 7, pae_args=pae.pae_args)
    torch.manual_seed(123)  # a different global RNG state must not change the tiny VFM
    loaded = model.pae_from_checkpoint(path)
    with torch.no_grad():
        latent = pae.encode(images)
        torch.testing.assert_close(loaded.encode(images), latent, rtol=0, atol=0)
        torch.testing.assert_close(loaded.decode(latent), pae.decode(latent), rtol=0, atol=0)
    with pytest.raises(SystemExit, match="'pae' checkpoint"):
        model.save_checkpoint(path, "dit", pae, {}, 0)
        model.pae_from_checkpoint(path)


def test_pae_loss_composition_and_tiny_loss_falls(lpips_net):
    torch.manual_seed(0)
    pae, refiner = model.build_pae(preset="tiny"), model.build_refiner(64, depth=1).requires_grad_(False)
    images = F.interpolate(_images(2, 4), size=32, mode="bilinear")  # smooth images a tiny decoder can fit
    weights = dict(l1=1.5, lpips=0.7, gan=0.3, ssr=0.2, mcr=0.5, scr=0.0)
    total, parts = losses.pae_loss(pae(images, (42.5, 85.0)), images, lpips_net, refiner,
                                   model.PatchDiscriminator(16), **weights)
    assert set(parts) == {"l1", "lpips", "gan", "ssr", "mcr"}  # a zero weight skips its term
    torch.testing.assert_close(total.detach(), sum(weights[k] * v for k, v in parts.items()))
    opt = torch.optim.AdamW(pae.trainable_parameters(), lr=2e-3)
    history = []
    for _ in range(24):  # GAN off: an untrained discriminator is simply fooled, which would mask the test;
        # MCR off: on two images its continuity term holds the decoder near its mean for the first ~40 steps
        total, parts = losses.pae_loss(pae(images, (42.5, 85.0)), images, lpips_net, refiner, mcr=0.0)
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        history.append((total.item(), parts["l1"].item()))
    first, last = torch.tensor(history[:3]).mean(0), torch.tensor(history[-3:]).mean(0)
    assert last[0] < 0.5 * first[0] and last[1] < 0.8 * first[1]


def test_diagnostics_gsq_and_lpc(lpips_net):
    labels = torch.arange(4).repeat_interleave(5)
    centres = torch.randn(4, 32, 1, 1) * 10
    latents = centres[labels] + torch.randn(20, 32, 2, 2)
    assert losses.gsq(latents.mean((2, 3)), labels) == (1.0, 0.0)
    assert losses.gsq(latents.mean((2, 3)), labels[torch.randperm(20, generator=torch.Generator().manual_seed(0))])[0] < 0.6
    latent = model.sphere(torch.randn(2, 32, 4, 4))
    constant_decoder = lambda z: torch.full((len(z), 3, 32, 32), 0.5)
    assert losses.lpc(constant_decoder, latent, lpips_net).abs().max() < 1e-7
    pae = _tiny()
    with torch.no_grad():
        score = losses.lpc(pae.decode, pae.encode(_images(2)), lpips_net)
    assert score.shape == (2,) and (score > 0).all()


def test_ssim_matches_scikit_image():
    structural_similarity = pytest.importorskip("skimage.metrics").structural_similarity
    images = _images(2, 40)
    noisy = (images + 0.1 * torch.randn(images.shape, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    ours = losses.ssim(noisy, images)
    for a, b, s in zip(noisy, images, ours):
        ref = structural_similarity(a.permute(1, 2, 0).double().numpy(), b.permute(1, 2, 0).double().numpy(),
                                    gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1.0,
                                    channel_axis=2)
        assert s.item() == pytest.approx(ref, abs=1e-5)
    assert losses.ssim(images, images).tolist() == pytest.approx([1.0, 1.0], abs=1e-6)


# -----------------------------------------------------------------------------
# the authors' released checkpoints (model.load_checkpoint converts them in memory)


def _random_state(shapes, seed):
    g = torch.Generator().manual_seed(seed)
    return {k: 0.1 * torch.randn(s, generator=g) + (1.0 if k.endswith(("norm1.weight", "norm2.weight")) else 0)
            for k, s in shapes.items()}


def _linear(prefix, n_out, n_in, bias=True):
    return {prefix + ".weight": (n_out, n_in), **({prefix + ".bias": (n_out,)} if bias else {})}


def _released_tiny_pae_shapes(with_vfm=True, W=64, grid=8, patch=4, mlp=256):
    """Keys and shapes of the authors' PAE modules (DeltaEncoder, timm Attention compressors, ViT-MAE decoder,
    HF Dinov2WithRegistersModel in transformers-4 names) at the tiny sizes: width 64, 2 + 2 layers, patch 4."""
    s = {"delta_encoder.patch_embed.proj.weight": (W, 3, patch, patch), "delta_encoder.patch_embed.proj.bias": (W,),
         "delta_encoder.pos_embed": (1, grid * grid, W)}
    for i in range(2):
        L = f"delta_encoder.layers.{i}."
        for norm in ("norm1", "norm2_q", "norm2_kv", "norm3"):
            s.update({L + norm + ".weight": (W,), L + norm + ".bias": (W,)})
        s.update({**_linear(L + "self_attn.qkv", 3 * W, W), **_linear(L + "self_attn.proj", W, W),
                  **_linear(L + "cross_attn.q_proj", W, W), **_linear(L + "cross_attn.k_proj", W, W),
                  **_linear(L + "cross_attn.v_proj", W, W), **_linear(L + "cross_attn.proj", W, W),
                  **_linear(L + "mlp.fc1", 4 * W, W), **_linear(L + "mlp.fc2", W, 4 * W)})
    s.update({**_linear("delta_encoder.fusion_proj", 2 * W, W), "delta_encoder.final_ln.weight": (W,),
              "delta_encoder.final_ln.bias": (W,), **_linear("latent_compressor.0.qkv", 3 * W, W, bias=False),
              **_linear("latent_compressor.0.proj", W, W), "latent_compressor.1.weight": (32, W, 3, 3),
              "latent_compressor.1.bias": (32,), "latent_decompressor.0.weight": (W, 32, 3, 3),
              "latent_decompressor.0.bias": (W,), **_linear("latent_decompressor.1.qkv", 3 * W, W, bias=False),
              **_linear("latent_decompressor.1.proj", W, W), **_linear("decoder.decoder_embed", W, W),
              "decoder.decoder_pos_embed": (1, grid * grid + 1, W), "decoder.trainable_cls_token": (1, 1, W),
              "decoder.decoder_norm.weight": (W,), "decoder.decoder_norm.bias": (W,),
              **_linear("decoder.decoder_pred", patch * patch * 3, W)})
    for i in range(2):
        L = f"decoder.decoder_layers.{i}."
        s.update({**_linear(L + "attention.attention.query", W, W), **_linear(L + "attention.attention.key", W, W),
                  **_linear(L + "attention.attention.value", W, W), **_linear(L + "attention.output.dense", W, W),
                  **_linear(L + "intermediate.dense", mlp, W), **_linear(L + "output.dense", W, mlp),
                  L + "layernorm_before.weight": (W,), L + "layernorm_before.bias": (W,),
                  L + "layernorm_after.weight": (W,), L + "layernorm_after.bias": (W,)})
    if with_vfm:  # the PAE's encoder (Dinov2withNorm) wraps the HF model: encoder.encoder.*; table 14 x 14
        E = "encoder.encoder."
        s.update({E + "embeddings.cls_token": (1, 1, W), E + "embeddings.mask_token": (1, W),
                  E + "embeddings.position_embeddings": (1, 14 * 14 + 1, W),
                  E + "embeddings.register_tokens": (1, 4, W),
                  E + "embeddings.patch_embeddings.projection.weight": (W, 3, patch, patch),
                  E + "embeddings.patch_embeddings.projection.bias": (W,)})
        for i in range(2):
            L = f"{E}encoder.layer.{i}."
            s.update({**_linear(L + "attention.attention.query", W, W), **_linear(L + "attention.attention.key", W, W),
                      **_linear(L + "attention.attention.value", W, W), **_linear(L + "attention.output.dense", W, W),
                      **_linear(L + "mlp.fc1", 4 * W, W), **_linear(L + "mlp.fc2", W, 4 * W),
                      L + "norm1.weight": (W,), L + "norm1.bias": (W,), L + "norm2.weight": (W,),
                      L + "norm2.bias": (W,), L + "layer_scale1.lambda1": (W,), L + "layer_scale2.lambda1": (W,)})
    return s


def _released_tiny_dit(num_classes=3, channels=32, size=8, qk_norm=False, seed=0):
    """State dict of the authors' LightningDiT (SwiGLU, RoPE, RMSNorm) at the tiny preset: width 64, 2 blocks,
    4 heads; the RoPE tables as VisionRotaryEmbeddingFast builds them (row code, then column code)."""
    D, N, hidden = 64, size * size, int(2 / 3 * 4 * 64)
    s = {"x_embedder.proj.weight": (D, channels, 1, 1), "x_embedder.proj.bias": (D,), "pos_embed": (1, N, D),
         **_linear("t_embedder.mlp.0", D, 256), **_linear("t_embedder.mlp.2", D, D),
         "y_embedder.embedding_table.weight": (num_classes + 1, D), "final_layer.norm_final.weight": (D,),
         **_linear("final_layer.linear", channels, D), **_linear("final_layer.adaLN_modulation.1", 2 * D, D)}
    for i in range(2):
        L = f"blocks.{i}."
        s.update({L + "norm1.weight": (D,), L + "norm2.weight": (D,), **_linear(L + "attn.qkv", 3 * D, D),
                  **_linear(L + "attn.proj", D, D), **_linear(L + "mlp.w12", 2 * hidden, D),
                  **_linear(L + "mlp.w3", D, hidden), **_linear(L + "adaLN_modulation.1", 6 * D, D)})
        if qk_norm:
            s.update({L + "attn.q_norm.weight": (16,), L + "attn.k_norm.weight": (16,)})
    state = _random_state(s, seed)
    freqs = 1.0 / 10000 ** (torch.arange(0, 8, 2).float() / 8)  # dim = head_dim / 2 = 8
    angles = (torch.arange(size).float()[:, None] * freqs).repeat_interleave(2, dim=1)  # (size, 8)
    grid = torch.cat([angles[:, None].expand(size, size, 8), angles[None].expand(size, size, 8)], dim=-1)
    state["feat_rope.freqs_cos"], state["feat_rope.freqs_sin"] = grid.reshape(N, 16).cos(), grid.reshape(N, 16).sin()
    return state


def _released_dam_reference(s, pixels, vfm_tokens, heads=4, fusion="sft"):
    """The released DAM (DeltaEncoder, cross-attention on, its fusion mode) written out from its equations."""
    ln = lambda x, p: F.layer_norm(x, x.shape[-1:], s[p + ".weight"], s[p + ".bias"])  # noqa: E731  eps 1e-5
    lin = lambda x, p: F.linear(x, s[p + ".weight"], s.get(p + ".bias"))  # noqa: E731

    def attn(q, k, v):
        split = lambda t: t.view(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)  # noqa: E731
        return F.scaled_dot_product_attention(split(q), split(k), split(v)).transpose(1, 2).flatten(2)

    P = "delta_encoder."
    x = F.conv2d(pixels, s[P + "patch_embed.proj.weight"], s[P + "patch_embed.proj.bias"], stride=4)
    x = x.flatten(2).transpose(1, 2) + s[P + "pos_embed"]
    for i in range(2):
        L = f"{P}layers.{i}."
        x = x + lin(attn(*lin(ln(x, L + "norm1"), L + "self_attn.qkv").chunk(3, -1)), L + "self_attn.proj")
        h, u = ln(x, L + "norm2_q"), ln(vfm_tokens, L + "norm2_kv")
        x = x + lin(attn(lin(h, L + "cross_attn.q_proj"), lin(u, L + "cross_attn.k_proj"),
                         lin(u, L + "cross_attn.v_proj")), L + "cross_attn.proj")
        x = x + lin(F.gelu(lin(ln(x, L + "norm3"), L + "mlp.fc1")), L + "mlp.fc2")
    if fusion == "add":
        return ln(lin(x, P + "fusion_proj") + vfm_tokens, P + "final_ln")
    if fusion == "concat":  # VFM tokens first
        return ln(lin(torch.cat([vfm_tokens, x], dim=-1), P + "fusion_proj"), P + "final_ln")
    gamma, beta = lin(x, P + "fusion_proj").chunk(2, -1)  # on the block output, no norm in between
    return ln(vfm_tokens * (1 + gamma) + beta, P + "final_ln")


@pytest.fixture(scope="module")
def released_files(tmp_path_factory):
    """Tiny files in the authors' released formats: PAE (with its DINOv2 weights, DDP-prefixed keys), DiT, stats."""
    root = tmp_path_factory.mktemp("released")
    pae_state = _random_state(_released_tiny_pae_shapes(), 0)
    torch.save({"model": {f"module.{k}": v for k, v in pae_state.items()}}, root / "pae.pt")
    config = {"model": {"model_type": "LightningDiT-tiny/1", "use_qknorm": False, "use_swiglu": True,
                        "use_rope": True, "use_rmsnorm": True, "wo_shift": False},
              "data": {"latent_multiplier": 1.0, "num_classes": 3}}
    dit = {"model": _released_tiny_dit(seed=1), "ema": _released_tiny_dit(seed=2), "opt": {}, "config": config}
    torch.save(dit, root / "dit.pt")
    g = torch.Generator().manual_seed(3)
    torch.save({"mean": 0.1 * torch.randn(1, 32, 1, 1, generator=g).bfloat16(),  # the release keeps them in bf16
                "std": (1 + 0.1 * torch.rand(1, 32, 1, 1, generator=g)).bfloat16()}, root / "latents_stats.pt")
    return root, pae_state, dit


def test_released_pae_converts_strictly_and_computes_the_released_dam(released_files, tmp_path):
    root, s, _ = released_files
    pae = model.pae_from_checkpoint(str(root / "pae.pt"))
    assert pae.pae_args == dict(vfm="tiny", decoder="tiny", vfm_weights=None, image_size=32, dam_depth=2)
    W = 64
    pairs = [(pae.dam.blocks[1].self_attn.k.weight, s["delta_encoder.layers.1.self_attn.qkv.weight"][W:2 * W]),
             (pae.dam.blocks[0].cross_attn.v.bias, s["delta_encoder.layers.0.cross_attn.v_proj.bias"]),
             (pae.dam.blocks[0].norm_vfm.weight, s["delta_encoder.layers.0.norm2_kv.weight"]),
             (pae.projector.attn.v.weight, s["latent_compressor.0.qkv.weight"][2 * W:]),
             (pae.decoder.blocks[1].attn.proj.bias, s["decoder.decoder_layers.1.attention.output.dense.bias"]),
             (pae.decoder.cls_token, s["decoder.trainable_cls_token"]),
             (pae.vfm.net.blocks[0].attn.qkv.weight[W:2 * W],
              s["encoder.encoder.encoder.layer.0.attention.attention.key.weight"]),
             (pae.vfm.net.blocks[1].ls2.gamma, s["encoder.encoder.encoder.layer.1.layer_scale2.lambda1"]),
             (pae.vfm.net.cls_token, s["encoder.encoder.embeddings.cls_token"]
              + s["encoder.encoder.embeddings.position_embeddings"][:, :1])]
    for ours, released in pairs:
        assert torch.equal(ours, released)
    images = _images(2)
    with torch.no_grad():
        vfm_tokens = pae.vfm(images)
        h_z = pae.dam(pae.vfm.preprocess(images), vfm_tokens)
        torch.testing.assert_close(h_z, _released_dam_reference(s, pae.vfm.preprocess(images), vfm_tokens))
        latent = pae.encode(images)
        assert latent.shape == (2, 32, 8, 8) and torch.isfinite(pae.decode(latent)).all()
    for change, message in ((lambda d: d.pop("delta_encoder.layers.1.norm3.bias"), "no tensor for our"),
                            (lambda d: d.update(extra=torch.zeros(1)), "holds a tensor 'extra'"),
                            (lambda d: d.update({"decoder.decoder_norm.weight": torch.zeros(3)}),
                             r"wrong shapes decoder.decoder_norm.weight \(3,\)")):
        broken = dict(s)
        change(broken)
        torch.save({"model": broken}, tmp_path / "broken.pt")
        with pytest.raises(SystemExit, match=message):
            model.pae_from_checkpoint(str(tmp_path / "broken.pt"))
    with pytest.raises(SystemExit, match="released DIT file, but a 'pae' checkpoint"):
        model.pae_from_checkpoint(str(root / "dit.pt"))


def test_released_dit_converts_model_and_ema(released_files, tmp_path):
    root, _, dit = released_files
    ckpt = model.load_checkpoint(str(root / "dit.pt"), "dit", model._convert_released_dit)
    assert ckpt["model_args"] == dict(preset="tiny/1", in_channels=32, input_size=8, num_classes=3, qk_norm=False)
    for which in ("model", "ema"):
        net = build_dit(**ckpt["model_args"])
        net.load_state_dict(ckpt[which])  # strict
        assert torch.equal(net.blocks[1].ffn.w12.weight, dit[which]["blocks.1.mlp.w12.weight"])
        assert torch.equal(net.final_adaLN[1].bias, dit[which]["final_layer.adaLN_modulation.1.bias"])
    assert not torch.equal(ckpt["model"]["pos_embed"], ckpt["ema"]["pos_embed"])
    qk = {"model": _released_tiny_dit(qk_norm=True), "ema": None, "config": {}}
    torch.save({"model": {f"_orig_mod.{k}": v for k, v in qk["model"].items()}, "ema": None}, tmp_path / "qk.pt")
    assert model.load_checkpoint(str(tmp_path / "qk.pt"), "dit", model._convert_released_dit)["model_args"]["qk_norm"] is True
    bad_rope = _released_tiny_dit()
    bad_rope["feat_rope.freqs_sin"] = bad_rope["feat_rope.freqs_sin"].flip(0)
    torch.save({"model": bad_rope, "ema": None}, tmp_path / "rope.pt")
    with pytest.raises(SystemExit, match="RoPE tables do not match"):
        model.load_checkpoint(str(tmp_path / "rope.pt"), "dit", model._convert_released_dit)
    torch.save({"model": dit["model"], "ema": None, "config": {"model": {"use_swiglu": False}}}, tmp_path / "mlp.pt")
    with pytest.raises(SystemExit, match="only the released PAE configuration"):
        model.load_checkpoint(str(tmp_path / "mlp.pt"), "dit", model._convert_released_dit)


def test_sample_py_on_released_files(released_files, tmp_path):
    root, _, _ = released_files
    args = ["--preset", "tiny", "--ckpt", str(root / "dit.pt"), "--ae_ckpt", str(root / "pae.pt"), "--num_samples",
            "6", "--num_steps", "3", "--batch_size", "6", "--out", str(tmp_path / "s.npz")]
    with pytest.raises(SystemExit, match="--latent_stats"):
        sample.main(args)
    args += ["--latent_stats", str(root / "latents_stats.pt"), "--sampler", "sde", "--cfg_scale", "1"]
    with pytest.raises(SystemExit, match="outside 0..2, the classes of this DiT; --preset tiny asks for 0-7"):
        sample.main(args)  # a 3-class DiT: the tiny preset's 8 x 8 grid of classes 0-7 cannot be drawn
    sample.main(args + ["--labels", ""])  # all classes in turn
    with np.load(tmp_path / "s.npz") as f:
        assert f["arr_0"].shape == (6, 32, 32, 3) and f["labels"][sample.sample_order(0, 6)].tolist() == [0, 1, 2, 0, 1, 2]
        assert len(np.unique(f["arr_0"].reshape(6, -1), axis=0)) == 6


def test_encode_with_a_released_pae_gives_a_cache_train_dit_reads(released_files, tmp_path):
    root, _, _ = released_files
    train_ae.main(["--preset", "tiny", "--stage", "encode", "--ae_ckpt", str(root / "pae.pt"), "--synthetic_size",
                   "16", "--out_dir", str(tmp_path), "--latents", str(tmp_path / "latents")])
    cache = train_dit.LatentCache(str(tmp_path / "latents"))
    assert (cache.count, cache.channels, cache.size) == (16, 32, 8)
    assert cache.meta["ae_ckpt"] == str(root / "pae.pt")


@pytest.mark.parametrize("size", ["tiny", "DINOv2-L"])
def test_hugging_face_dinov2_and_our_vfm_agree(size):
    """HF Dinov2WithRegistersModel (what the release runs) and our timm VFM, the same random weights."""
    transformers = pytest.importorskip("transformers", reason="transformers is a test-only extra; CI installs it")
    W, layers, heads, patch, image, px = (64, 2, 4, 4, 56, 32) if size == "tiny" else (1024, 24, 16, 14, 518, 256)
    config = transformers.Dinov2WithRegistersConfig(hidden_size=W, num_hidden_layers=layers, num_attention_heads=heads,
                                                    intermediate_size=4 * W, patch_size=patch, image_size=image,
                                                    num_register_tokens=4, layerscale_value=1.0, layer_norm_eps=1e-6)
    torch.manual_seed(0)
    hf = transformers.Dinov2WithRegistersModel(config).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.02 * torch.randn_like(p))  # LayerNorm, layer scale and biases away from their init
    hf.layernorm.weight = hf.layernorm.bias = None  # the release's Dinov2withNorm(normalize=True)
    state = {k: v for k, v in hf.state_dict().items()}
    renamed = {re.sub(r"attention\.(q|k|v)_proj", lambda m: "attention.attention." + dict(q="query", k="key",
                      v="value")[m.group(1)], k).replace("attention.o_proj", "attention.output.dense"): v
               for k, v in state.items()}  # the transformers-4 names the authors' files carry
    vfm = model.build_vfm("tiny" if size == "tiny" else "dinov2", pretrained=False)
    images = _images(2, px)
    pixels = F.interpolate(images, size=vfm.input_size, mode="bicubic", align_corners=False) if px != vfm.input_size \
        else images
    with torch.no_grad():
        reference = hf((pixels - vfm.mean) / vfm.std).last_hidden_state[:, 5:]
        for names in (state, renamed):
            vfm.net.load_state_dict(model.convert_released_dinov2(names, vfm))
            torch.testing.assert_close(vfm(images), reference, rtol=0, atol=1e-5)




# -----------------------------------------------------------------------------
# data


def test_synthetic_dataset_deterministic_balanced_and_varied():
    data = train_ae.SyntheticImages(64, 32, seed=0)
    image, label, skipped = data[5]
    assert image.dtype == torch.uint8 and image.shape == (3, 32, 32) and skipped == 0
    assert torch.equal(train_ae.SyntheticImages(64, 32, seed=0)[5][0], image)  # a fresh object: same image
    assert not torch.equal(train_ae.SyntheticImages(64, 32, seed=1)[5][0], image)  # the seed matters
    labels = [data[i][1] for i in range(64)]
    assert np.bincount(labels, minlength=data.num_classes).tolist() == [4] * 16  # balanced
    images = torch.stack([data[i][0] for i in range(16)]).float()
    assert images.std(0).mean() > 20  # colours and layouts vary between images
    assert train_ae.SyntheticImages(4, 48)[0][0].shape == (3, 48, 48)  # any resolution


def test_synthetic_colours_classes_have_their_hue_and_shape():
    data = train_ae.SyntheticImages(32, 32, seed=0, kind="colours")
    assert data.num_classes == 8 and [data[i][1] for i in range(16)] == list(range(8)) * 2
    name = lambda k: f"{train_ae.HUES[k]} {train_ae.SHAPES[k % 4]}"  # noqa: E731
    assert name(0) == "red disc" and name(7) == "magenta ring"
    for index in range(16):
        image, label, _ = data[index]
        rgb = image.float().flatten(1) / 255
        saturation = rgb.max(0).values - rgb.min(0).values
        shape = saturation > 0.3  # the background is grey: only the shape has colour
        assert 0.08 < shape.float().mean() < 0.6, name(label)  # a shape of a sensible size is drawn
        r, g, b = rgb[:, shape].mean(1).tolist()
        hue = math.atan2(math.sqrt(3) * (g - b), 2 * r - g - b) / (2 * math.pi) % 1
        assert min(abs(hue - label / 8), 1 - abs(hue - label / 8)) < 0.06, (name(label), hue)
    ring, disc = data[3][0].float(), data[0][0].float()
    centre = lambda im: (im.max(0).values - im.min(0).values)[12:20, 12:20].mean()  # noqa: E731
    assert centre(ring) < centre(disc) - 40  # a ring is hollow, a disc is not


def test_image_folder_center_crop_and_corrupt_image_skipped(tmp_path):
    for cls in ("a", "b"):
        os.makedirs(tmp_path / cls)
    Image.new("RGB", (120, 80), (255, 0, 0)).save(tmp_path / "a" / "0.png")
    (tmp_path / "a" / "1.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")  # corrupt
    Image.new("RGB", (50, 90), (0, 0, 255)).save(tmp_path / "b" / "2.png")
    data = train_ae.ImageFolderADM(str(tmp_path), 32)
    assert len(data) == 3 and data.num_classes == 2
    image, label, skipped = data[0]
    assert image.shape == (3, 32, 32) and label == 0 and skipped == 0 and image[0].float().mean() > 250
    image, label, skipped = data[1]  # the corrupt file: replaced by the next readable one and counted
    assert skipped == 1 and label == 1 and image[2].float().mean() > 250
    loader = torch.utils.data.DataLoader(data, batch_size=3)
    assert sum(int(s.sum()) for _, _, s in loader) == 1


def test_center_crop_adm_matches_reference_steps():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (600, 900, 3), dtype=np.uint8))
    crop = train_ae.center_crop_adm(image, 256)
    assert crop.shape == (3, 256, 256)
    half = image.resize((450, 300), resample=Image.BOX)  # 600 >= 2*256: one box halving, then bicubic to 256
    ref = np.asarray(half.resize((384, 256), resample=Image.BICUBIC))[:, 64:320]
    assert np.array_equal(crop.permute(1, 2, 0).numpy(), ref)


def test_step_sampler_independent_of_world_size_and_resumable():
    def take(rank, world, start, steps, per_rank):
        it = iter(train_ae.StepSampler(20, 8, rank, world, seed=3, start_step=start))
        return [[next(it) for _ in range(per_rank)] for _ in range(steps)]

    one = take(0, 1, 0, 6, 8)  # 6 steps cross two epochs (2 steps per epoch)
    r0, r1 = take(0, 2, 0, 6, 4), take(1, 2, 0, 6, 4)
    assert [a + b for a, b in zip(r0, r1)] == one  # rank slices concatenate to the one-process batch
    assert take(0, 1, 3, 3, 8) == one[3:]  # starting at step 3 (resume) continues the same stream
    assert len(set(one[0] + one[1])) == 16  # an epoch never repeats an image
    assert one[0] != one[2]  # epochs are reshuffled
    wrapped = model.batch_indices(2, 8, 20, seed=3)  # train_dit's rule: positions 16..23 run on into epoch 1
    assert wrapped[:4].tolist() == model.batch_indices(0, 20, 20, seed=3)[16:].tolist()
    assert wrapped[4:].tolist() == model.batch_indices(1, 20, 20, seed=3)[:4].tolist()


def test_lr_schedule_warmup_and_cosine_floor():
    cfg = train_ae.Config(lr=1e-4, warmup=0.1, min_lr_ratio=0.1)
    lrs = [train_ae.get_lr(cfg, s, 100) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-5) and lrs[9] == pytest.approx(1e-4)
    assert max(lrs) == pytest.approx(1e-4) and lrs[-1] == pytest.approx(1e-5, rel=1e-2)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))


# -----------------------------------------------------------------------------
# stages: tiny preset on synthetic data; 32 px is the smallest size the 3-layer PatchGAN accepts

FAST = ["--preset", "tiny", "--batch_size", "4", "--micro_batch_size", "2", "--synthetic_size", "32",
        "--upsample", "bilinear", "--lowpass", "0", "--psnr_images", "2", "--eval_images", "8", "--lpc_images", "2",
        "--lpips_weight", "1", "--mcr_weight", "0.5"]  # the paper's loss terms (LPIPS and MCR, off in the quickstart)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """refine -> ae -> encode with no --stage under torchrun with 2 processes (Gloo)."""
    root = tmp_path_factory.mktemp("pipeline")
    out = _run(["train_ae.py", *FAST, "--out_dir", str(root / "ae"), "--latents", str(root / "latents"),
                "--refine_steps", "2", "--max_steps", "2", "--disc_start", "1", "--ckpt_every", "2"], nproc=2)
    return root, out


def test_pipeline_ddp_writes_valid_cache_that_train_dit_trains_on(pipeline):
    root, out = pipeline
    assert "running refine -> ae -> encode" in out
    assert "gan " in out and "disc " in out  # the GAN switched on at disc_start
    grid = Image.open(root / "ae" / "grid_0000002.png")
    assert grid.size[1] > 4 * 32 > grid.size[1] - 20  # input | recon | 42.5 deg | 85 deg rows of 32 px
    latents = np.load(root / "latents" / "latents.npy", mmap_mode="r")
    labels = np.load(root / "latents" / "labels.npy")
    meta = json.load(open(root / "latents" / "meta.json"))
    assert latents.dtype == np.float16 and latents.shape == (32, 2, 32, 8, 8)
    assert labels.dtype == np.int64 and labels.tolist() == [i % 8 for i in range(32)]
    assert meta["count"] == 32 and meta["channels"] == 32 and meta["size"] == 8 and meta["num_classes"] == 8
    assert os.path.isabs(meta["ae_ckpt"]) and os.path.isfile(meta["ae_ckpt"])
    z = latents[:, 0].astype(np.float64)
    assert np.allclose(meta["mean"], z.mean((0, 2, 3)), atol=1e-6) and np.allclose(meta["std"], z.std((0, 2, 3)))
    assert np.allclose((latents.astype(np.float32) ** 2).mean(2), 1, atol=1e-2)  # tokens on the sqrt(32) sphere
    assert not np.array_equal(latents[:, 0], latents[:, 1])
    out = _run(["train_dit.py", "--preset", "tiny", "--latents", str(root / "latents"), "--out_dir",
                str(root / "dit"), "--max_steps", "3", "--batch_size", "4", "--log_every", "1"])
    assert "step 3/3" in out and os.path.isfile(root / "dit" / "ckpt.pt")


def test_encode_deterministic_same_with_one_process_and_refuses_overwrite(pipeline):
    root, _ = pipeline
    args = [*FAST, "--stage", "encode", "--out_dir", str(root / "ae"), "--latents", str(root / "latents1")]
    train_ae.main(args)
    one, two = (np.load(root / d / "latents.npy") for d in ("latents1", "latents"))
    assert np.array_equal(one, two)  # 1 process == 2 processes, bit for bit
    assert np.array_equal(np.load(root / "latents1" / "labels.npy"), np.load(root / "latents" / "labels.npy"))
    pae = train_ae.M.pae_from_checkpoint(str(root / "ae" / "ae.pt"))
    image = train_ae.SyntheticImages(32, 32, kind="colours")[5][0][None].float() / 255  # the tiny preset's data
    with torch.no_grad():  # slot 1 holds the latent of the horizontally flipped image
        flipped = pae.encode(image.flip(-1)).numpy()
    assert np.allclose(one[5, 1], flipped, atol=2e-2)
    with pytest.raises(SystemExit, match="--overwrite"):
        train_ae.main(args)
    os.remove(root / "latents1" / "meta.json")  # an interrupted cache (no meta.json) is simply rewritten
    train_ae.main(args)
    assert os.path.isfile(root / "latents1" / "meta.json")


def test_eval_stage_reports_psnr_ssim_rfid_lpc_gsq(pipeline):
    root, _ = pipeline
    out_dir = root / "ae"
    _run(["train_ae.py", *FAST, "--stage", "eval", "--out_dir", str(out_dir), "--fid_weights", "random"],
         nproc=2)  # metrics reduced over ranks
    saved = json.load(open(out_dir / "eval.json"))
    assert saved["images"] == 8 and set(saved) >= {"psnr", "ssim", "rfid", "lpc", "gsq", "gsq_std"}
    assert 0 < saved["psnr"] < 60 and saved["rfid"] >= 0 and saved["lpc"] > 0 and 0 <= saved["gsq"] <= 1
    assert 0 < saved["ssim"] < 1 and 0 <= saved["ssc"] <= 1 and 1 / 32 <= saved["erank"] <= 1
    assert saved["unreadable"] == 0 and "| ssc " in _log(out_dir) and "| erank " in _log(out_dir)


def test_mistaken_rerun_changes_nothing(tmp_path):
    train_ae.main([*FAST, "--stage", "refine", "--refine_steps", "1", "--out_dir", str(tmp_path)])
    before = {name: (tmp_path / name).read_bytes() for name in ("config.json", "ckpt_refine.pt", "refine.pt")}
    with pytest.raises(SystemExit, match="already exists; pass --resume"):
        train_ae.main([*FAST, "--refine_steps", "3", "--out_dir", str(tmp_path)])  # the pipeline, no --resume
    assert before == {name: (tmp_path / name).read_bytes() for name in before}


def test_ae_resume_matches_uninterrupted_run(tmp_path, monkeypatch):
    train_ae.main([*FAST, "--stage", "refine", "--out_dir", str(tmp_path / "r"), "--refine_steps", "1"])
    args = [*FAST, "--stage", "ae", "--refine_ckpt", str(tmp_path / "r" / "refine.pt"), "--max_steps", "3",
            "--disc_start", "1", "--ckpt_every", "2", "--log_every", "1"]
    train_ae.main(args + ["--out_dir", str(tmp_path / "a")])

    real = train_ae.micro_batches

    def crash_at_step_2(cfg, d, loader, step):
        if step == 2:
            raise KeyboardInterrupt("simulated crash after the step-2 checkpoint")
        return real(cfg, d, loader, step)

    monkeypatch.setattr(train_ae, "micro_batches", crash_at_step_2)
    with pytest.raises(KeyboardInterrupt):
        train_ae.main(args + ["--out_dir", str(tmp_path / "b")])
    monkeypatch.setattr(train_ae, "micro_batches", real)
    with pytest.raises(SystemExit, match="--resume"):  # never silently overwrites a run
        train_ae.main(args + ["--out_dir", str(tmp_path / "b")])
    train_ae.main(args + ["--out_dir", str(tmp_path / "b"), "--resume"])
    a, b = (torch.load(tmp_path / d / "ckpt_ae.pt", weights_only=True) for d in ("a", "b"))
    assert a["step"] == b["step"] == 3
    for key in ("model", "ema", "disc"):
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), (key, name)
    for sa, sb in zip(a["opt"]["state"].values(), b["opt"]["state"].values()):
        assert torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])


def test_training_same_with_one_and_two_processes(pipeline, tmp_path):
    """The pipeline ran with 2 ranks x accumulation 1; one process runs accumulation 2 over the same batch."""
    root, _ = pipeline
    train_ae.main([*FAST, "--stage", "refine", "--refine_steps", "2", "--out_dir", str(tmp_path)])
    train_ae.main([*FAST, "--stage", "ae", "--max_steps", "2", "--disc_start", "1", "--ckpt_every", "2",
                   "--refine_ckpt", str(root / "ae" / "refine.pt"), "--out_dir", str(tmp_path)])
    for name in ("refine.pt", "ae.pt"):
        one, two = (torch.load(d / name, weights_only=True)["model"] for d in (tmp_path, root / "ae"))
        for key in two:
            assert torch.allclose(one[key], two[key], atol=1e-5), (name, key)


# -----------------------------------------------------------------------------
# sample.py: samplers, guidance, class-balanced distributed sampling

def _gaussian_target(dim=3, seed=0):
    """Mean, covariance and the exact flow-matching velocity of x1 ~ N(mu, Sigma), x0 ~ N(0, I)."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(dim, dim, generator=gen, dtype=torch.float64)
    sigma = a @ a.T + 0.3 * torch.eye(dim, dtype=torch.float64)
    mu = torch.randn(dim, generator=gen, dtype=torch.float64)
    eye = torch.eye(dim, dtype=torch.float64)

    def velocity(x, t):  # E[x1 - x0 | x_t = x] = mu + Cov(x1 - x0, x_t) Cov(x_t)^-1 (x - t mu)
        cov_xt = t * t * sigma + (1 - t) ** 2 * eye
        gain = (t * sigma - (1 - t) * eye) @ torch.linalg.inv(cov_xt)
        return mu + (x - t * mu) @ gain.T

    return mu, sigma, velocity


def _random_dit(num_classes=3, channels=4, size=2, seed=0):
    """A tiny DiT whose output is not zero (the zero-initialised layers perturbed)."""
    torch.manual_seed(seed)
    model = build_dit("tiny/1", channels, size, num_classes=num_classes)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return model.eval()


def _pipeline(tmp_path, num_classes=3, with_meta=True):
    """Tiny PAE + DiT checkpoints and a latent meta.json; returns the DiT checkpoint path."""
    torch.manual_seed(0)
    pae = build_pae(preset="tiny", pretrained=False)
    ae_path = str(tmp_path / "ae.pt")
    save_checkpoint(ae_path, "pae", pae, {"preset": "tiny"}, 0, pae_args=pae.pae_args)
    with torch.no_grad():
        latent = pae.encode(torch.rand(1, 3, pae.image_size, pae.image_size))
    channels, size = latent.shape[1], latent.shape[2]
    cache = tmp_path / "latents"
    cache.mkdir()
    meta = {"ae_ckpt": ae_path, "channels": channels, "size": size, "count": 8, "num_classes": num_classes,
            "mean": [0.1 * c for c in range(channels)], "std": [1.0 + 0.05 * c for c in range(channels)],
            "dataset": "test", "created": "now"}
    if with_meta:
        (cache / "meta.json").write_text(json.dumps(meta))
    model, ema = _random_dit(num_classes, channels, size, 0), _random_dit(num_classes, channels, size, 1)
    model_args = dict(preset="tiny/1", in_channels=channels, input_size=size, num_classes=num_classes,
                      qk_norm=False)
    dit_path = str(tmp_path / "dit.pt")
    save_checkpoint(dit_path, "dit", model, {"latents": str(cache), "model": "tiny/1"}, 10, ema=ema,
                    model_args=model_args, latent_meta=meta if with_meta else None)
    return dit_path, pae


def _args(tmp_path, dit_path, name="samples", **extra):
    args = {"preset": "tiny", "ckpt": dit_path, "out": str(tmp_path / f"{name}.npz"), "num_samples": 12,
            "num_steps": 4, "batch_size": 5, "labels": "", **extra}  # labels "": all classes in turn, not 0-7
    return [f"--{k}={v}" for k, v in args.items()]


# -----------------------------------------------------------------------------
# samplers


def test_shifted_grid_endpoints_and_monotone():
    grid = sample.shifted_grid(0.0, 1.0, 250, 0.4).tolist()
    assert len(grid) == 250 and grid[0] == 0.0 and grid[-1] == 1.0
    assert all(b > a for a, b in zip(grid[:-1], grid[1:]))
    assert all(g <= u for g, u in zip(grid, np.linspace(0, 1, 250)))  # s < 1 spends more points near noise
    assert grid[1] == pytest.approx(0.4 * (1 / 249) / (1 - 0.6 * (1 / 249)))


def test_euler_ode_reproduces_gaussian_target():
    """The Euler map of an affine velocity is affine, x -> A x + b: mean b and covariance A A^T exactly."""
    mu, sigma, velocity = _gaussian_target()
    probes = torch.cat([torch.zeros(1, 3, dtype=torch.float64), torch.eye(3, dtype=torch.float64)])
    errors = []
    for num_steps in (250, 500):
        out = sample.ode_sample(velocity, probes, num_steps, 0.4)
        assert out.dtype == torch.float64
        a = (out[1:] - out[0]).T
        assert torch.allclose(out[0], mu, atol=1e-10)
        errors.append((a @ a.T - sigma).abs().max().item() / sigma.abs().max().item())
    assert errors[0] < 0.015  # 250 points, the paper's grid: covariance within 1.5%
    assert errors[1] == pytest.approx(errors[0] / 2, rel=0.05)  # first order: twice the steps, half the error


def test_sde_is_the_released_sbdm_sampler():
    """w(t) = (1 - t)/t, drift 2v - x/t; grid shift(linspace(1e-5, 0.996)); last mean step taken at t = 0.996."""
    t = torch.tensor([1e-5, 0.01, 0.3, 0.9, 0.996], dtype=torch.float64)
    torch.testing.assert_close(sample.sbdm_diffusion(t), (1 - t) / t, rtol=1e-14, atol=0)
    x, v = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    for ti in t:
        torch.testing.assert_close(sample.sbdm_drift(lambda x_, t_: v, x, ti), 2 * v - x / ti, rtol=1e-12, atol=1e-9)
    seen = []
    sample.sde_sample(lambda x_, t_: seen.append(t_) or torch.zeros_like(x_), x, 250, 0.4, lambda i: torch.zeros_like(x))
    shift = lambda s: 0.4 * s / (1 - 0.6 * s)  # noqa: E731
    assert len(seen) == 250 and all(type(s) is float for s in seen)  # 249 Euler-Maruyama steps + the mean step
    grid = sample.shifted_grid(1e-5, 0.996, 250, 0.4).tolist()
    assert grid[0] == pytest.approx(shift(1e-5), rel=1e-12) and grid[-1] == pytest.approx(shift(0.996), rel=1e-12)
    assert seen[:-1] == grid[:-1]  # one Euler-Maruyama step from each grid point to the next
    assert seen[-1] == 0.996  # the mean step's drift is evaluated at the unshifted end of the grid
    x0, n, c = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64), 0.7
    t0, t1 = shift(1e-5), shift(0.996)  # two grid points: one Euler-Maruyama step, then the mean step
    x1 = x0 + (2 * c - x0 / t0) * (t1 - t0) + math.sqrt(2 * (1 - t0) / t0 * (t1 - t0)) * n
    want = x1 + (2 * c - x1 / 0.996) * 0.004
    out = sample.sde_sample(lambda x_, t_: torch.full_like(x_, c), x0, 2, 0.4, lambda i: n)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)


def test_sde_matches_gaussian_target_statistically():
    mu, sigma, velocity = _gaussian_target()
    n = 8000
    gen = torch.Generator().manual_seed(1)
    x0 = torch.randn(n, 3, generator=gen, dtype=torch.float64)
    noise = lambda i: torch.randn(n, 3, generator=gen, dtype=torch.float64)  # noqa: E731
    out = sample.sde_sample(velocity, x0, 250, 0.4, noise)
    var = torch.diag(sigma)
    assert ((out.mean(0) - mu).abs() < 4 * (var / n).sqrt()).all()
    cov_sd = ((var[:, None] * var[None] + sigma ** 2) / n).sqrt()  # sampling s.d. of each covariance entry
    assert ((torch.cov(out.T) - sigma).abs() < 5 * cov_sd + 0.01 * sigma.abs().max()).all()
    again = sample.sde_sample(velocity, x0[:100], 250, 0.4,
                              lambda i: torch.randn(100, 3, generator=gen, dtype=torch.float64))
    assert (again - out[:100]).abs().mean() > 0.1  # the path noise matters: not the ODE in disguise


def test_cfg_scale_one_interval_and_batched_guidance():
    model = _random_dit()
    x, y, t = torch.randn(4, 4, 2, 2), torch.tensor([0, 1, 2, 0]), 0.6
    t_batch = torch.full((4,), t)
    with torch.no_grad():
        v_cond, v_uncond = model(x, t_batch, y), model(x, t_batch, torch.full_like(y, 3))
        assert (v_cond - v_uncond).abs().max() > 1e-3
        assert torch.equal(sample.guided_velocity(model, y, 1.0, 0.25, 3)(x, t), v_cond)
        guided = sample.guided_velocity(model, y, 2.5, 0.25, 3)(x, t)
        assert torch.allclose(guided, v_uncond + 2.5 * (v_cond - v_uncond), atol=1e-5)
        below = sample.guided_velocity(model, y, 2.5, 0.7, 3)(x, t)  # t = 0.6 < 0.7: guidance off
        assert torch.equal(below, v_cond)


def test_uint8_conversion_truncates_as_released_or_rounds():
    images = torch.tensor([0.4, 0.6, 254.4, 254.6, 300.0, -9.0]).div(255).view(1, 1, 1, 6).expand(1, 3, 1, 6)
    assert fid.to_uint8(images)[0, 0, :, 0].tolist() == [0, 0, 254, 254, 255, 0]  # the default: truncation
    assert fid.to_uint8(images, "round")[0, 0, :, 0].tolist() == [0, 1, 254, 255, 255, 0]


def test_decoder_precision_as_released():
    """bf16: the decoder's weights in bf16 under a bf16 autocast, the final de-normalisation in fp32."""
    torch.manual_seed(0)
    pae = build_pae(preset="tiny").eval()
    latent = model.sphere(torch.randn(2, 32, 8, 8))
    with torch.no_grad():
        fp32 = sample.decode(pae, latent, "fp32")
        sample.prepare_decoder(pae, "bf16")
        assert {p.dtype for p in pae.decoder.parameters()} == {torch.bfloat16} == \
               {p.dtype for p in pae.deprojector.parameters()}
        assert pae.vfm.std.dtype == torch.float32
        bf16 = sample.decode(pae, latent, "bf16")
    assert bf16.dtype == torch.float32 and 0 < (bf16 - fp32).abs().max() < 0.1


def test_classes_are_balanced_or_chosen():
    balanced = sample.classes_of(range(30), 3, [], 8)
    assert np.bincount(balanced).tolist() == [10, 10, 10]
    assert sample.classes_of(range(6), 3, [7, 2], 3) == [7, 7, 7, 2, 2, 2]


# -----------------------------------------------------------------------------
# sample.py end to end (tiny PAE + DiT checkpoints)


def test_sample_tiny_end_to_end(tmp_path):
    dit_path, pae = _pipeline(tmp_path)
    sample.main(_args(tmp_path, dit_path, name="raw", use_ema="false"))
    sample.main(_args(tmp_path, dit_path))
    order = sample.sample_order(0, 12)  # arr_0[order]: index order
    with np.load(tmp_path / "samples.npz") as f:
        images, labels = f["arr_0"][order], f["labels"][order]
    assert images.shape == (12, pae.image_size, pae.image_size, 3) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [4, 4, 4]
    assert len(np.unique(images.reshape(12, -1), axis=0)) == 12  # every sample has its own noise
    assert (tmp_path / "samples.png").is_file() and not (tmp_path / "samples_shards").exists()
    with np.load(tmp_path / "raw.npz") as f:
        assert not np.array_equal(f["arr_0"][order], images)  # EMA by default, the raw weights on request
    ckpt = torch.load(dit_path, weights_only=True)
    meta, model_args = ckpt["latent_meta"], ckpt["model_args"]
    ema = build_dit("tiny/1", model_args["in_channels"], model_args["input_size"], num_classes=3)
    ema.load_state_dict(ckpt["ema"])
    cfg = sample.parse_config(sample.Config, _args(tmp_path, dit_path), sample.PRESETS)
    shape = (meta["channels"], meta["size"], meta["size"])
    with torch.no_grad():  # sample 7 by hand: EMA, its own noise, z * std + mean, bf16 decoder, truncation
        latent = sample.sample_latents(ema.eval(), [7], [7 % 3], shape, cfg, 3, torch.device("cpu"))
        mean, std = (torch.tensor(meta[k]).view(1, -1, 1, 1) for k in ("mean", "std"))
        pae = sample.prepare_decoder(pae.eval(), "bf16")
        expected = fid.to_uint8(sample.decode(pae, latent * std + mean, "bf16"))[0].numpy()
    assert np.abs(expected.astype(int) - images[7]).max() <= 1
    sample.main(_args(tmp_path, dit_path, name="rebatched", batch_size=4))
    with np.load(tmp_path / "rebatched.npz") as f:  # noise is per global index: batching changes nothing
        assert np.abs(f["arr_0"][order].astype(int) - images).max() <= 1


def test_sample_then_fid_py_with_random_inception(tmp_path, capfd):  # slow: fid.py's 2048-d statistics on CPU
    dit_path, _ = _pipeline(tmp_path)
    sample.main(_args(tmp_path, dit_path, name="raw", use_ema="false"))
    sample.main(_args(tmp_path, dit_path, fid_ref=tmp_path / "raw.npz", fid_weights="random"))
    metrics = json.loads(capfd.readouterr().out.strip().splitlines()[-1])  # fid.py's last line: the JSON metrics
    assert metrics["n"] == 12 and np.isfinite(metrics["fid"]) and metrics["fid"] > 0


def test_one_process_and_torchrun_two_give_identical_npz(tmp_path):
    dit_path, _ = _pipeline(tmp_path)
    extra = dict(sampler="sde", cfg_scale=2.0, cfg_interval_start=0.3)
    log = _run(["sample.py", *_args(tmp_path, dit_path, "one", **extra)])
    _run(["sample.py", *_args(tmp_path, dit_path, "two", **extra)], nproc=2)
    assert (tmp_path / "one.npz").read_bytes() == (tmp_path / "two.npz").read_bytes()
    assert "\r" not in log and "sampling: 3/3 shard (100%" in log  # redirected: plain progress lines, no bar


def test_restart_skips_finished_shards_and_rejects_other_settings(tmp_path):
    dit_path, pae = _pipeline(tmp_path)
    sample.main(_args(tmp_path, dit_path, name="full"))
    shards = tmp_path / "part_shards"
    shards.mkdir()
    settings = sample.shard_settings(sample.parse_config(sample.Config, _args(tmp_path, dit_path, name="part"),
                                                         sample.PRESETS), 10)
    (shards / "settings.json").write_text(json.dumps(settings))
    marker = np.full((5, pae.image_size, pae.image_size, 3), 7, np.uint8)
    sample.save_npz(str(shards / "000001.npz"), arr_0=marker, labels=np.arange(5, 10) % 3)
    sample.main(_args(tmp_path, dit_path, name="part"))
    order = sample.sample_order(0, 12)  # arr_0[order]: index order
    with np.load(tmp_path / "full.npz") as full, np.load(tmp_path / "part.npz") as part:
        part_images, full_images = part["arr_0"][order], full["arr_0"][order]
    assert (part_images[5:10] == 7).all()  # the finished shard was kept, not recomputed
    assert np.array_equal(part_images[:5], full_images[:5]) and np.array_equal(part_images[10:], full_images[10:])
    shards.mkdir()
    (shards / "settings.json").write_text(json.dumps({**settings, "cfg_scale": 9.0}))
    with pytest.raises(SystemExit, match="other settings"):
        sample.main(_args(tmp_path, dit_path, name="part", overwrite=True))


def test_latent_stats_come_from_the_checkpoint_copy(tmp_path, capsys):
    dit_path, _ = _pipeline(tmp_path)
    sample.main(_args(tmp_path, dit_path, name="cache"))
    meta_path = tmp_path / "latents" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "mean": [m + 5 for m in meta["mean"]]}))  # re-encoded since
    sample.main(_args(tmp_path, dit_path, name="changed"))
    assert "changed since" in capsys.readouterr().out
    os.remove(meta_path)
    sample.main(_args(tmp_path, dit_path, name="copy"))
    for name in ("changed", "copy"):  # the statistics the DiT was trained with, whatever the cache says now
        assert (tmp_path / "cache.npz").read_bytes() == (tmp_path / f"{name}.npz").read_bytes()


def test_sample_errors(tmp_path):
    dit_path, _ = _pipeline(tmp_path)
    cases = [
        (dict(ckpt=str(tmp_path / "nope.pt")), "does not exist"),
        (dict(ckpt=str(tmp_path / "ae.pt")), "'dit' checkpoint is needed"),
        (dict(ae_ckpt=str(tmp_path / "nope.pt")), "--ae_ckpt .* does not exist"),
        (dict(num_samples=10), "not a positive multiple of the 3 classes"),
        (dict(labels="1,3"), "outside 0..2"),
        (dict(labels="1,x"), "outside 0..2"),
        (dict(sampler="heun"), "--sampler heun is unknown"),
        (dict(to_uint8="floor"), "unknown --to_uint8"),
    ]
    for extra, message in cases:
        with pytest.raises(SystemExit, match=message):
            sample.main(_args(tmp_path, dit_path, **extra))
    (tmp_path / "bare").mkdir()
    bare_path, _ = _pipeline(tmp_path / "bare", with_meta=False)
    with pytest.raises(SystemExit, match="no latent statistics"):
        sample.main(_args(tmp_path, bare_path))


# -----------------------------------------------------------------------------
# fid.py: FID Inception, preprocessing, metrics, CLI

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def inception():
    return fid.load_inception("random")


def _rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def test_inception_matches_pytorch_fid_and_not_stock_torchvision(monkeypatch):
    import pytorch_fid.inception as pytorch_fid_inception  # the test extra; missing = a failure, not a skip
    state = fid.random_state_dict(fid.FIDInception())
    assert len(state) == 472 and sum(t.numel() for t in state.values()) == 23_885_392  # the file's layout
    net = fid.FIDInception().eval()
    net.load_state_dict(state, strict=True)
    monkeypatch.setattr(pytorch_fid_inception, "load_state_dict_from_url", lambda *args, **kwargs: state)
    reference = pytorch_fid_inception.InceptionV3([3], resize_input=False, normalize_input=False).eval()
    captured = {}
    reference.blocks[2][6].branch1x1.register_forward_hook(lambda m, i, o: captured.update(spatial=o))  # Mixed_6d
    x = torch.rand(2, 3, 299, 299, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        ours = net(x.contiguous(memory_format=torch.channels_last))  # the layout fid.py uses on CPU
        ref_pool = reference(x)[0].flatten(1)
    ref = {"pool": ref_pool, "logits": ref_pool @ state["fc.weight"].T,
           "spatial": captured["spatial"][:, :7].permute(0, 2, 3, 1).flatten(1)}
    for key in ("pool", "logits", "spatial"):
        assert ours[key].shape == ref[key].shape == (2, fid.DIMS[key])
        assert ref[key].std() > 1e-3 and _rel_err(ours[key], ref[key]) < 1e-5, key

    stock = torchvision.models.inception_v3(weights=None, aux_logits=False, num_classes=1008, init_weights=False)
    stock.load_state_dict(state, strict=True)
    stock.avgpool.register_forward_hook(lambda m, i, o: captured.update(stock=o.flatten(1)))
    with torch.no_grad():
        stock.eval()(x)
    assert _rel_err(captured["stock"], ref["pool"]) > 1e-3  # stock pooling is measurably different


def test_tf_resize_is_legacy_bilinear():
    x = torch.rand(1, 299, 299, 3) * 255
    assert torch.equal(fid.tf_resize_bilinear(x), x)
    up = fid.tf_resize_bilinear(torch.tensor([[0.0, 10.0], [20.0, 30.0]])[None, :, :, None], size=4)  # edges clamp
    assert torch.allclose(up[0, :, :, 0], torch.tensor([[0.0, 5, 10, 10], [10, 15, 20, 20], [20, 25, 30, 30],
                                                        [20, 25, 30, 30]]))
    ramp = torch.arange(4.0)  # sources at 0, 4/3, 8/3 (no half-pixel shift)
    down = fid.tf_resize_bilinear((100 * ramp[:, None] + ramp[None, :])[None, :, :, None], size=3)
    a = torch.tensor([0, 4 / 3, 8 / 3])
    assert torch.allclose(down[0, :, :, 0], 100 * a[:, None] + a[None, :], atol=1e-4)
    images = [np.random.default_rng(0).integers(0, 256, (h, 40, 3), dtype=np.uint8) for h in (32, 50)]
    mixed = fid.preprocess(images, "cpu")  # mixed sizes are resized one by one
    assert mixed.shape == (2, 3, 299, 299) and mixed.min() >= -1 and mixed.max() <= 127 / 128
    assert torch.equal(mixed[1:], fid.preprocess(images[1][None], "cpu"))


def test_frechet_distance():
    rng = np.random.default_rng(0)
    mu1, mu2, var1, var2 = rng.normal(size=8), rng.normal(size=8), rng.uniform(0.1, 2, 8), rng.uniform(0.1, 2, 8)
    closed_form = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(var1) - np.sqrt(var2)) ** 2).sum()
    assert fid.frechet_distance(mu1, np.diag(var1), mu2, np.diag(var2)) == pytest.approx(closed_form, rel=1e-10)
    a, b = rng.normal(size=(40, 16)), rng.normal(size=(30, 16)) @ rng.normal(size=(16, 16))
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    adm = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(s1 + s2) - 2 * np.trace(scipy.linalg.sqrtm(s1 @ s2).real)
    assert fid.frechet_distance(a.mean(0), s1, b.mean(0), s2) == pytest.approx(adm, rel=1e-9)  # ADM's sqrtm form
    low_rank = np.cov(rng.normal(size=(5, 64)), rowvar=False)  # singular, as with few samples
    assert abs(fid.frechet_distance(np.zeros(64), low_rank, np.zeros(64), low_rank)) < 1e-6 * np.trace(low_rank)
    with pytest.raises(SystemExit, match="different dimensions"):
        fid.frechet_distance(mu1, np.diag(var1), mu2[:4], np.diag(var2[:4]))


def test_inception_score():
    logits = np.random.default_rng(0).normal(size=(1, 1008))
    assert fid.inception_score(np.repeat(logits, 20, 0)) == pytest.approx(1.0)
    one_hot = np.zeros((20, 1008))
    one_hot[np.arange(20), np.arange(20) % 10] = 1e4  # 10 distinct classes per split of 10
    assert fid.inception_score(one_hot, split_size=10) == pytest.approx(10.0)


def test_precision_recall():
    rng = np.random.default_rng(0)
    cluster = rng.normal(size=(50, 8))
    assert fid.precision_recall(cluster, cluster) == (1.0, 1.0)
    assert fid.precision_recall(cluster, cluster + 100) == (0.0, 0.0)
    half = np.concatenate([cluster[:25], cluster[25:] + 100])  # half the samples off the reference manifold
    precision, recall = fid.precision_recall(cluster, half)
    assert precision == 0.5 and 0 < recall < 1


def write_images(folder, images):
    os.makedirs(os.path.join(folder, "sub"), exist_ok=True)
    for i, image in enumerate(images):  # the second half in a sub-folder (the search is recursive), sorted after
        Image.fromarray(image).save(os.path.join(folder, "sub" if 2 * i >= len(images) else "", f"{i:03d}.png"))


def test_cli_round_trip_and_npz_equals_folder(tmp_path, monkeypatch, capsys, inception):
    images = np.random.default_rng(0).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    write_images(tmp_path / "images", images)
    np.savez(tmp_path / "images.npz", arr_0=images)
    weights = tmp_path / "random.pth"
    torch.save(fid.random_state_dict(inception), weights)

    command = [sys.executable, os.path.join(HERE, "fid.py"), tmp_path / "images", "--save_stats",
               tmp_path / "stats.npz", "--batch_size", 4, "--weights", weights]
    result = subprocess.run(list(map(str, command)), capture_output=True, text=True, cwd=HERE)
    assert result.returncode == 0, result.stderr
    assert "SHA-256" in result.stderr  # random weights: warned about, not refused
    stats = np.load(tmp_path / "stats.npz")
    assert stats["mu"].shape == (2048,) and stats["sigma_s"].shape == (2023, 2023) and stats["pool"].shape == (6, 2048)

    monkeypatch.setattr(sys, "argv", ["fid.py", str(tmp_path / "stats.npz"), "--ref", str(tmp_path / "stats.npz"),
                                      "--weights", str(weights)])
    fid.main()
    metrics = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert abs(metrics["fid"]) < 1e-5 * np.trace(stats["sigma"]) and metrics["n"] == 6  # rank 5 of 2048: round-off
    assert abs(metrics["sfid"]) < 1e-5 * np.trace(stats["sigma_s"])
    assert metrics["precision"] == metrics["recall"] == 1.0 and metrics["is"] >= 1.0

    from_npz = fid.statistics(str(tmp_path / "images.npz"), inception, batch_size=4)
    assert isinstance(fid.npz_images(str(tmp_path / "images.npz")), np.memmap)
    np.testing.assert_allclose(from_npz["pool"], stats["pool"], rtol=1e-4, atol=1e-5)  # 1 vs 2 threads
    np.testing.assert_allclose(from_npz["mu_s"], stats["mu_s"], rtol=1e-4, atol=1e-5)
    adm = {k: stats[k] for k in ("sigma", "mu_s", "sigma_s")}  # ADM's reference format: statistics + arr_0
    np.savez(tmp_path / "adm.npz", arr_0=images, mu=stats["mu"] + 1, **adm)
    adm_stats = fid.statistics(str(tmp_path / "adm.npz"), inception, batch_size=4)
    assert np.array_equal(adm_stats["mu"], stats["mu"] + 1)  # stored statistics win, as in ADM's evaluator
    np.testing.assert_allclose(adm_stats["pool"], stats["pool"], rtol=1e-4, atol=1e-5)  # P/R features from arr_0


def test_clear_errors(tmp_path, monkeypatch, inception):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_hub"))
    with pytest.raises(SystemExit, match="--weights PATH") as error:
        fid.load_inception()
    assert fid.WEIGHTS_URL in str(error.value)
    with pytest.raises(SystemExit, match="does not exist"):
        fid.load_inception(str(tmp_path / "missing.pth"))
    with pytest.raises(SystemExit, match="at least 2"):
        fid.statistics(np.zeros((1, 8, 8, 3), np.uint8), inception)
    with pytest.raises(SystemExit, match=r"uint8 images of shape \(N, H, W, 3\)"):
        fid.statistics(np.zeros((2, 8, 8), np.uint8), inception)
    np.savez(tmp_path / "other.npz", images=np.zeros((2, 8, 8, 3), np.uint8))
    with pytest.raises(SystemExit, match="no arr_0"):
        fid.statistics(str(tmp_path / "other.npz"), inception)
    write_images(tmp_path / "folder", np.zeros((2, 8, 8, 3), np.uint8))
    (tmp_path / "folder" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(SystemExit, match="1 of 3 image files .* cannot be read .*broken.png"):
        fid.statistics(str(tmp_path / "folder"), inception)


def test_torchrun_shards_and_gathers(tmp_path, inception):
    images = np.random.default_rng(1).integers(0, 256, (7, 24, 24, 3), dtype=np.uint8)  # 7: unequal shards
    np.savez(tmp_path / "images.npz", arr_0=images)
    torch.save(fid.random_state_dict(inception), tmp_path / "random.pth")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               os.path.join(HERE, "fid.py"), tmp_path / "images.npz", "--save_stats", tmp_path / "ddp.npz",
               "--weights", tmp_path / "random.pth", "--batch_size", 2]
    result = subprocess.run(list(map(str, command)), capture_output=True, text=True, cwd=HERE)
    assert result.returncode == 0, result.stderr
    gathered = np.load(tmp_path / "ddp.npz")["pool"]
    single = fid.inception_features(inception, images, batch_size=1)["pool"].numpy()  # the ranks' batches of 1
    np.testing.assert_allclose(gathered, single, rtol=1e-5, atol=1e-6)


# -----------------------------------------------------------------------------
# README: the Quickstart runs as written, and every flag it mentions exists

TORCHRUN_FLAGS = {"nproc_per_node", "nnodes", "rdzv_backend", "rdzv_endpoint", "rdzv_id", "max", "index",  # pip's
                  "job", "nodes", "ntasks", "gpus", "cpus", "time", "requeue", "open", "output", "signal"}  # SLURM's
SCRIPTS = {"train_ae.py": train_ae.Config, "train_dit.py": train_dit.Config, "sample.py": sample.Config,
           "fid.py": fid.Config}


def _readme():
    with open(os.path.join(REPO, "README.md")) as f:
        return f.read()


def _colour_classifier(steps=300):
    """A small CNN trained on the quickstart's training images (the 8 "colours" classes): a judge of the samples
    that knows nothing of the tokenizer or the DiT. Returns it with its accuracy on held-out images."""
    torch.manual_seed(0)
    train, held = train_ae.SyntheticImages(2048, 32, 0, "colours"), train_ae.SyntheticImages(512, 32, 1, "colours")
    x, hx = (torch.stack([d[i][0] for i in range(len(d))]).float() / 255 for d in (train, held))
    y, hy = (torch.tensor([d[i][1] for i in range(len(d))]) for d in (train, held))
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
                              torch.nn.Conv2d(32, 64, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
                              torch.nn.Conv2d(64, 64, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten(), torch.nn.Linear(64, 8))
    opt = torch.optim.Adam(net.parameters(), 3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        batch = torch.randint(len(x), (64,), generator=g)
        loss = F.cross_entropy(net(x[batch]), y[batch])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return net.eval(), (net(hx).argmax(1) == hy).float().mean().item()


def _run_line(commands, cwd, env, times):
    for command in commands:
        args = shlex.split(command)
        assert args[0] == "python", command
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, *args[1:]], cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=1800)  # generous: a busy 2-core machine can be several times slower
        times.append((command, time.perf_counter() - start))
        assert proc.returncode == 0, command + "\n" + proc.stdout[-3000:] + proc.stderr[-3000:]
        yield proc.stdout + proc.stderr


def test_readme_quickstart_pipeline(tmp_path, capsys):  # the suite's slowest test: the whole tiny pipeline, twice
    """The Quickstart line as written: its reconstructions reach a PSNR floor, a classifier trained on the
    training images recognises the class each sample was asked for, and the line can be run again."""
    block = _readme().split("## Quickstart", 1)[1].split("```")[1].strip()
    commands = [c.strip() for c in block.split("&&")]
    assert "\n" not in block and commands[0] == "pip install -r requirements.txt"  # one line; CI installed already
    for name in os.listdir(REPO):
        if name.endswith(".py"):
            shutil.copy(os.path.join(REPO, name), tmp_path)
    env = {**os.environ, "TORCH_HOME": str(tmp_path / "hub")}  # no Inception weights, as on a fresh machine
    times = []
    logs = "".join(_run_line(commands[1:], tmp_path, env, times))
    out = tmp_path / "out" / "tiny"
    grids = sorted(out.glob("grid_*.png"))
    for png in (grids[-1], out / "samples.png", *sorted((out / "dit").glob("samples_*.png"))):
        with Image.open(png) as image:
            image.verify()  # a complete, valid PNG
    assert Image.open(out / "samples.png").size == (8 * 32 + 9 * 2,) * 2  # 8 x 8 images of 32 px, 2 px apart
    with np.load(out / "samples.npz") as samples:
        images, labels = samples["arr_0"], samples["labels"]
    assert images.shape == (64, 32, 32, 3) and images.dtype == np.uint8
    order = sample.sample_order(0, 64)  # the .npz is shuffled (the IS depends on the order); arr_0[order]: by index
    images, labels = images[order], labels[order]
    assert labels.tolist() == np.repeat(np.arange(8), 8).tolist()  # row k of the grid: 8 samples of class k
    metrics_line = [line for line in logs.splitlines() if line.startswith("eval: psnr")][-1]
    metrics = {k: float(v) for k, v in (part.split() for part in metrics_line.removeprefix("eval: ").split(" | "))}
    saved = json.loads((out / "eval.json").read_text())
    assert {k: saved[k] for k in metrics} == pytest.approx(metrics, abs=1e-4)  # the line and eval.json agree
    assert "rFID skipped" in logs and "--fid_weights" in logs  # says how to get the Inception weights, with its flag
    judge, held_out = _colour_classifier()
    with torch.no_grad():
        predicted = judge(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255).argmax(1).numpy()
    accuracy = float((predicted == labels).mean())
    first = sum(t for _, t in times)
    rerun = "".join(_run_line(commands[1:], tmp_path, env, times))  # the line again, over the first run's outputs
    with np.load(out / "samples.npz") as again:
        assert again["arr_0"].shape == images.shape and "--overwrite" in block and "already exists" not in rerun
    with capsys.disabled():
        print(f"\nquickstart: {first:.0f} s | " + " | ".join(f"{c.removeprefix('python ')} {t:.0f} s"
                                                           for c, t in times[:len(commands) - 1]) +
              f"\nquickstart: held-out PSNR {metrics['psnr']:.2f} dB, SSIM {metrics['ssim']:.3f}, GSQ "
              f"{metrics['gsq']:.3f} | class accuracy of the 64 samples {accuracy:.1%} (judge: {held_out:.1%} on "
              f"held-out training-style images) | rerun {sum(t for _, t in times[len(commands) - 1:]):.0f} s")
    assert held_out > 0.95  # the judge itself knows the classes
    assert metrics["psnr"] > 20 and metrics["ssim"] > 0.4  # measured 22.87 dB and 0.594 (2 cores, 2026-12-03)
    assert accuracy >= 0.8, predicted.reshape(8, 8)  # measured 98.4%


def test_readme_flags_exist_in_their_scripts():
    """Each --flag after `X.py` on a command line, or in X.py's own section, must be a field of X's Config."""
    fields = {script: {f.name for f in dataclasses.fields(cfg)} for script, cfg in SCRIPTS.items()}
    section, checked = None, 0
    for line in _readme().splitlines():
        if line.startswith("## "):
            section = line[3:].strip() if line[3:].strip() in SCRIPTS else None
        for segment in line.split("&&"):
            named = [(segment.index(s), s) for s in SCRIPTS if s in segment]
            script = min(named)[1] if named else section
            text = segment[min(named)[0]:] if named else segment
            for flag in re.findall(r"(?<![\w-])--([a-z_0-9]+)", text):
                allowed = fields[script] if script else set().union(*fields.values())
                assert flag in allowed | TORCHRUN_FLAGS, f"README mentions --{flag} for {script or 'a script'}: {line}"
                checked += 1
    assert checked > 40  # the README really was read


# -----------------------------------------------------------------------------
# nothing lost: the non-finite guard, refused overwrites, validated flags, safe loads


def _bytes(*paths):
    return {str(p): open(p, "rb").read() for p in paths}


def test_nan_in_the_latent_cache_stops_train_dit_and_keeps_the_checkpoint(tmp_path):
    cache = _write_cache(tmp_path / "latents")
    train_dit.main(_dit_args(tmp_path, cache, max_steps=3, ckpt_every=3))
    ckpt = tmp_path / "run" / "ckpt.pt"
    before = _bytes(ckpt)
    latents = np.load(cache / "latents.npy", mmap_mode="r+")
    latents[5] = np.nan  # one image (and its flip): drawn once per epoch of 2 steps
    latents.flush()
    with pytest.raises(SystemExit, match=r"non-finite loss = nan.*latent cache.*step 3 is kept as it was") as stop:
        train_dit.main(_dit_args(tmp_path, cache, max_steps=9, ckpt_every=1, resume=True))
    assert stop.value.code == model.EXIT_NONFINITE == 3  # its own status: a scheduler must not requeue it
    assert _bytes(ckpt) == before and not os.path.exists(f"{ckpt}.tmp")
    with pytest.raises(SystemExit, match=r"stopped by the non-finite guard \(dit step 4: loss = nan") as again:
        train_dit.main(_dit_args(tmp_path, cache, max_steps=9, resume="auto"))  # an elastic restart stops at once
    assert again.value.code == 3 and _bytes(ckpt) == before
    assert load_checkpoint(str(ckpt), "dit")["step"] == 3
    meta = json.load(open(cache / "meta.json"))
    meta["std"][1] = 0.0
    json.dump(meta, open(cache / "meta.json", "w"))
    with pytest.raises(SystemExit, match="std is 0.0"):
        train_dit.main(_dit_args(tmp_path, cache, name="zero"))
    assert not (tmp_path / "zero").exists()


def test_sample_py_refuses_a_nan_dit_instead_of_writing_black_images(tmp_path):
    dit_path, _ = _pipeline(tmp_path)
    ckpt = torch.load(dit_path, weights_only=True)
    ckpt["ema"]["final_linear.bias"][0] = float("nan")
    torch.save(ckpt, dit_path)
    with pytest.raises(SystemExit, match="shard 0 are NaN or inf"):
        sample.main(_args(tmp_path, dit_path))
    assert not (tmp_path / "samples.npz").exists()


def test_encode_refuses_to_complete_a_cache_from_a_nan_tokenizer(tmp_path):
    torch.manual_seed(0)
    pae = build_pae(preset="tiny")
    with torch.no_grad():
        pae.projector.conv.bias[3] = float("nan")
    save_checkpoint(str(tmp_path / "ae.pt"), "pae", pae, {"preset": "tiny"}, 0, pae_args=pae.pae_args)
    with pytest.raises(SystemExit, match="NaN or inf.*NaN weight in .*ae.pt.*incomplete"):
        train_ae.main([*FAST, "--stage", "encode", "--out_dir", str(tmp_path), "--synthetic_size", "8"])
    assert not (tmp_path / "latents" / "meta.json").exists()


def test_nan_weight_stops_the_tokenizer_before_any_checkpoint(tmp_path):
    train_ae.main([*FAST, "--stage", "refine", "--refine_steps", "1", "--out_dir", str(tmp_path / "r")])
    ckpt = torch.load(tmp_path / "r" / "refine.pt", weights_only=True)
    ckpt["model"]["target_out.bias"][0] = float("nan")  # P_t: the SSR/SCR targets become NaN
    torch.save(ckpt, tmp_path / "r" / "refine.pt")
    with pytest.raises(SystemExit, match="non-finite .*scr = nan.*no checkpoint was written"):
        train_ae.main([*FAST, "--stage", "ae", "--max_steps", "4", "--log_every", "2", "--refine_ckpt",
                       str(tmp_path / "r" / "refine.pt"), "--out_dir", str(tmp_path / "a")])
    assert not any((tmp_path / "a" / name).exists() for name in ("ckpt_ae.pt", "ae.pt"))


def test_finished_results_are_never_replaced_without_a_flag(tmp_path):
    out = tmp_path / "ae"
    train_ae.main([*FAST, "--stage", "refine", "--refine_steps", "1", "--out_dir", str(out)])
    os.remove(out / "ckpt_refine.pt")  # only the finished refine.pt is left
    before = _bytes(out / "refine.pt")
    with pytest.raises(SystemExit, match="refine.pt already exists; pass --resume.*--overwrite"):
        train_ae.main([*FAST, "--stage", "refine", "--refine_steps", "1", "--out_dir", str(out)])
    assert _bytes(out / "refine.pt") == before
    train_ae.main([*FAST, "--stage", "refine", "--refine_steps", "2", "--out_dir", str(out), "--overwrite"])
    assert load_checkpoint(str(out / "refine.pt"), "refine")["step"] == 2
    cache = _write_cache(tmp_path / "latents")  # a DiT run pointed at the tokenizer's folder
    config = _bytes(out / "config.json")
    with pytest.raises(SystemExit, match="holds a run of train_ae.py"):
        train_dit.main(_dit_args(tmp_path, cache, out_dir=str(out)))
    assert _bytes(out / "config.json") == config and not (out / "ckpt.pt").exists()


def test_sample_and_fid_outputs_are_protected(tmp_path):
    dit_path, _ = _pipeline(tmp_path)
    sample.main(_args(tmp_path, dit_path))
    npz, png = tmp_path / "samples.npz", tmp_path / "samples.png"
    before = _bytes(npz, png, dit_path)
    with pytest.raises(SystemExit, match="samples.npz already exists; pass --overwrite"):
        sample.main(_args(tmp_path, dit_path))
    with pytest.raises(SystemExit, match="also an input of this command"):
        sample.main(_args(tmp_path, dit_path, out=dit_path))
    with pytest.raises(SystemExit, match="also an input"):
        _fid_main([str(npz), "--save_stats", str(npz), "--weights", "random"])
    assert _bytes(npz, png, dit_path) == before
    sample.main(_args(tmp_path, dit_path, overwrite=True, seed=1))
    assert _bytes(npz) != {str(npz): before[str(npz)]}


def _fid_main(argv):
    saved = sys.argv
    sys.argv = ["fid.py", *argv]
    try:
        fid.main()
    finally:
        sys.argv = saved


def test_sample_refuses_an_ae_changed_since_the_encode(tmp_path):
    dit_path, pae = _pipeline(tmp_path)
    ckpt = torch.load(dit_path, weights_only=True)
    ae_path = ckpt["latent_meta"]["ae_ckpt"]
    ckpt["latent_meta"]["ae_sha256"] = model.file_digest(ae_path)  # as a cache written by encode records it
    torch.save(ckpt, dit_path)
    with torch.no_grad():
        pae.decoder.head.bias.add_(0.5)  # a retrained tokenizer in the same place (--resume --max_steps ...)
    save_checkpoint(ae_path, "pae", pae, {"preset": "tiny"}, 0, pae_args=pae.pae_args)
    with pytest.raises(SystemExit, match="changed since the latents were encoded.*--ae_ckpt"):
        sample.main(_args(tmp_path, dit_path))
    sample.main(_args(tmp_path, dit_path, ae_ckpt=ae_path))  # named explicitly: decoded, with a warning
    assert (tmp_path / "samples.npz").is_file()


def test_encode_overwrite_swaps_the_new_cache_in_only_when_complete(tmp_path, monkeypatch):
    torch.manual_seed(0)
    pae = build_pae(preset="tiny")
    save_checkpoint(str(tmp_path / "ae.pt"), "pae", pae, {"preset": "tiny"}, 0, pae_args=pae.pae_args)
    args = [*FAST, "--stage", "encode", "--out_dir", str(tmp_path), "--synthetic_size", "8"]
    train_ae.main(args)
    old = _bytes(*(tmp_path / "latents" / name for name in ("latents.npy", "labels.npy", "meta.json")))
    monkeypatch.setattr(train_ae.M, "atomic_write", lambda path, fn: 1 / 0)  # a crash writing meta.json
    with pytest.raises(ZeroDivisionError):
        train_ae.main(args + ["--overwrite", "--synthetic_size", "16"])
    assert _bytes(*old) == old  # the complete old cache is untouched
    monkeypatch.undo()
    train_ae.main(args + ["--overwrite", "--synthetic_size", "16"])
    assert np.load(tmp_path / "latents" / "labels.npy").shape == (16,)
    assert not (tmp_path / "latents.new").exists() and not (tmp_path / "latents.old").exists()


def test_labels_outside_the_classes_are_refused_when_the_cache_opens(tmp_path):
    for label in (3, 7):  # 3 = the class count = the null class; 7 would index past the label table
        cache = _write_cache(tmp_path / f"latents{label}")
        labels = np.load(cache / "labels.npy")
        labels[2] = label
        np.save(cache / "labels.npy", labels)
        with pytest.raises(SystemExit, match=f"labels from 0 to {label}, outside the 3 classes"):
            train_dit.main(_dit_args(tmp_path, cache, name=f"l{label}"))


def test_bad_meta_json_is_one_sentence(tmp_path):
    cache = _write_cache(tmp_path / "latents")
    good = json.load(open(cache / "meta.json"))
    for text, message in (("{not json", "cannot be read as JSON"),
                          (json.dumps({k: v for k, v in good.items() if k != "std"}), "lacks std"),
                          (json.dumps({**good, "mean": good["mean"][:2]}), "must list 4 numbers"),
                          (json.dumps({**good, "mean": [float("nan")] * 4}), "not a finite number")):
        (cache / "meta.json").write_text(text)
        with pytest.raises(SystemExit, match=message):
            train_dit.LatentCache(str(cache))


@pytest.mark.parametrize("script, argv, message", [
    ("sample", ["--batch_size", "0"], "--batch_size must be greater than 0"),
    ("sample", ["--per_label", "0"], "--per_label must be greater than 0"),
    ("sample", ["--cfg_scale", "nan"], "--cfg_scale nan is not a finite number"),
    ("fid", ["--batch_size", "-5"], "--batch_size must be greater than 0"),
    ("train_ae", ["--batch_size", "-2"], "--batch_size must be greater than 0"),
    ("train_ae", ["--micro_batch_size", "-4"], "--micro_batch_size must be 0 or more"),
    ("train_ae", ["--vfm", "dinov4"], "unknown --vfm 'dinov4'; valid values: 'dinov2'"),
    ("train_ae", ["--decoder", "B"], "--preset tiny builds its own tiny VFM and decoder"),
    ("train_dit", ["--ckpt_every", "0"], "--ckpt_every must be greater than 0"),
    ("train_dit", ["--max_steps", "-5"], "--max_steps must be greater than 0"),
    ("train_dit", ["--batch_size", "0"], "--batch_size must be greater than 0"),
])
def test_every_bad_flag_is_one_sentence_and_writes_nothing(tmp_path, monkeypatch, script, argv, message):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match=re.escape(message)) as e:
        if script == "fid":
            _fid_main(["samples.npz", *argv])
        else:
            sys.modules[script].main(["--preset", "tiny", *argv])
    assert str(e.value).startswith("error: ") and "\n" not in str(e.value)
    assert os.listdir(tmp_path) == []


def test_a_bad_flag_from_the_shell_is_one_line_on_stderr(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(REPO, "train_dit.py"), "--preset", "tiny", "--max_steps", "-5"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == ["error: --max_steps must be greater than 0, got -5"]
    assert os.listdir(tmp_path) == []


def test_fid_checks_its_inputs_before_the_inception_pass(tmp_path, monkeypatch):
    images = np.random.default_rng(0).integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
    np.savez(tmp_path / "s.npz", arr_0=images)
    np.save(tmp_path / "s.npy", images)
    np.savez(tmp_path / "ref.npz", mu=np.zeros(10), sigma=np.eye(10))
    monkeypatch.setattr(fid, "load_inception", lambda *a, **k: 1 / 0)  # reaching the network would fail loudly
    for argv, message in (([str(tmp_path / "s.npy")], "is not an .npz"),
                          ([str(tmp_path / "s.npz"), "--ref", str(tmp_path / "s.npy")], "--ref .* is not an .npz"),
                          ([str(tmp_path / "s.npz"), "--ref", str(tmp_path / "ref.npz")], "other dimensions"),
                          ([str(tmp_path / "s.npz"), "--save_stats", str(tmp_path / "s.npz" / "x.npz")],
                           "is not a writable folder")):
        with pytest.raises(SystemExit, match=message):
            _fid_main(argv)


def test_fid_of_a_set_with_itself_is_zero_not_negative():
    feats = np.random.default_rng(0).standard_normal((100, 2048)) * 3  # fewer samples than dimensions
    mu, sigma = feats.mean(0), np.cov(feats, rowvar=False)
    assert fid.frechet_distance(mu, sigma, mu, sigma) == 0.0  # the eigenvalue route alone gives about -0.002


def test_a_second_run_on_the_same_folder_is_refused(tmp_path):
    cache = _write_cache(tmp_path / "latents")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / ".lock").write_text(f"{os.getppid()}@{socket.gethostname()}")  # a live process owns it
    with pytest.raises(SystemExit, match="is in use by another run"):
        train_dit.main(_dit_args(tmp_path, cache))
    assert os.listdir(tmp_path / "run") == [".lock"]
    (tmp_path / "run" / ".lock").write_text(f"999999999@{socket.gethostname()}")  # its process is gone: taken over
    train_dit.main(_dit_args(tmp_path, cache, max_steps=2))
    assert (tmp_path / "run" / "ckpt.pt").is_file()


def test_disk_full_during_a_checkpoint_keeps_the_old_file_and_no_tmp(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(str(path), "dit", torch.nn.Linear(2, 2), {}, 1)
    before = _bytes(path)

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(SystemExit, match="could not write .*ckpt.pt \\(No space left on device; is the disk full"):
        save_checkpoint(str(path), "dit", torch.nn.Linear(2, 2), {}, 2)
    assert _bytes(path) == before and os.listdir(tmp_path) == ["ckpt.pt"]


def test_a_pickle_in_the_hub_cache_is_refused_without_running(tmp_path, monkeypatch):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save({"lin0.model.1.weight": Payload()}, tmp_path / "hub" / "checkpoints" / "vgg.pth")
    lin_file = lambda path: losses._load_weights(path, losses.LPIPS_LIN_URL, losses.LPIPS_LIN_SHA256,  # noqa: E731
                                                 "--lpips_lin_weights", "LPIPS v0.1 linear layers")
    with pytest.raises(SystemExit, match="not the published LPIPS v0.1 linear layers file"):
        lin_file(None)
    with pytest.raises(SystemExit, match="refused"):  # the same file passed by path: weights-only, still refused
        losses.LPIPS(pretrained=False, lin_weights=str(tmp_path / "hub" / "checkpoints" / "vgg.pth"))
    assert not marker.exists()
    shutil.copy(LPIPS_LIN, tmp_path / "hub" / "checkpoints" / "vgg.pth")  # the published file passes the hash
    assert {f"lin{i}.model.1.weight" for i in range(5)} <= set(lin_file(None))


# -----------------------------------------------------------------------------
# the first hour: --help from the code, the CPU guard


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_help_shows_each_fields_comment_and_the_valid_values(script, capsys):
    cls = SCRIPTS[script]
    with pytest.raises(SystemExit) as e:
        model.parse_config(cls, ["--help"], getattr(sys.modules[cls.__module__], "PRESETS", None))
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    comments = model._field_comments(cls)
    assert set(comments) == {f.name for f in dataclasses.fields(cls)}  # every field carries its comment
    for name, comment in comments.items():
        assert f"--{name}" in text and " ".join(comment.split()) in text, name
    for name, valid in getattr(cls, "CHOICES", {}).items():
        assert f"[one of: {', '.join(repr(v) for v in valid)}]" in text, name


def test_a_paper_size_run_without_a_gpu_stops_before_it_allocates(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU, so the guard lets the run through")
    cache = _write_cache(tmp_path / "latents")
    with pytest.raises(SystemExit, match="no GPU found, and LightningDiT-XL/1 at batch 1024 .* --preset tiny"):
        train_dit.main(["--latents", str(cache), "--out_dir", str(tmp_path / "run")])
    with pytest.raises(SystemExit, match="no GPU found, and the paper-size tokenizer"):
        train_ae.main(["--out_dir", str(tmp_path / "ae")])
    assert sorted(os.listdir(tmp_path)) == ["latents"]
    model.gpu_guard("cpu", "LightningDiT-XL/1")  # --device cpu: asked for explicitly, let through


# -----------------------------------------------------------------------------
# throughput: every --bench runs at a tiny size (its figures are printed, not asserted)


def test_every_bench_runs_on_cpu_at_a_tiny_size(capsys):
    train_dit.main(["--bench", "--preset", "tiny", "--bench_steps", "2"])
    train_ae.main(["--bench", "--preset", "tiny", "--bench_steps", "1", "--micro_batch_size", "2"])
    sample.main(["--bench", "--preset", "tiny", "--batch_size", "4", "--num_steps", "6"])
    _fid_main(["--bench", "--batch_size", "2"])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("bench ")]
    for what in ("train_dit tiny/1", "train_ae refine", "train_ae ae",
                 "train_ae encode", "sample tiny/1 + decoder", "fid.py Inception"):
        assert any(line.startswith(f"bench {what}") for line in lines), what
    assert all(" img/s" in line or " sample/s" in line or "ms/step" in line for line in lines)
    assert any("50,000 samples on 8 such devices" in line for line in lines)


def test_train_dit_sample_grids_refuse_an_ae_changed_since_the_encode(tmp_path):
    torch.manual_seed(0)
    pae = build_pae(preset="tiny")
    ae_path = str(tmp_path / "ae.pt")
    save_checkpoint(ae_path, "pae", pae, {"preset": "tiny"}, 0, pae_args=pae.pae_args)
    cache = _write_cache(tmp_path / "latents", channels=32, size=8)
    meta = json.load(open(cache / "meta.json"))
    json.dump({**meta, "ae_ckpt": ae_path, "ae_sha256": model.file_digest(ae_path)}, open(cache / "meta.json", "w"))
    with torch.no_grad():
        pae.decoder.head.bias.add_(0.5)
    save_checkpoint(ae_path, "pae", pae, {"preset": "tiny"}, 1, pae_args=pae.pae_args)  # retrained in place
    with pytest.raises(SystemExit, match="changed since the latents were encoded.*--ae_ckpt"):
        train_dit.main(_dit_args(tmp_path, cache, max_steps=2, sample_every=2))
    train_dit.main(_dit_args(tmp_path, cache, name="named", max_steps=2, sample_every=2, ae_ckpt=ae_path))
    assert (tmp_path / "named" / "samples_0000002.png").is_file()
    assert "not the AE the cache was encoded with" in _log(tmp_path / "named")


# -----------------------------------------------------------------------------
# reproducing the paper's tables: EMA snapshots, sweeps, the shuffled .npz, one uint8 convention; fid.py's inputs


def _snapshots(tmp_path, dit_path):
    """Two EMA snapshots (kind dit, no raw weights, images_seen) in tmp_path/snapshots, as train_dit.py writes them."""
    ckpt = torch.load(dit_path, weights_only=True)
    args, folder = ckpt["model_args"], tmp_path / "snapshots"
    folder.mkdir()
    for step, seed in ((20, 2), (40, 3)):  # batch 4 and 8 cached latents: epochs 10 and 20
        ema = _random_dit(3, args["in_channels"], args["input_size"], seed)
        torch.save({**ckpt, "model": None, "ema": ema.state_dict(), "step": step, "images_seen": 4 * step,
                    "config": {**ckpt["config"], "batch_size": 4}}, folder / f"{step:07d}.pt")
    return folder


def _sweep_args(root, out, **extra):
    reference = {"ckpt": str(root / "snapshots"), "num_samples": 6, "batch_size": 3, "num_steps": "5,10",
                 "fid_ref": str(root / "ref.npz"), "fid_weights": "random", **extra}
    return _args(root, "", name=out, **reference)


def _records(folder):
    with open(folder / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def _without_seconds(records):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in records]


@pytest.fixture(scope="module")
def sweep_run(tmp_path_factory):
    """One uninterrupted sweep (2 snapshots x --num_steps 5,10, samples kept) that the tests compare against."""
    torch.set_num_threads(1)  # as the tests that compare with it: the Inception's float sums depend on threads
    root = tmp_path_factory.mktemp("sweep")
    dit_path, _ = _pipeline(root)
    _snapshots(root, dit_path)
    np.savez(root / "ref.npz", arr_0=np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8))
    sample.main(_sweep_args(root, "sweep", keep_samples="true"))
    return root


# -----------------------------------------------------------------------------
# sample.py: the .npz is shuffled with the seed; the Inception Score depends on the order


def test_npz_is_shuffled_by_the_seed_and_the_grid_keeps_index_order(tmp_path):
    dit_path, _ = _pipeline(tmp_path)
    sample.main(_args(tmp_path, dit_path, name="one", batch_size=12))
    sample.main(_args(tmp_path, dit_path, name="shards"))  # batch 5: three shards placed one by one
    order = sample.sample_order(0, 12)
    assert sorted(order) == list(range(12)) and not np.array_equal(order, np.arange(12))
    assert np.array_equal(order, sample.sample_order(0, 12)) and not np.array_equal(order, sample.sample_order(1, 12))
    with np.load(tmp_path / "one.npz") as one, np.load(tmp_path / "shards.npz") as shards:
        assert np.array_equal(one["labels"][order], np.arange(12) % 3)  # arr_0[order] is index order
        assert np.array_equal(one["labels"], shards["labels"])  # the same places for any batching ...
        assert np.abs(one["arr_0"].astype(int) - shards["arr_0"]).max() <= 1  # ... (batched matmuls: 1 level)
        by_index = one["arr_0"][order]
    grid = np.asarray(Image.open(tmp_path / "one.png"))  # 8 columns with 2 px padding: sample 1 is the second cell
    size = by_index.shape[1]
    assert np.array_equal(grid[2:2 + size, 2:2 + size], by_index[0])
    assert np.array_equal(grid[2:2 + size, 4 + size:4 + 2 * size], by_index[1])


def test_inception_score_of_class_sorted_samples_is_inflated():
    """ADM's IS averages consecutive splits: sorted i % K, each split holds every class equally often."""
    n, classes = 10_000, 100
    logits = np.zeros((n, 1008))
    logits[np.arange(n), np.arange(n) % classes] = 20.0  # confident one-hot-ish predictions, balanced classes
    shuffled = logits[np.random.default_rng(1).permutation(n)]
    sorted_is, shuffled_is = fid.inception_score(logits), fid.inception_score(shuffled)
    assert sorted_is == pytest.approx(classes, rel=1e-4)  # every split holds each class 50 times: IS = K
    assert sorted_is > shuffled_is * 1.005  # shuffled, a split's class counts vary: p(y) is less uniform (99.3)
    assert fid.inception_score(logits, split_size=n) == pytest.approx(fid.inception_score(shuffled, split_size=n))


# -----------------------------------------------------------------------------
# one uint8 convention


def test_to_uint8_is_a_tensor_on_the_input_device():
    images = torch.tensor([0.4, 0.6, 254.4, 254.6, 300.0, -9.0]).div(255).view(1, 1, 1, 6).expand(1, 3, 1, 6)
    out = fid.to_uint8(images)
    assert out.dtype == torch.uint8 and out.shape == (1, 1, 6, 3) and out.device == images.device
    assert out[0, 0, :, 0].tolist() == [0, 0, 254, 254, 255, 0]  # the default: truncation, as released
    assert fid.to_uint8(images, "round")[0, 0, :, 0].tolist() == [0, 1, 254, 255, 255, 0]
    assert fid.TO_UINT8 == ("truncate", "round") == sample.Config.CHOICES["to_uint8"]


# -----------------------------------------------------------------------------
# sample.py sweeps


def test_settings_multiply_lists_and_keep_the_single_setting_api():
    cfg = sample.parse_config(sample.Config, ["--num_steps", "10,15", "--cfg_scale", "1,2.5"], sample.PRESETS)
    rows = sample.settings(cfg)
    assert [(r.num_steps, r.cfg_scale) for r in rows] == [(10, 1.0), (10, 2.5), (15, 1.0), (15, 2.5)]
    assert sample.settings(rows[1]) == [rows[1]]  # a row gives itself
    default = sample.parse_config(sample.Config, [], sample.PRESETS)  # what train_dit.py's grids pass
    (row,) = sample.settings(default)
    assert (row.sampler, row.num_steps, row.cfg_scale, row.cfg_interval_start) == ("ode", 250, 2.5, 0.25)
    (row,) = sample.settings(sample.parse_config(sample.Config, ["--preset", "800ep"], sample.PRESETS))
    assert (row.cfg_scale, row.cfg_interval_start) == (3.3, 0.3)
    net, x = _random_dit(), torch.randn(2, 4, 2, 2)
    with torch.no_grad():
        latent = sample.sample_latents(net, [0, 1], [0, 1], (4, 2, 2), sample.parse_config(
            sample.Config, ["--num_steps", "3"], sample.PRESETS), 3, torch.device("cpu"))
    assert latent.shape == x.shape and torch.isfinite(latent).all()
    for argv, message in ((["--num_steps", "5,x"], "--num_steps '5,x' must be one int"),
                          (["--num_steps", "10,1"], "--num_steps 1 is too small"),
                          (["--cfg_scale", "2,nan"], "--cfg_scale nan is not a finite number"),
                          (["--cfg_interval_start", "0.3,2"], "--cfg_interval_start 2.0 must lie between 0 and 1"),
                          (["--sampler", "ode,heun"], "--sampler heun is unknown; valid values: ode, sde")):
        with pytest.raises(SystemExit, match=message):
            sample.settings(sample.parse_config(sample.Config, argv, sample.PRESETS))


def test_sweep_rows_equal_single_runs_scored_in_process(sweep_run, tmp_path, capsys):  # slow: 4 FIDs at 2048-d
    root = sweep_run
    records = _records(root / "sweep")
    assert [(os.path.basename(r["ckpt"]), r["step"], r["epoch"], r["num_steps"], r["n"]) for r in records] == [
        ("0000020.pt", 20, 10.0, 5, 6), ("0000020.pt", 20, 10.0, 10, 6),
        ("0000040.pt", 40, 20.0, 5, 6), ("0000040.pt", 40, 20.0, 10, 6)]
    keys = {"ckpt", "step", "epoch", "sampler", "num_steps", "cfg_scale", "cfg_interval_start", "n", "fid", "sfid",
            "is", "precision", "recall", "seconds"}
    assert all(set(r) == keys and (r["sampler"], r["cfg_scale"], r["cfg_interval_start"]) == ("ode", 2.5, 0.25)
               for r in records)
    table = (root / "sweep" / "metrics.md").read_text().splitlines()
    assert len(table) == 6 and table[0].startswith("| ckpt | step | epoch |") and "| 0000040.pt | 40 | 20 |" in table[5]
    assert not any(p.endswith("_shards") for p in os.listdir(root / "sweep"))
    capsys.readouterr()
    for i, record in list(enumerate(records))[1:3]:  # a row = a single run of that checkpoint and setting
        sample.main(_args(tmp_path, record["ckpt"], name=f"single{i}", num_samples=6, batch_size=3,
                          num_steps=record["num_steps"], fid_ref=root / "ref.npz", fid_weights="random"))
        metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])  # fid.py's JSON line comes last
        for key in ("fid", "sfid", "is", "precision", "recall", "n"):
            assert metrics[key] == pytest.approx(record[key], rel=1e-9, abs=1e-12), (i, key)
        kept = f"{record['step']:07d}_step{record['step']}_ode{record['num_steps']}_cfg2.5_from0.25.npz"
        assert (root / "sweep" / kept).read_bytes() == (tmp_path / f"single{i}.npz").read_bytes()


def test_killed_sweep_resumes_where_it_stopped(sweep_run, monkeypatch):  # slow: 4 FIDs at 2048-d
    root, calls = sweep_run, []
    real_sample, real_score = sample.sample_latents, fid.compute_metrics

    def counted(*args, **kwargs):  # dies at the 4th batch: row 1 is recorded, row 2 has 1 of its 2 shards
        calls.append(1)
        if len(calls) == 4 and dying:
            raise RuntimeError("killed while sampling")
        return real_sample(*args, **kwargs)

    monkeypatch.setattr(sample, "sample_latents", counted)
    dying = True
    with pytest.raises(RuntimeError, match="killed while sampling"):
        sample.main(_sweep_args(root, "resumed"))
    out = root / "resumed"
    assert len(_records(out)) == 1 and os.listdir(out / "0000020_step20_ode10_cfg2.5_from0.25_shards") != []
    calls.clear()
    dying = False
    scores = []

    def killed_scoring(*args, **kwargs):  # the second row scored in this run (row 3) dies after its merge
        scores.append(1)
        if len(scores) == 2:
            raise RuntimeError("killed while scoring")
        return real_score(*args, **kwargs)

    monkeypatch.setattr(fid, "compute_metrics", killed_scoring)
    with pytest.raises(RuntimeError, match="killed while scoring"):
        sample.main(_sweep_args(root, "resumed"))
    assert len(calls) == 1 + 2 and len(_records(out)) == 2  # row 2: only its unfinished shard; row 3: both
    assert (out / "0000040_step40_ode5_cfg2.5_from0.25.npz").is_file()  # merged, not yet scored
    calls.clear()
    monkeypatch.setattr(fid, "compute_metrics", real_score)
    sample.main(_sweep_args(root, "resumed"))
    assert len(calls) == 2  # row 3's merged .npz is scored as it is; row 4 is sampled
    assert _without_seconds(_records(out)) == _without_seconds(_records(root / "sweep"))
    assert (out / "metrics.md").read_text() == (root / "sweep" / "metrics.md").read_text()
    grids = [f"{s:07d}_step{s}_ode{n}_cfg2.5_from0.25.png" for s in (20, 40) for n in (5, 10)]
    assert sorted(os.listdir(out)) == sorted(["metrics.jsonl", "metrics.md", "sweep.json", *grids])  # no .npz, shards


def test_sweep_without_reference_or_with_other_settings_is_refused(tmp_path, monkeypatch):
    dit_path, _ = _pipeline(tmp_path)
    _snapshots(tmp_path, dit_path)
    np.savez(tmp_path / "ref.npz", arr_0=np.zeros((4, 32, 32, 3), np.uint8))
    before = sorted(os.listdir(tmp_path))
    for extra in (dict(fid_ref=""), dict(fid_ref="", ckpt=dit_path)):  # a folder of snapshots, or a list
        with pytest.raises(SystemExit, match=r"a sweep \(.*\) scores each row: pass --fid_ref"):
            sample.main(_sweep_args(tmp_path, "sweep", **extra))
    assert sorted(os.listdir(tmp_path)) == before
    monkeypatch.setattr(sample, "sweep", lambda *args: 1 / 0)  # killed as soon as the folder is claimed
    with pytest.raises(ZeroDivisionError):
        sample.main(_sweep_args(tmp_path, "sweep"))
    definition = (tmp_path / "sweep" / "sweep.json").read_bytes()
    listing = sorted(os.listdir(tmp_path / "sweep"))
    for extra in (dict(seed=1), dict(num_steps="5,25"), dict(fid_ref=tmp_path / "ref2.npz")):
        if "fid_ref" in extra:
            np.savez(extra["fid_ref"], arr_0=np.zeros((4, 32, 32, 3), np.uint8))
        with pytest.raises(SystemExit, match="sweep holds a run with other settings .*sweep.json"):
            sample.main(_sweep_args(tmp_path, "sweep", **extra))
        assert (tmp_path / "sweep" / "sweep.json").read_bytes() == definition
        assert sorted(os.listdir(tmp_path / "sweep")) == listing
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="is a folder without .pt checkpoints"):
        sample.main(_sweep_args(tmp_path, "other", ckpt=tmp_path / "empty"))


def test_single_run_checks_its_reference_before_sampling(tmp_path, monkeypatch):
    dit_path, _ = _pipeline(tmp_path)
    monkeypatch.setattr(sample, "sample_latents", lambda *args: 1 / 0)  # drawing a sample would fail loudly
    np.savez(tmp_path / "half.npz", mu=np.zeros(2048))
    for ref, message in ((tmp_path / "missing.npz", "--fid_ref .*missing.npz does not exist"),
                         (tmp_path / "half.npz", "--fid_ref .*half.npz holds mu but no sigma")):
        with pytest.raises(SystemExit, match=message):
            sample.main(_args(tmp_path, dit_path, fid_ref=ref, fid_weights="random"))
    assert sorted(os.listdir(tmp_path)) == ["ae.pt", "dit.pt", "half.npz", "latents"]  # no shards, no .npz


# -----------------------------------------------------------------------------
# fid.py's inputs


def test_incomplete_statistics_are_one_sentence_and_images_win_over_a_bare_pool(tmp_path, monkeypatch):
    net = fid.load_inception("random")
    images = np.random.default_rng(0).integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
    cases = {"mu_only": (dict(mu=np.zeros(2048)), "holds mu but no sigma"),
             "sigma_s_only": (dict(mu=np.zeros(2048), sigma=np.eye(2048), sigma_s=np.eye(2023)),
                              "holds sigma_s but no mu_s"),
             "pool_only": (dict(pool=np.zeros((4, 2048), np.float32)), "no arr_0 .* and no mu/sigma statistics")}
    for name, (arrays, message) in cases.items():
        np.savez(tmp_path / f"{name}.npz", **arrays)
        with pytest.raises(SystemExit, match=message):
            fid.check_source(str(tmp_path / f"{name}.npz"), "--ref")
        with pytest.raises(SystemExit, match=message):
            fid.statistics(str(tmp_path / f"{name}.npz"), net)
    np.savez(tmp_path / "pool_and_images.npz", arr_0=images, pool=np.zeros((4, 2048), np.float32))
    fid.check_source(str(tmp_path / "pool_and_images.npz"), "SAMPLES")
    stats = fid.statistics(str(tmp_path / "pool_and_images.npz"), net, batch_size=4)
    assert np.allclose(stats["mu"], fid.statistics(images, net, batch_size=4)["mu"])  # its images were used
    monkeypatch.setattr(fid, "load_inception", lambda *a, **k: 1 / 0)  # reaching the network would fail loudly
    with pytest.raises(SystemExit, match="holds mu but no sigma"):
        _fid_main([str(tmp_path / "pool_and_images.npz"), "--ref", str(tmp_path / "mu_only.npz")])


def test_save_stats_needs_npz_and_makes_its_folders(tmp_path, monkeypatch, capsys):
    np.savez(tmp_path / "s.npz", arr_0=np.random.default_rng(0).integers(0, 256, (4, 16, 16, 3), dtype=np.uint8))
    with monkeypatch.context() as patch:
        patch.setattr(fid, "load_inception", lambda *a, **k: 1 / 0)
        with pytest.raises(SystemExit, match="--save_stats .*stats must end in .npz"):
            _fid_main([str(tmp_path / "s.npz"), "--save_stats", str(tmp_path / "stats")])
    _fid_main([str(tmp_path / "s.npz"), "--save_stats", str(tmp_path / "new" / "dir" / "s.npz"), "--weights",
               "random"])
    assert sorted(np.load(tmp_path / "new" / "dir" / "s.npz").files) == ["mu", "mu_s", "pool", "sigma", "sigma_s"]
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["n"] == 4


def _png16(path, pixels):
    """A 16-bit PNG written by hand (PIL writes 16-bit grey only): uint16 (H, W) grey or (H, W, 3) RGB."""
    pixels = pixels if pixels.ndim == 3 else pixels[..., None]
    height, width, channels = pixels.shape

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = b"".join(b"\0" + row.astype(">u2").tobytes() for row in pixels)
    header = struct.pack(">IIBBBBB", width, height, 16, {1: 0, 3: 2}[channels], 0, 0, 0)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def test_sixteen_bit_images_read_as_their_eight_bit_values(tmp_path, monkeypatch):
    half = np.full((2, 3), 32768, np.uint16)
    Image.fromarray(half).save(tmp_path / "grey16.png")  # mode I;16
    Image.fromarray(half).save(tmp_path / "grey16.tif")
    Image.fromarray(half.astype(">u2")).save(tmp_path / "grey16b.tif")  # mode I;16B
    Image.fromarray(half.astype(np.int32)).save(tmp_path / "grey32.tif")  # mode I holding 16-bit values
    _png16(tmp_path / "rgb16.png", np.stack([half, half // 2, np.full_like(half, 65535)], -1))  # PIL: 8-bit RGB
    for name, mode, want in (("grey16.png", "I;16", [128] * 3), ("grey16.tif", "I;16", [128] * 3),
                             ("grey16b.tif", "I;16B", [128] * 3), ("grey32.tif", "I", [128] * 3),
                             ("rgb16.png", "RGB", [128, 64, 255])):
        with Image.open(tmp_path / name) as image:
            assert image.mode == mode, name
            rgb = fid.rgb_image(image)
            assert rgb.mode == "RGB" and np.asarray(rgb)[1, 2].tolist() == want, name  # 32768 * 255 / 65535 = 127.5

    values = np.random.default_rng(0).integers(0, 256, (4, 24, 24, 3), dtype=np.uint8)
    for kind in ("8", "16"):
        for i, image in enumerate(values):
            os.makedirs(tmp_path / f"grey{kind}", exist_ok=True)
            grey = image[..., 0]
            if kind == "8":
                Image.fromarray(grey).save(tmp_path / "grey8" / f"{i}.png")
                Image.fromarray(image).save(tmp_path / f"rgb{i}_8.png")
            else:
                Image.fromarray(grey.astype(np.uint16) * 257).save(tmp_path / "grey16" / f"{i}.png")
                _png16(tmp_path / f"rgb{i}_16.png", image.astype(np.uint16) * 257)
    for i in range(4):  # colour: PIL's own 16-bit reader already gives the 8-bit values
        with Image.open(tmp_path / f"rgb{i}_8.png") as eight, Image.open(tmp_path / f"rgb{i}_16.png") as sixteen:
            assert np.array_equal(np.asarray(fid.rgb_image(eight)), np.asarray(fid.rgb_image(sixteen)))
    net = fid.load_inception("random")
    stats8, stats16 = (fid.statistics(str(tmp_path / f"grey{k}"), net, batch_size=4) for k in ("8", "16"))
    assert np.array_equal(stats8["pool"], stats16["pool"]) and np.array_equal(stats8["mu"], stats16["mu"])  # FID 0
    monkeypatch.setattr(fid, "rgb_image", lambda image: image.convert("RGB"))  # before the fix: clipped at 255
    clipped = fid.statistics(str(tmp_path / "grey16"), net, batch_size=4)
    print("16-bit grey read by convert('RGB'): |mu - mu_8bit| =", np.linalg.norm(clipped["mu"] - stats8["mu"]),
          "vs |mu_8bit| =", np.linalg.norm(stats8["mu"]))
    assert np.linalg.norm(clipped["mu"] - stats8["mu"]) > 0.1 * np.linalg.norm(stats8["mu"])


# -----------------------------------------------------------------------------
# the paper's ablations, one flag each, and the latent diagnostics (SSC, eRank)


@pytest.mark.parametrize("fusion", ["add", "concat"])
def test_released_fusion_modes_convert_and_compute_the_released_dam(fusion, tmp_path):
    shapes = _released_tiny_pae_shapes(with_vfm=False)
    W = 64
    shapes.update(_linear("delta_encoder.fusion_proj", W, W * (1 + (fusion == "concat"))))
    state = _random_state(shapes, 5)
    torch.save({"model": state}, tmp_path / "pae.pt")
    pae = model.pae_from_checkpoint(str(tmp_path / "pae.pt"))
    assert pae.pae_args["fusion"] == fusion and pae.dam.fusion == fusion and not hasattr(pae.dam, "sft")
    images = _images(2)
    with torch.no_grad():
        tokens, pixels = pae.vfm(images), pae.vfm.preprocess(images)
        torch.testing.assert_close(pae.dam(pixels, tokens), _released_dam_reference(state, pixels, tokens, fusion=fusion))
    fresh = model.DAM(W, 4, 4, 8, depth=2, fusion=fusion)  # add starts at LayerNorm(H_vfm), as sft; concat does not
    assert torch.equal(fresh.fuse.weight, torch.zeros_like(fresh.fuse.weight)) == (fusion == "add")


def test_each_ablation_flag_changes_what_it_says(lpips_net):
    torch.manual_seed(0)
    images = _images(2)
    frozen = model.build_pae(preset="tiny")
    tuned = model.build_pae(preset="tiny", train_vfm=True)  # no DAM; the VFM has gradients and is saved
    assert tuned.dam is None and all(p.requires_grad for p in tuned.vfm.parameters())
    assert any(k.startswith("vfm.") for k in tuned.state_dict()) and not any(k.startswith("vfm.") for k in
                                                                            frozen.state_dict())
    tuned(images)["recon"].mean().backward()
    assert tuned.vfm.net.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    kl = model.build_pae(preset="tiny", kl=True)  # the release's diagonal-Gaussian KL, sampled in training only
    out = kl(images)
    mean, logvar = kl.projector.conv(kl.projector.attn(kl.dam(kl.vfm.preprocess(images), out["vfm_tokens"]))
                                     .transpose(1, 2).unflatten(2, (8, 8))).chunk(2, dim=1)
    torch.testing.assert_close(out["kl"], 0.5 * (mean ** 2 + logvar.exp() - 1 - logvar).sum((1, 2, 3)))
    assert torch.equal(kl.encode(images), model.sphere(mean)) and not torch.equal(out["latent"], model.sphere(mean))
    refiner = model.build_refiner(64, depth=1).requires_grad_(False)
    total, parts = losses.pae_loss(kl(images), images, None, refiner, lpips=0, gan=0, mcr=0, kl=1e-3)
    assert parts["kl"] > 0 and torch.isclose(total, sum(w * parts[k] for k, w in
                                                       dict(l1=1, ssr=0.2, scr=1.0, kl=1e-3).items()))
    z, target = torch.randn(2, 16, 32), torch.randn(2, 16, 32)
    pooled, patch = losses.scr_loss(z, target, "pooled"), losses.scr_loss(z, target, "patch")
    torch.testing.assert_close(pooled + patch, losses.scr_loss(z, target))  # pooled: no per-token term, and back
    torch.testing.assert_close(pooled, 1 - F.cosine_similarity(z.mean(1), target.mean(1), dim=-1).mean())
    cfg = model.parse_config(train_ae.Config, ["--preset", "tiny", "--mcr_mode", "small"], train_ae.PRESETS)
    decoded = []
    pae = model.build_pae(preset="tiny")
    pae.decode = lambda latent: decoded.append(len(latent)) or torch.zeros(len(latent), 3, 32, 32)
    step, generator_loss = train_ae.ae_step(cfg, model.Dist("cpu"), pae, refiner, None, model.PatchDiscriminator(),
                                            None, None)
    generator_loss(pae, images, False)
    assert decoded == [2 * len(images)]  # small: the clean decoding and one perturbed one (cascade: three)
    assert train_ae.MCR_THETAS["small"] == (42.5,) and train_ae.MCR_THETAS["large"] == (85.0,)
    raw = train_ae.RawTarget(cfg, pae.vfm, train_ae.SyntheticImages(16, 32), torch.device("cpu"))
    with torch.no_grad():
        target = raw.target(pae.vfm(images))
    assert target.shape == (2, 64, 32) and torch.allclose(target.norm(dim=-1), torch.tensor(32.0).sqrt())


def test_ssc_and_erank_on_known_latents():
    masks = torch.zeros(3, 32, 32, dtype=torch.long)
    masks[:, 4:20, 8:28] = 7
    masks[1, 24:, :] = 2  # three objects in image 1, two in the others
    token_labels = F.interpolate(masks[:, None].float(), size=8, mode="nearest")[:, 0].long()  # (3, 8, 8)
    clusters = torch.randn(9, 32)
    aligned = clusters[token_labels].permute(0, 3, 1, 2) + 0.05 * torch.randn(3, 32, 8, 8)  # token = its object
    assert losses.ssc(aligned, masks) == pytest.approx(1.0, abs=1e-6)
    assert losses.ssc(torch.randn(16, 32, 16, 16), masks[:1].expand(16, -1, -1)) < 0.05
    assert math.isnan(losses.ssc(aligned, torch.zeros_like(masks)))  # one object: nothing to cluster
    assert losses.erank(torch.randn(500, 1) @ torch.randn(1, 32)) == pytest.approx(1 / 32, rel=1e-4)
    assert losses.erank(torch.randn(20000, 32)) > 0.99


# -----------------------------------------------------------------------------
# preemption and restarts: --resume auto, a checkpoint on SIGTERM / SIGUSR1, exit statuses, locks of lost nodes


def _wait_for(predicate, proc, timeout=240):
    start = time.time()
    while not predicate():
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.time() - start < timeout, "timed out"
        time.sleep(0.02)


def _states_equal(a, b):
    """The model, EMA and optimizer of two checkpoints, bit for bit."""
    def flat(value, prefix=""):
        if isinstance(value, dict):
            return {k: v for key, item in value.items() for k, v in flat(item, f"{prefix}{key}.").items()}
        return {prefix: value}
    one, two = flat({k: a[k] for k in ("model", "ema", "opt")}), flat({k: b[k] for k in ("model", "ema", "opt")})
    return one.keys() == two.keys() and all(torch.equal(v, two[k]) if torch.is_tensor(v) else v == two[k]
                                            for k, v in one.items())


def test_torchrun_restarts_a_killed_worker_and_ends_bit_identical(tmp_path):  # slow: three torchrun launches
    cache = _write_cache(tmp_path / "latents")
    args = lambda name: ["train_dit.py", *_dit_args(tmp_path, cache, name=name, max_steps=400, ckpt_every=50,  # noqa
                                                    log_every=50, resume="auto")]
    _run(args("whole"), nproc=2)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--max-restarts=1",
                             f"--master_port={_free_port()}", *args("killed")], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _wait_for(lambda: (tmp_path / "killed" / "ckpt.pt").is_file(), proc)
    with open(f"/proc/{proc.pid}/task/{proc.pid}/children") as f:
        os.kill(int(f.read().split()[-1]), signal.SIGKILL)  # one worker dies; torchrun restarts them both
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, out[-3000:]
    log = _log(tmp_path / "killed")
    assert "dit: starting at step 0 (no checkpoint yet)" in log and re.search(r"dit: resuming from .* at step [1-9]", log)
    whole, killed = (torch.load(tmp_path / n / "ckpt.pt", weights_only=True) for n in ("whole", "killed"))
    assert killed["step"] == 400 and _states_equal(whole, killed)


ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}  # as _run: float sums depend on the thread count


def _stopped_by(signal_number, command, log_path, marker, tmp_path):
    """Run `command`, send the signal once `marker` is in the log, return (status, step it stopped at, seconds)."""
    proc = subprocess.Popen(command, cwd=REPO, env=ONE_THREAD, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    _wait_for(lambda: os.path.isfile(log_path) and marker in open(log_path).read(), proc)
    start = time.time()
    proc.send_signal(signal_number)
    proc.communicate(timeout=120)
    seconds = time.time() - start
    step = int(re.search(r"stopped by SIG\w+ at step (\d+); checkpoint", open(log_path).read()).group(1))
    return proc.returncode, step, seconds


def test_sigterm_checkpoints_the_step_it_stopped_at_and_the_same_command_finishes_the_run(tmp_path, capsys):
    cache = _write_cache(tmp_path / "latents")
    command = lambda name: [sys.executable, "train_dit.py", *_dit_args(  # noqa: E731
        tmp_path, cache, name=name, max_steps=300, ckpt_every=1000, log_every=20, resume="auto")]
    subprocess.run(env=ONE_THREAD, args=command("whole"), cwd=REPO, check=True, capture_output=True)
    status, step, seconds = _stopped_by(signal.SIGTERM, command("stopped"), tmp_path / "stopped" / "log.txt",
                                        "dit step 40/", tmp_path)
    ckpt = torch.load(tmp_path / "stopped" / "ckpt.pt", weights_only=True)
    assert status == model.EXIT_REQUEUE == 75 and 40 <= step < 300 and ckpt["step"] == step  # not a multiple of 1000
    rerun = subprocess.run(env=ONE_THREAD, args=command("stopped"), cwd=REPO, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    whole, stopped = (torch.load(tmp_path / n / "ckpt.pt", weights_only=True) for n in ("whole", "stopped"))
    assert stopped["step"] == 300 and _states_equal(whole, stopped)
    finished = subprocess.run(env=ONE_THREAD, args=command("stopped"), cwd=REPO, capture_output=True, text=True)  # a third time: done
    assert finished.returncode == 0 and "finished: nothing to do" in finished.stdout
    with capsys.disabled():
        print(f"\nSIGTERM: stopped at step {step} (no steps lost), {seconds:.2f} s from the signal to the exit")


def test_sigusr1_stops_the_ae_stage_and_the_same_pipeline_command_completes_it(tmp_path):
    command = lambda out: [sys.executable, "train_ae.py", *FAST, "--out_dir", str(tmp_path / out), "--refine_steps",  # noqa
                           "2", "--max_steps", "30", "--ckpt_every", "1000", "--log_every", "5", "--resume", "auto"]
    subprocess.run(env=ONE_THREAD, args=command("whole"), cwd=REPO, check=True, capture_output=True)
    status, step, _ = _stopped_by(signal.SIGUSR1, command("stopped"), tmp_path / "stopped" / "log.txt",
                                  "ae step 10/", tmp_path)
    assert status == 75 and 10 <= step < 30
    assert torch.load(tmp_path / "stopped" / "ckpt_ae.pt", weights_only=True)["step"] == step
    assert not (tmp_path / "stopped" / "ae.pt").exists() and not (tmp_path / "stopped" / "latents").exists()
    rerun = subprocess.run(env=ONE_THREAD, args=command("stopped"), cwd=REPO, capture_output=True, text=True)  # refine done, ae resumed
    assert rerun.returncode == 0 and "refine: resuming from" in rerun.stdout and "(finished" in rerun.stdout
    whole, stopped = (torch.load(tmp_path / n / "ckpt_ae.pt", weights_only=True) for n in ("whole", "stopped"))
    assert _states_equal(whole, stopped) and (tmp_path / "stopped" / "latents" / "meta.json").is_file()


def test_a_lock_of_a_lost_node_is_taken_over_once_its_heartbeat_is_stale(tmp_path, capsys):
    lock = tmp_path / ".lock"
    lock.write_text("4242@another-host")
    with pytest.raises(SystemExit, match="in use by another run .*4242@another-host, heartbeat 0 s ago"):
        model.lock_dir(str(tmp_path))  # fresh: its owner may be alive on that host
    stale = time.time() - model.LOCK_STALE - 5
    os.utime(lock, (stale, stale))
    model.lock_dir(str(tmp_path))
    assert "taking over the lock of 4242@another-host, which is gone (no heartbeat for 12" in capsys.readouterr().out
    assert lock.read_text() == f"{os.getpid()}@{socket.gethostname()}"
    model.release_locks()
    assert not lock.exists()


# -----------------------------------------------------------------------------
# a resume is the same run; every input is read as what it is


def test_a_resume_refuses_another_run_and_changes_nothing(tmp_path):
    cache = _write_cache(tmp_path / "latents")
    other = _write_cache(tmp_path / "other", seed=1)  # the same shape, other latents and statistics
    train_dit.main(_dit_args(tmp_path, cache, max_steps=4))
    ckpt, config = tmp_path / "run" / "ckpt.pt", tmp_path / "run" / "config.json"
    before = _bytes(ckpt, config)
    for changed, message in ((dict(latents=other), r"latent_meta mean \[.* -> \[.*--allow_change latent_meta"),
                             (dict(batch_size=4), "batch_size 8 -> 4"), (dict(seed=1), "seed 0 -> 1"),
                             (dict(lr=1e-3, seed=2), "lr 0.002 -> 0.001; seed 0 -> 2")):
        args = {**dict(max_steps=6, resume=True), **changed}
        with pytest.raises(SystemExit, match=message):
            train_dit.main(_dit_args(tmp_path, args.pop("latents", cache), **args))
        assert _bytes(ckpt, config) == before
    train_dit.main(_dit_args(tmp_path, cache, max_steps=6, resume=True, log_every=3, micro_batch_size=4))  # free
    assert torch.load(ckpt, weights_only=True)["step"] == 6  # a longer --max_steps continues
    train_dit.main(_dit_args(tmp_path, cache, max_steps=8, resume=True, lr=1e-3, allow_change="lr"))
    saved = torch.load(ckpt, weights_only=True)
    assert saved["history"] == [{"step": 6, "changed": {"lr": [0.002, 0.001]}}] and saved["config"]["lr"] == 1e-3
    assert "deliberate changes at step 6 (--allow_change): lr 0.002 -> 0.001" in _log(tmp_path / "run")
    with pytest.raises(SystemExit, match="--allow_change names bogus"):
        train_dit.main(_dit_args(tmp_path, cache, max_steps=9, resume=True, allow_change="bogus"))
    with pytest.raises(SystemExit, match="is a file; pass the latent cache's folder"):
        train_dit.main(_dit_args(tmp_path, ckpt, name="x"))
    with pytest.raises(SystemExit, match=r"not divisible .*; choose a multiple of 3, or another micro_batch_size$"):
        train_dit.main(_dit_args(tmp_path, cache, name="y", micro_batch_size=3))


def test_a_tokenizer_resume_refuses_other_data(tmp_path):
    args = [*FAST, "--stage", "refine", "--refine_steps", "2", "--out_dir", str(tmp_path)]
    train_ae.main(args)
    before = _bytes(tmp_path / "ckpt_refine.pt")
    with pytest.raises(SystemExit, match=r"dataset .*count=32.* -> .*count=48.*images 32 -> 48"):
        train_ae.main([*args, "--synthetic_size", "48", "--refine_steps", "3", "--resume"])
    assert _bytes(tmp_path / "ckpt_refine.pt") == before


def test_unreadable_images_are_counted_once_and_a_mostly_broken_folder_is_refused(tmp_path):
    root = tmp_path / "images" / "cls"
    root.mkdir(parents=True)
    for i in range(8):
        Image.fromarray(np.full((40, 40, 3), 30 * i, np.uint8)).save(root / f"{i}.png")
    for i in (1, 2, 3, 5, 6):  # five broken files, three of them in a row
        (root / f"{i}.png").write_bytes(b"not an image")
    pae = build_pae(preset="tiny")
    save_checkpoint(str(tmp_path / "ae.pt"), "pae", pae, {"preset": "tiny"}, 0, pae_args=pae.pae_args)
    args = [*FAST, "--out_dir", str(tmp_path), "--data", str(tmp_path / "images"), "--micro_batch_size", "4"]
    with pytest.raises(SystemExit, match="encode: 5 of the 8 images .* cannot be read"):
        train_ae.main([*args, "--stage", "encode"])
    assert not (tmp_path / "latents" / "meta.json").exists()
    (root / "1.png").unlink(), (root / "2.png").unlink()  # three of six broken: counted, replaced, reported
    train_ae.main([*args, "--stage", "encode"])
    assert "3 unreadable images replaced by the next readable one" in _log(tmp_path)
    train_ae.main([*args, "--stage", "eval", "--val_data", str(tmp_path / "images")])
    assert json.loads((tmp_path / "eval.json").read_text())["unreadable"] == 3 and "unreadable 3" in _log(tmp_path)


def test_sixteen_bit_training_images_are_read_at_their_value(tmp_path):
    (tmp_path / "cls").mkdir()
    Image.fromarray(np.full((40, 40), 32768, np.uint16)).save(tmp_path / "cls" / "grey16.png")  # 50% grey
    image, _, unreadable = train_ae.ImageFolderADM(str(tmp_path), 32)[0]
    assert unreadable == 0 and image.unique().tolist() == [128]  # convert("RGB") made it 255


def test_sample_checks_the_ae_kind_before_it_says_anything(tmp_path, capsys):
    dit_path, _ = _pipeline(tmp_path)
    with pytest.raises(SystemExit, match="'dit' checkpoint, but a 'pae' checkpoint is needed"):
        sample.main(_args(tmp_path, dit_path, ae_ckpt=dit_path, out=tmp_path / "x.npz"))
    assert "decoding with" not in capsys.readouterr().out
