"""
The whole test suite: CPU only, tiny configs.  Run:  python -m pytest -q test_all.py
"""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

import train_dit
from losses import flow_matching_loss, sample_timesteps, shift_time
from model import apply_rope, build_dit, load_checkpoint, rope_2d, save_checkpoint

REPO = os.path.dirname(os.path.abspath(__file__))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(script, args, nproc=2, timeout=600):
    """Run `torchrun --nproc_per_node=nproc script args` on CPU (Gloo) and return the completed process."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           f"--master_port={_free_port()}", script, *args]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _write_cache(path, count=16, channels=4, size=8, num_classes=3, seed=0):
    """A latent cache in exactly the SPEC §3.3 format."""
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


def test_checkpoint_schema_and_resume_is_exact(tmp_path):
    cache = _write_cache(tmp_path / "latents")
    train_dit.main(_dit_args(tmp_path, cache, name="full"))
    train_dit.main(_dit_args(tmp_path, cache, name="split", max_steps=3))
    train_dit.main(_dit_args(tmp_path, cache, name="split", resume=True))
    full = torch.load(tmp_path / "full" / "ckpt.pt", weights_only=True)
    split = torch.load(tmp_path / "split" / "ckpt.pt", weights_only=True)
    assert full["kind"] == "dit" and full["step"] == split["step"] == 6
    assert full["model_args"]["in_channels"] == 4 and full["config"]["latents"] == str(cache)
    for key in ("model", "ema"):
        assert not any(k.startswith(("_orig_mod.", "module.")) for k in full[key])
        for name, value in full[key].items():
            assert torch.equal(value, split[key][name]), name
    assert "resumed at step 3" in _log(tmp_path / "split")


def test_ddp_two_processes_match_one(tmp_path):  # slow: two processes, one of them compiling
    cache = _write_cache(tmp_path / "latents")
    train_dit.main(_dit_args(tmp_path, cache, name="one", lr=1e-3))
    _torchrun("train_dit.py", _dit_args(tmp_path, cache, name="two", lr=1e-3, compile="true"))
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
