"""Small tensor maths for the Video DC-AE: channel RMSNorm, space/time <-> channel shuffles, linear attention."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import Tensor


def rms_norm(x: Tensor, weight: Tensor, bias: Tensor, eps: float = 1e-5) -> Tensor:
    """RMSNorm over the channel dim 1 of (b, c, ...) with an affine weight and bias, normalised in float32."""
    shape = (1, -1) + (1,) * (x.ndim - 2)
    x32 = x.float()
    x = (x32 / torch.sqrt(x32.square().mean(dim=1, keepdim=True) + eps)).to(x.dtype)
    return x * weight.view(shape) + bias.view(shape)


def space_time_to_channels(x: Tensor, ft: int, fs: int) -> Tensor:
    """3D pixel-unshuffle; with ft = 1 it is torch's 2D pixel_unshuffle applied to every frame."""
    return rearrange(x, "b c (t ft) (h fh) (w fw) -> b (c ft fh fw) t h w", ft=ft, fh=fs, fw=fs)


def channels_to_space_time(x: Tensor, ft: int, fs: int) -> Tensor:
    """3D pixel-shuffle, the inverse of `space_time_to_channels`."""
    return rearrange(x, "b (c ft fh fw) t h w -> b c (t ft) (h fh) (w fw)", ft=ft, fh=fs, fw=fs)


def average_channel_groups(x: Tensor, out_channels: int) -> Tensor:
    """Mean over consecutive groups of channels: (b, c*g, ...) -> (b, c, ...)."""
    return rearrange(x, "b (c g) t h w -> b c g t h w", c=out_channels).mean(dim=2)


def duplicate_channels(x: Tensor, repeats: int) -> Tensor:
    """Repeat every channel `repeats` times in place (repeat-interleave): (b, c, ...) -> (b, c*repeats, ...)."""
    return repeat(x, "b c t h w -> b (c g) t h w", g=repeats)


def relu_linear_attention(q: Tensor, k: Tensor, v: Tensor, eps: float = 1e-15) -> Tensor:
    """ReLU linear attention in float32 on (b, heads, d, l) tensors; returns (b, heads, d, l) in q's dtype."""
    dtype = q.dtype
    q, k, v = F.relu(q.float()), F.relu(k.float()), v.float()
    # A row of ones appended to v makes the same matmuls yield the normaliser sum_l k_l . q as the last row.
    v = F.pad(v, (0, 0, 0, 1), value=1.0)
    out = (v @ k.transpose(-1, -2)) @ q  # (b, heads, d + 1, l)
    return (out[:, :, :-1] / (out[:, :, -1:] + eps)).to(dtype)
