"""Tests of train_ae.py (to be merged into test_all.py): data, sampler, stages refine/ae/encode/eval, resume, DDP."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import train_ae

REPO = os.path.dirname(os.path.abspath(__file__))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def test_lr_schedule_warmup_and_cosine_floor():
    cfg = train_ae.Config(lr=1e-4, warmup=0.1, min_lr_ratio=0.1)
    lrs = [train_ae.get_lr(cfg, s, 100) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-5) and lrs[9] == pytest.approx(1e-4)
    assert max(lrs) == pytest.approx(1e-4) and lrs[-1] == pytest.approx(1e-5, rel=1e-2)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
