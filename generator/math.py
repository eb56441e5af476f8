"""Small tensor maths for the MMDiT: token packing and positions, timestep embedding, RoPE, attention.

Shapes: q, k, v are (b, heads, l, d); `pe` is (b, 1, l, d/2, 2) float32 holding [cos, sin] of the rotation
angle of every (token, frequency) pair, so it splits along l exactly like the tokens (context parallelism).
"""

from __future__ import annotations

import functools
import importlib
import math
import os

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

ROPE_LAYOUTS = ("rotate_half", "interleaved")


def pack(x: Tensor, p: int) -> Tensor:
    """Latent video to tokens: (b, c, t, h, w) -> (b, t*h/p*w/p, c*p*p); no temporal patching."""
    return rearrange(x, "b c t (h ph) (w pw) -> b (t h w) (c ph pw)", ph=p, pw=p)


def unpack(x: Tensor, p: int, t: int, h: int, w: int) -> Tensor:
    """Inverse of `pack`; t, h, w are the latent's size (h and w before patching)."""
    return rearrange(x, "b (t h w) (c ph pw) -> b c t (h ph) (w pw)", t=t, h=h // p, w=w // p, ph=p, pw=p)


def make_ids(t: int, h: int, w: int, batch: int = 1, device: torch.device | str | None = None) -> Tensor:
    """(batch, t*h*w, 3) float positions (t, h, w) of packed tokens, h and w in patches, t-major like `pack`."""
    grid = torch.meshgrid(
        torch.arange(t, device=device), torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij"
    )
    ids = torch.stack(grid, dim=-1).reshape(1, t * h * w, 3).float()
    return ids.expand(batch, -1, -1).contiguous()


def make_txt_ids(batch: int, length: int, device: torch.device | str | None = None) -> Tensor:
    """(batch, length, 3) zeros: every text token sits at position (0, 0, 0)."""
    return torch.zeros(batch, length, 3, device=device)


def timestep_embedding(t: Tensor, dim: int = 256, max_period: float = 10000.0, factor: float = 1000.0) -> Tensor:
    """Sinusoidal embedding [cos, sin] of factor * t: (b,) -> (b, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = (factor * t)[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb.to(t.dtype) if t.is_floating_point() else emb


def rope(ids: Tensor, axes_dim: list[int], theta: float, layout: str) -> Tensor:
    """RoPE table `pe` (b, 1, l, sum(axes_dim)/2, 2) for positions ids (b, l, len(axes_dim)).

    Each axis takes a block of frequencies theta^(-2k/d_axis); the blocks are concatenated in axis order.
    Angles are float32 for rotate_half and float64 for interleaved, as the release and Flux compute them.
    """
    dtype = torch.float32 if layout == "rotate_half" else torch.float64
    angles = []
    for i, d in enumerate(axes_dim):
        scale = torch.arange(0, d, 2, dtype=dtype, device=ids.device) / d
        omega = 1.0 / (theta**scale)
        angles.append(ids[..., i].to(dtype)[..., None] * omega)
    a = torch.cat(angles, dim=-1)
    return torch.stack([torch.cos(a), torch.sin(a)], dim=-1).float()[:, None]


def apply_rope(x: Tensor, pe: Tensor, layout: str) -> Tensor:
    """Rotate (b, heads, l, d) by `pe`: pairs (i, i + d/2) for rotate_half, (2i, 2i + 1) for interleaved."""
    cos, sin = pe[..., 0], pe[..., 1]
    xf = x.float()
    if layout == "rotate_half":
        x1, x2 = xf.chunk(2, dim=-1)
        out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    elif layout == "interleaved":
        x1, x2 = rearrange(xf, "... (d two) -> two ... d", two=2)
        out = rearrange([x1 * cos - x2 * sin, x1 * sin + x2 * cos], "two ... d -> ... (d two)")
    else:
        raise ValueError(f"unknown RoPE layout {layout!r}, expected one of {ROPE_LAYOUTS}")
    return out.type_as(x)


def rms_norm_plain(x: Tensor, scale: Tensor, eps: float = 1e-6) -> Tensor:
    """RMSNorm over the last dim, normalised in float32 and cast back before the gain."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.square().mean(dim=-1, keepdim=True) + eps)).to(x.dtype) * scale


# Fused RMSNorm: Liger-Kernel's Triton kernel (`liger_kernel`, optional) on CUDA tensors whose gain has their dtype,
# in its "llama" casting mode, which is `rms_norm_plain`'s arithmetic (float32 statistics, cast back, then the
# gain) in one kernel forward and one backward. Inside torch.compile the plain path runs (Inductor fuses it).
# CINEDIT_FUSED=0 turns fused kernels off.
@functools.cache
def liger_rms_norm():
    """Liger-Kernel's RMSNorm autograd function, or None when the package (or its Triton) is not installed."""
    try:
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction
    except ImportError:
        return None
    return LigerRMSNormFunction.apply


def fused_enabled() -> bool:
    value = os.environ.get("CINEDIT_FUSED", "1")
    if value not in ("0", "1"):
        raise ValueError(f"CINEDIT_FUSED={value!r}: use 1 (fused kernels where installed, the default) or 0 (off)")
    return value == "1"


def rms_norm_backend(x: Tensor, scale: Tensor) -> str:
    """The kernel `rms_norm` uses for these tensors: "liger" or "plain"."""
    fused = x.is_cuda and scale.dtype == x.dtype and not torch.compiler.is_compiling()
    return "liger" if fused and fused_enabled() and liger_rms_norm() is not None else "plain"


def rms_norm(x: Tensor, scale: Tensor, eps: float = 1e-6) -> Tensor:
    """RMSNorm over the last dim (`rms_norm_plain`), through the fused kernel where one is at hand."""
    if rms_norm_backend(x, scale) == "liger":
        shape = x.shape
        return liger_rms_norm()(x.reshape(-1, shape[-1]), scale, eps, 0.0, "llama", False).reshape(shape)
    return rms_norm_plain(x, scale, eps)


# Attention kernels for CUDA tensors in bf16 / fp16, fastest first: FlashAttention-3 (`flash_attn_interface`, Hopper
# GPUs), FlashAttention-2 (`flash_attn`), then PyTorch's SDPA preferring cuDNN, then flash, then memory-efficient.
# fp32 and CPU tensors take SDPA. CINEDIT_ATTENTION=fa3|fa2|sdpa forces one (a missing package is an error).
ATTENTION_BACKENDS = {"fa3": "flash_attn_interface", "fa2": "flash_attn", "sdpa": ""}
CUDA_SDPA_ORDER = (
    SDPBackend.CUDNN_ATTENTION,
    SDPBackend.FLASH_ATTENTION,
    SDPBackend.EFFICIENT_ATTENTION,
    SDPBackend.MATH,
)


@functools.cache
def flash_function(backend: str):
    """`flash_attn_func` of a FlashAttention package (`ATTENTION_BACKENDS`), or None when it is not installed."""
    try:
        return importlib.import_module(ATTENTION_BACKENDS[backend]).flash_attn_func
    except (ImportError, AttributeError):
        return None


def attention_backend(device_type: str, dtype: torch.dtype) -> str:
    """The kernel `attention` uses for tensors on `device_type` of `dtype`: fa3, fa2 or sdpa."""
    forced = os.environ.get("CINEDIT_ATTENTION", "")
    if forced:
        if forced not in ATTENTION_BACKENDS:
            raise ValueError(f"CINEDIT_ATTENTION={forced!r}: use one of {sorted(ATTENTION_BACKENDS)}")
        if forced != "sdpa" and flash_function(forced) is None:
            raise ValueError(f"CINEDIT_ATTENTION={forced}: the package {ATTENTION_BACKENDS[forced]} is not installed")
        return forced
    if device_type == "cuda" and dtype in (torch.bfloat16, torch.float16):
        for backend in ("fa3", "fa2"):
            if flash_function(backend) is not None:
                return backend
    return "sdpa"


def flash_attention(fn, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """A FlashAttention `flash_attn_func` on (b, heads, l, d) tensors -> (b, l, heads*d); it takes (b, l, heads, d)."""
    out = fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    out = out[0] if isinstance(out, tuple) else out  # some FA3 releases also return the log-sum-exp
    return rearrange(out, "b l n d -> b l (n d)")


def attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Full non-causal attention with scale 1/sqrt(d): (b, heads, l, d) -> (b, l, heads*d), through the fastest
    kernel at hand (`attention_backend`).

    Blocks call this through the module (`math.attention`), so context parallelism swaps this one function.
    """
    backend = attention_backend(q.device.type, q.dtype)
    if backend != "sdpa":
        return flash_attention(flash_function(backend), q, k, v)
    if q.is_cuda and not torch.compiler.is_compiling():
        with sdpa_kernel(list(CUDA_SDPA_ORDER), set_priority=True):
            x = F.scaled_dot_product_attention(q, k, v)
    else:
        x = F.scaled_dot_product_attention(q, k, v)
    return rearrange(x, "b n l d -> b l (n d)")
