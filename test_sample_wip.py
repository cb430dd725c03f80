"""sample.py tests (to be merged into test_all.py). CPU only, tiny configs."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

import sample
from model import build_dit, build_pae, save_checkpoint

REPO = os.path.dirname(os.path.abspath(__file__))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
    """Tiny PAE + DiT checkpoints and a latent meta.json (SPEC §3.2, §3.3); returns the DiT checkpoint path."""
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
            "num_steps": 6, "batch_size": 5, **extra}
    return [f"--{k}={v}" for k, v in args.items()]


# -----------------------------------------------------------------------------
# samplers


def test_time_grid_shift_endpoints_and_monotone():
    grid = sample.time_grid(250, 0.4)
    assert len(grid) == 250 and grid[0] == 0.0 and grid[-1] == 1.0
    assert all(b > a for a, b in zip(grid[:-1], grid[1:]))
    assert all(g <= u for g, u in zip(grid, np.linspace(0, 1, 250)))  # s < 1 spends more points near noise
    assert sample.time_grid(3, 0.4)[1] == pytest.approx(0.4 * 0.5 / (1 - 0.6 * 0.5))


def test_euler_ode_reproduces_gaussian_target():
    """The Euler map of an affine velocity is affine, x -> A x + b: mean b and covariance A A^T exactly."""
    mu, sigma, velocity = _gaussian_target()
    probes = torch.cat([torch.zeros(1, 3, dtype=torch.float64), torch.eye(3, dtype=torch.float64)])
    errors = []
    for num_steps in (250, 500):
        out = sample.euler_ode(velocity, probes, sample.time_grid(num_steps, 0.4))
        a = (out[1:] - out[0]).T
        assert torch.allclose(out[0], mu, atol=1e-10)
        errors.append((a @ a.T - sigma).abs().max().item() / sigma.abs().max().item())
    assert errors[0] < 0.015  # 250 points, the paper's grid: covariance within 1.5%
    assert errors[1] == pytest.approx(errors[0] / 2, rel=0.05)  # first order: twice the steps, half the error


def test_euler_maruyama_matches_gaussian_target_statistically():
    mu, sigma, velocity = _gaussian_target()
    n = 8000
    gen = torch.Generator().manual_seed(1)
    x0 = torch.randn(n, 3, generator=gen, dtype=torch.float64)
    noise = lambda i: torch.randn(n, 3, generator=gen, dtype=torch.float64)  # noqa: E731
    out = sample.euler_maruyama(velocity, x0, sample.time_grid(250, 0.4), noise, 0.004)
    var = torch.diag(sigma)
    assert ((out.mean(0) - mu).abs() < 4 * (var / n).sqrt()).all()
    cov_sd = ((var[:, None] * var[None] + sigma ** 2) / n).sqrt()  # sampling s.d. of each covariance entry
    assert ((torch.cov(out.T) - sigma).abs() < 5 * cov_sd + 0.01 * sigma.abs().max()).all()
    again = sample.euler_maruyama(velocity, x0[:100], sample.time_grid(250, 0.4),
                                  lambda i: torch.randn(100, 3, generator=gen, dtype=torch.float64), 0.004)
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


def test_classes_are_balanced_or_chosen():
    balanced = sample.classes_of(range(30), 3, [], 8)
    assert np.bincount(balanced).tolist() == [10, 10, 10]
    assert sample.classes_of(range(6), 3, [7, 2], 3) == [7, 7, 7, 2, 2, 2]


# -----------------------------------------------------------------------------
# sample.py end to end (tiny PAE + DiT checkpoints)


def test_sample_tiny_end_to_end(tmp_path):
    dit_path, pae = _pipeline(tmp_path)
    sample.main(_args(tmp_path, dit_path))
    with np.load(tmp_path / "samples.npz") as f:
        images, labels = f["arr_0"], f["labels"]
    assert images.shape == (12, pae.image_size, pae.image_size, 3) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [4, 4, 4]
    assert len(np.unique(images.reshape(12, -1), axis=0)) == 12  # every sample has its own noise
    assert (tmp_path / "samples.png").is_file() and not (tmp_path / "samples_shards").exists()
    sample.main(_args(tmp_path, dit_path, name="raw", use_ema="false"))
    with np.load(tmp_path / "raw.npz") as f:
        assert not np.array_equal(f["arr_0"], images)  # EMA by default, the raw weights on request


def test_one_process_and_torchrun_two_give_identical_npz(tmp_path):
    dit_path, _ = _pipeline(tmp_path)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    extra = dict(sampler="sde", cfg_scale=2.0, cfg_interval_start=0.3)
    one = subprocess.run([sys.executable, "sample.py", *_args(tmp_path, dit_path, "one", **extra)], cwd=REPO,
                         env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                          f"--master_port={_free_port()}", "sample.py", *_args(tmp_path, dit_path, "two", **extra)],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    assert (tmp_path / "one.npz").read_bytes() == (tmp_path / "two.npz").read_bytes()


def test_restart_skips_finished_shards_and_rejects_other_settings(tmp_path):
    dit_path, pae = _pipeline(tmp_path)
    sample.main(_args(tmp_path, dit_path, name="full"))
    shards = tmp_path / "part_shards"
    shards.mkdir()
    settings = {**vars(sample.parse_config(sample.Config, _args(tmp_path, dit_path, name="part"),
                                           sample.PRESETS))}
    settings.pop("fid_ref")
    (shards / "settings.json").write_text(json.dumps(settings))
    marker = np.full((5, pae.image_size, pae.image_size, 3), 7, np.uint8)
    sample.save_npz(str(shards / "000001.npz"), arr_0=marker, labels=np.arange(5, 10) % 3)
    sample.main(_args(tmp_path, dit_path, name="part"))
    with np.load(tmp_path / "full.npz") as full, np.load(tmp_path / "part.npz") as part:
        assert (part["arr_0"][5:10] == 7).all()  # the finished shard was kept, not recomputed
        assert np.array_equal(part["arr_0"][:5], full["arr_0"][:5])
        assert np.array_equal(part["arr_0"][10:], full["arr_0"][10:])
    shards.mkdir()
    (shards / "settings.json").write_text(json.dumps({**settings, "cfg_scale": 9.0}))
    with pytest.raises(SystemExit, match="other settings"):
        sample.main(_args(tmp_path, dit_path, name="part"))


def test_latent_stats_fall_back_to_the_checkpoint_copy(tmp_path):
    dit_path, _ = _pipeline(tmp_path)
    sample.main(_args(tmp_path, dit_path, name="cache"))
    os.remove(tmp_path / "latents" / "meta.json")
    sample.main(_args(tmp_path, dit_path, name="copy"))
    assert (tmp_path / "cache.npz").read_bytes() == (tmp_path / "copy.npz").read_bytes()


def test_sample_errors(tmp_path):
    dit_path, _ = _pipeline(tmp_path)
    cases = [
        (dict(ckpt=str(tmp_path / "nope.pt")), "does not exist"),
        (dict(ckpt=str(tmp_path / "ae.pt")), "'dit' checkpoint is needed"),
        (dict(ae_ckpt=str(tmp_path / "nope.pt")), "AE checkpoint"),
        (dict(num_samples=10), "not a positive multiple of the 3 classes"),
        (dict(labels="1,3"), "outside 0..2"),
        (dict(sampler="heun"), "unknown sampler"),
    ]
    for extra, message in cases:
        with pytest.raises(SystemExit, match=message):
            sample.main(_args(tmp_path, dit_path, **extra))
    (tmp_path / "bare").mkdir()
    bare_path, _ = _pipeline(tmp_path / "bare", with_meta=False)
    with pytest.raises(SystemExit, match="no latent statistics"):
        sample.main(_args(tmp_path, bare_path))
