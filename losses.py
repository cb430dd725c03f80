"""
PAE reference implementation: every loss.

Sections (each marked with a banner):
  1. flow matching       (SPEC §8)  timestep sampling and the velocity loss of the DiT
"""

import torch
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# 1. flow matching (SPEC §8). t = 0 is noise, t = 1 is data: x_t = t*x1 + (1-t)*x0, v = x1 - x0.


def shift_time(t, shift):
    """t <- s*t / (1 + (s-1)*t): s < 1 moves time towards noise (0 -> 0, 1 -> 1, monotone)."""
    return shift * t / (1 + (shift - 1) * t)


def sample_timesteps(n, shift=0.7, generator=None, device="cpu"):
    """Logit-normal t = sigmoid(u), u ~ N(0, 1), then shifted with s = 0.7 (released LightningDiT config)."""
    u = torch.randn(n, generator=generator, device=device)
    return shift_time(torch.sigmoid(u), shift)


def flow_matching_loss(velocity_pred, velocity):
    """MSE(v_hat, v) + mean(1 - cos(v_hat, v)), cosine along channels at every position; weights 1:1."""
    velocity_pred, velocity = velocity_pred.float(), velocity.float()
    mse = (velocity_pred - velocity).pow(2).mean()
    cos = 1 - F.cosine_similarity(velocity_pred, velocity, dim=1).mean()
    return mse + cos
