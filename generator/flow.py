"""Rectified flow: timestep shift, schedules, interpolation, velocity target, loss and caption dropout.

Convention: t = 1 is pure noise, t = 0 is data; x_t = (1 - t) x0 + (1 - (1 - s)(1 - t)) noise with s = 1e-5, and
the model predicts v = (1 - s) noise - x0, so sampling integrates x <- x + (t_next - t) v from t = 1 down to 0.

The shift depends on the number of spatial tokens per latent frame. We always use the real count
(H_lat * W_lat / p^2) in training and inference; the reference hard-codes (H_lat * W_lat) // 4 in training,
which disagrees with its own inference for patch-1 (DC-AE) models.
"""

from __future__ import annotations

import math

import torch

from cinedit.configs.generator import CAPTION_DROPOUT

SIGMA_MIN = 1e-5


def res_lin(num_tokens: float, x1: float = 256, y1: float = 1.0, x2: float = 4096, y2: float = 3.0) -> float:
    """The line through (x1, y1) and (x2, y2) at num_tokens, in Python float64 like the reference tables."""
    m = (y2 - y1) / (x2 - x1)
    return m * num_tokens + (y1 - m * x1)


def shift_alpha(num_tokens: int, num_frames: int) -> float:
    """Time-shift factor: res_lin(spatial tokens per latent frame) * sqrt(latent frames)."""
    return res_lin(num_tokens) * math.sqrt(num_frames)


def token_count(height: int, width: int, patch_size: int) -> int:
    """Spatial tokens per latent frame of an (H_lat, W_lat) latent patchified by patch_size."""
    return (height // patch_size) * (width // patch_size)


def time_shift(alpha: float, t: torch.Tensor) -> torch.Tensor:
    """alpha t / (1 + (alpha - 1) t): alpha > 1 spends more of the schedule near noise."""
    return alpha * t / (1 + (alpha - 1) * t)


def get_schedule(
    num_steps: int, num_tokens: int, num_frames: int, shift: bool = True, shift_alpha: float | None = None
) -> torch.Tensor:
    """num_steps + 1 float32 timesteps from 1 to 0: linspace(1, 0), time-shifted unless shift=False."""
    t = torch.linspace(1, 0, num_steps + 1)
    if not shift:
        return t
    if shift_alpha is None:  # the argument shadows the function of the same name
        shift_alpha = res_lin(num_tokens) * math.sqrt(num_frames)
    return time_shift(shift_alpha, t)


def sample_timesteps(
    batch: int,
    num_tokens: int,
    num_frames: int,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Training timesteps (batch,): time_shift(alpha, sigmoid(N(0, 1)))."""
    n = torch.randn(batch, generator=generator, device=device)
    return time_shift(shift_alpha(num_tokens, num_frames), torch.sigmoid(n))


def _expand(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    # (B,) -> (B, 1, ..., 1) to broadcast over x
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    return t.reshape(t.shape + (1,) * (x.dim() - t.dim()))


def interpolate(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, sigma_min: float = SIGMA_MIN) -> torch.Tensor:
    """x_t = (1 - t) x0 + (1 - (1 - s)(1 - t)) noise; t is (B,) or broadcastable to x0."""
    t_rev = 1 - _expand(t, x0)
    return t_rev * x0 + (1 - (1 - sigma_min) * t_rev) * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor, sigma_min: float = SIGMA_MIN) -> torch.Tensor:
    """d x_t / d t, the regression target: (1 - s) noise - x0."""
    return (1 - sigma_min) * noise - x0


def flow_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """MSE; with a (broadcastable, 0/1 or weight) mask, the mean over the masked elements only."""
    err = (pred.float() - target.float()) ** 2
    if mask is None:
        return err.mean()
    mask = mask.to(err.dtype).expand_as(err)
    return (err * mask).sum() / mask.sum().clamp_min(1)


def caption_dropout(
    txt: torch.Tensor,
    vec: torch.Tensor,
    null_txt: torch.Tensor,
    null_vec: torch.Tensor,
    prob: float = CAPTION_DROPOUT,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace each sample's T5 states and pooled text vector by the empty prompt's, independently with probability
    prob.

    Args:
        null_txt: (L, D) or (1, L, D) T5 states of the empty prompt; null_vec: (D,) or (1, D) its pooled vector.
    """
    batch = txt.shape[0]
    device = generator.device if generator is not None else txt.device
    drop = (torch.rand(2, batch, generator=generator, device=device) < prob).to(txt.device)
    txt = torch.where(drop[0, :, None, None], null_txt.reshape(1, *txt.shape[1:]).to(txt), txt)
    vec = torch.where(drop[1, :, None], null_vec.reshape(1, -1).to(vec), vec)
    return txt, vec
