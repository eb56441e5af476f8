"""Reconstruction metrics on videos: PSNR and SSIM per frame, averaged over frames, one value per video.

Inputs are the project's pixel convention, (B, C, T, H, W) in [-1, 1], mapped to [0, 1] (data range 1).
SSIM follows Wang et al. as scikit-image computes it with `gaussian_weights=True, sigma=1.5,
use_sample_covariance=False, data_range=1`: an 11x11 Gaussian window, per channel, averaged over the
pixels whose window lies inside the frame, then over channels. It runs frame by frame (on a (T, H, W, C)
array scikit-image would silently compute a 3D SSIM).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

SSIM_SIGMA = 1.5
SSIM_RADIUS = 5  # int(3.5 * sigma + 0.5): scikit-image's window truncation (11x11)
SSIM_K1, SSIM_K2 = 0.01, 0.03


# Frames are scored a few at a time (SSIM one channel at a time), in float64: memory is bounded by this many values
# per chunk, not by the clip's length (SSIM's intermediates take ~550 bytes a value: a 64-frame 720p clip at once
# needed ~95 GB; in chunks, measured: 511 MB for 24 frames at 360p, one 720p frame-channel about as much).
CHUNK_VALUES = 2**20


def _check(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    if x.shape != y.shape:
        raise ValueError(f"shapes differ: {tuple(x.shape)} vs {tuple(y.shape)}")
    if x.ndim == 4:  # (C, T, H, W): one video
        x, y = x[None], y[None]
    if x.ndim != 5:
        raise ValueError(f"expected (B, C, T, H, W) videos in [-1, 1], got shape {tuple(x.shape)}")
    return x, y


def _per_frame(x: Tensor, y: Tensor, score) -> Tensor:
    """`score` of (B, C, t, H, W) chunks in [0, 1], float64, concatenated over frames: (B, T)."""
    b, c, t, h, w = x.shape
    step = max(1, CHUNK_VALUES // (b * h * w))

    def unit(v: Tensor) -> Tensor:  # float64 keeps PSNR / SSIM within 1e-6 of scikit-image, which works in float64
        return (v.double().clamp(-1, 1) + 1) / 2

    return torch.cat([score(unit(x[:, :, i : i + step]), unit(y[:, :, i : i + step])) for i in range(0, t, step)], 1)


def _psnr_frames(x: Tensor, y: Tensor) -> Tensor:
    return 10 * torch.log10(1.0 / (x - y).square().mean(dim=(1, 3, 4)))  # (B, t)


def psnr(x: Tensor, y: Tensor) -> Tensor:
    """PSNR in dB per video (B,): per-frame PSNR, mean over frames; a frame identical to its reference is inf."""
    x, y = _check(x, y)
    return _per_frame(x, y, _psnr_frames).mean(dim=1).float()


def _gaussian_window(device: torch.device) -> Tensor:
    r = torch.arange(-SSIM_RADIUS, SSIM_RADIUS + 1, dtype=torch.float64, device=device)
    g = torch.exp(-0.5 * (r / SSIM_SIGMA) ** 2)
    return g / g.sum()


def _ssim_frames(x: Tensor, y: Tensor) -> Tensor:
    """(B, t) SSIM of chunks: each channel on its own (a third of the memory), then the channel mean."""
    return torch.stack([_ssim_channels(x[:, i : i + 1], y[:, i : i + 1]) for i in range(x.shape[1])]).mean(dim=0)


def _ssim_channels(x: Tensor, y: Tensor) -> Tensor:
    b, c, t, h, w = x.shape
    # Frames and channels become a batch of single-channel images; the separable filter runs "valid",
    # which is exactly the region scikit-image averages after cropping its padded result.
    imgs = torch.stack([x, y, x * x, y * y, x * y]).permute(0, 1, 3, 2, 4, 5).reshape(-1, 1, h, w)
    g = _gaussian_window(x.device)
    f = F.conv2d(F.conv2d(imgs, g.view(1, 1, -1, 1)), g.view(1, 1, 1, -1))
    ux, uy, uxx, uyy, uxy = f.view(5, b * t * c, *f.shape[-2:])
    vx, vy, vxy = uxx - ux * ux, uyy - uy * uy, uxy - ux * uy
    c1, c2 = SSIM_K1**2, SSIM_K2**2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    return s.mean(dim=(-2, -1)).view(b, t, c).mean(dim=2)  # (B, t)


def ssim(x: Tensor, y: Tensor) -> Tensor:
    """SSIM per video (B,): per frame and channel with an 11x11 Gaussian (sigma 1.5), mean over frames."""
    x, y = _check(x, y)
    if min(x.shape[-2:]) < 2 * SSIM_RADIUS + 1:
        raise ValueError(f"SSIM needs frames of at least 11x11 pixels, got {x.shape[-2]}x{x.shape[-1]}")
    return _per_frame(x, y, _ssim_frames).mean(dim=1).float()
