"""Tiled encoding and decoding for the Video DC-AE: overlapping tiles in T, H and W, blended with linear ramps.

Tiles are planned in latent units (32 px, 4 frames), so every tile is a valid model input and tile borders fall on
latent positions. Each tile's output is written straight into one output buffer with separable blend weights that sum
to 1 along every axis, so only one model call's activations are alive at a time.

Memory bound: besides the input and the output (one buffer, in at least fp32), tiled encode / decode holds the
activations of one model call, and a call sees at most max(one tile, `TILE_BATCH_VOXELS` input or output voxels):
a constant for a given model and config, independent of the clip's length and resolution. Small tiles are batched
(`TilingConfig.tile_batch`, automatic by default) up to that volume: all tiles of a plan have the same shape, and a
batch of one is much slower on the CPU (PyTorch runs a small-batch Conv3d with few channels on its slow im2col
path instead of oneDNN), which made tiling 3-5x slower per pixel than untiled there.

Tokenizers with `native_tiling` (the HunyuanVideo VAE and the Flux AE) tile themselves, as their reference does:
`encode`, `decode` and `chunked_latents` hand them the whole input (cutting a causal VAE's clip by frames would
re-start its causal context at every chunk).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from einops import rearrange
from torch import Tensor
from tqdm.auto import tqdm

SPATIAL_UNIT = 32
TEMPORAL_UNIT = 4
PROGRESS_MIN_TILES = 8
# Automatic tile batching fills a model call with whole tiles up to this many voxels (frames x pixels): two 8-frame
# 256 px tiles, or one 32-frame one (the release tile, which runs alone as before).
TILE_BATCH_VOXELS = 2 * 8 * 256 * 256


class Autoencoder(Protocol):
    """What tiling needs from a tokenizer (VideoDCAE, or anything shaped like it)."""

    spatial_compression: int
    temporal_compression: int

    def encode(self, x: Tensor) -> Tensor: ...

    def decode(self, z: Tensor, num_frames: int | None = None) -> Tensor: ...


@dataclass
class TilingConfig:
    """Tile sizes in pixels and frames, overlap as a fraction of a tile, and when to tile.

    `enabled` None tiles only inputs with H or W above `threshold_pixels` or T above `threshold_frames` (both default
    to the tile sizes); True always tiles, False never does. Overlaps are rounded to whole latent units (at least one
    when `overlap` > 0 and the tile spans more than one latent unit). `tile_batch` tiles go through the model per
    call (None: as many as fit in `TILE_BATCH_VOXELS`, at least one); it changes speed and memory, not the plan.
    """

    spatial_tile: int = 256
    temporal_tile: int = 32
    overlap: float = 0.25
    enabled: bool | None = None
    threshold_pixels: int | None = None
    threshold_frames: int | None = None
    progress: bool = True
    tile_batch: int | None = None

    def __post_init__(self) -> None:
        if self.threshold_pixels is None:
            self.threshold_pixels = self.spatial_tile
        if self.threshold_frames is None:
            self.threshold_frames = self.temporal_tile
        self.validate()

    def validate(self) -> None:
        """Raise ValueError on tile sizes the model cannot take or an overlap outside [0, 0.5)."""
        if self.spatial_tile < SPATIAL_UNIT or self.spatial_tile % SPATIAL_UNIT:
            raise ValueError(f"spatial_tile must be a positive multiple of {SPATIAL_UNIT} px, got {self.spatial_tile}")
        if self.temporal_tile < TEMPORAL_UNIT or self.temporal_tile % TEMPORAL_UNIT:
            raise ValueError(
                f"temporal_tile must be a positive multiple of {TEMPORAL_UNIT} frames, got {self.temporal_tile}"
            )
        if not 0 <= self.overlap < 0.5:
            raise ValueError(f"overlap must be in [0, 0.5) of a tile, got {self.overlap}")
        if self.enabled not in (None, True, False):
            raise ValueError(f"enabled must be None (automatic), True or False, got {self.enabled!r}")
        if self.tile_batch is not None and self.tile_batch < 1:
            raise ValueError(f"tile_batch must be None (automatic) or positive, got {self.tile_batch}")
        for name in ("threshold_pixels", "threshold_frames"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")

    def should_tile(self, num_frames: int, height: int, width: int) -> bool:
        """Whether an input (or output) of this pixel size is tiled under this config."""
        if self.enabled is not None:
            return self.enabled
        return max(height, width) > self.threshold_pixels or num_frames > self.threshold_frames


def overlap_units(tile: int, overlap: float) -> int:
    """Overlap in whole units for a tile of `tile` units: nearest, at least 1 if overlap > 0, below the tile."""
    if overlap <= 0:
        return 0
    return min(max(int(overlap * tile + 0.5), 1), tile - 1)


def tile_starts(size: int, tile: int, overlap: int, multiple: int = 1) -> list[int]:
    """Starts of tiles of length min(tile, size) covering [0, size), evenly spread, neighbours sharing >= overlap.

    All lengths are in the same units and multiples of `multiple`; so are the starts. The first tile starts at 0 and
    the last one ends at `size`.
    """
    for name, value in (("size", size), ("tile", tile), ("overlap", overlap)):
        if value < 0 or value % multiple:
            raise ValueError(f"{name} must be a non-negative multiple of {multiple}, got {value}")
    if tile <= 0 or size <= 0:
        raise ValueError(f"size and tile must be positive, got size={size}, tile={tile}")
    if overlap >= tile:
        raise ValueError(f"overlap {overlap} must be smaller than the tile {tile}")
    if size <= tile:
        return [0]
    n, t, stride = size // multiple, tile // multiple, (tile - overlap) // multiple
    gaps = -(-(n - t) // stride)
    # Rounded even spacing: every gap is at most ceil((n - t) / gaps) <= stride, so overlaps never shrink.
    return [(i * (n - t) + gaps // 2) // gaps * multiple for i in range(gaps + 1)]


def blend_weights(size: int, starts: list[int], length: int) -> list[Tensor]:
    """Per-tile 1-D weights (float64, `length` long), ramping linearly across overlaps, summing to 1 everywhere."""
    raw = []
    for i, start in enumerate(starts):
        w = torch.ones(length, dtype=torch.float64)
        if i > 0 and (r := starts[i - 1] + length - start) > 0:
            w[:r] = torch.minimum(w[:r], (torch.arange(r, dtype=torch.float64) + 0.5) / r)
        if i < len(starts) - 1 and (r := start + length - starts[i + 1]) > 0:
            w[length - r :] = torch.minimum(w[length - r :], (torch.arange(r, 0, -1, dtype=torch.float64) - 0.5) / r)
        raw.append(w)
    total = torch.zeros(size, dtype=torch.float64)
    for start, w in zip(starts, raw):
        total[start : start + length] += w
    if (total <= 0).any():
        raise ValueError(f"tiles {starts} of length {length} do not cover an axis of size {size}")
    return [w / total[start : start + length] for start, w in zip(starts, raw)]


@dataclass(frozen=True)
class _Axis:
    """One of (t, h, w): tiles planned in latent units, with the input and output sizes of one latent unit."""

    size: int
    starts: list[int]
    length: int
    in_unit: int
    out_unit: int


def _plan_axis(size: int, tile: int, overlap: float, in_unit: int, out_unit: int) -> _Axis:
    tile = min(tile, size)
    return _Axis(size, tile_starts(size, tile, overlap_units(tile, overlap)), tile, in_unit, out_unit)


def _tile_batch(cfg: TilingConfig, axes: list[_Axis], out_side: bool) -> int:
    """Tiles per model call: the config's, or as many as fit in TILE_BATCH_VOXELS of pixel-space volume."""
    if cfg.tile_batch is not None:
        return cfg.tile_batch
    voxels = math.prod(a.length * (a.out_unit if out_side else a.in_unit) for a in axes)
    return max(1, TILE_BATCH_VOXELS // voxels)


def _run_tiles(fn: Callable[[Tensor], Tensor], x: Tensor, axes: list[_Axis], progress: bool, batch: int = 1) -> Tensor:
    """Apply fn to every tile of x (b, c, t, h, w), `batch` tiles per call, and blend the results into one buffer."""
    weights = [
        blend_weights(a.size * a.out_unit, [s * a.out_unit for s in a.starts], a.length * a.out_unit) for a in axes
    ]
    grid = list(itertools.product(*(range(len(a.starts)) for a in axes)))
    out, out_dtype, b = None, None, x.shape[0]
    bar = tqdm(total=len(grid), desc="tiles", leave=False, disable=not progress or len(grid) < PROGRESS_MIN_TILES)
    for first in range(0, len(grid), batch):
        group = grid[first : first + batch]
        srcs = [
            x[(..., *(slice(a.starts[i] * a.in_unit, (a.starts[i] + a.length) * a.in_unit) for a, i in zip(axes, idx)))]
            for idx in group
        ]
        # Every tile of a plan has the same shape, so tiles stack along the batch; one tile goes in as a view.
        ys = fn(srcs[0] if len(srcs) == 1 else torch.cat(srcs))
        del srcs
        if out is None:
            out_dtype = ys.dtype
            # Accumulate in at least fp32 so bf16 tiles do not lose precision in the sums.
            acc = torch.promote_types(ys.dtype, torch.float32)
            out = ys.new_zeros((b, ys.shape[1], *(a.size * a.out_unit for a in axes)), dtype=acc)
            weights = [[wi.to(out) for wi in w] for w in weights]  # once, not per tile
        for k, idx in enumerate(group):
            wt, wh, ww = (w[i] for w, i in zip(weights, idx))
            w = rearrange(wt, "t -> t 1 1") * rearrange(wh, "h -> h 1") * ww
            dst = tuple(
                slice(a.starts[i] * a.out_unit, (a.starts[i] + a.length) * a.out_unit) for a, i in zip(axes, idx)
            )
            out[(..., *dst)].addcmul_(ys[k * b : (k + 1) * b].to(out.dtype), w)
        del ys
        bar.update(len(group))
    bar.close()
    return out.to(out_dtype)


def _check_tiles(model: Autoencoder, cfg: TilingConfig) -> tuple[int, int]:
    s, tc = model.spatial_compression, model.temporal_compression
    if cfg.spatial_tile % s or cfg.temporal_tile % tc:
        raise ValueError(
            f"tiles of {cfg.spatial_tile} px / {cfg.temporal_tile} frames are not multiples of the model's "
            f"compression ({s} px, {tc} frames)"
        )
    return s, tc


def tiled_encode(model: Autoencoder, x: Tensor, cfg: TilingConfig) -> Tensor:
    """model.encode(x) for x (b, c, t, h, w), computed tile by tile; t = 1 (an image) is tiled in space only."""
    s, tc = _check_tiles(model, cfg)
    if x.ndim != 5:
        raise ValueError(f"expected (b, c, t, h, w), got {tuple(x.shape)}")
    t, h, w = x.shape[2:]
    if h % s or w % s or (t != 1 and t % tc):
        raise ValueError(f"tiled encode needs H, W multiples of {s} and T = 1 or a multiple of {tc}, got {t}x{h}x{w}")
    tu = 1 if t == 1 else tc
    axes = [
        _plan_axis(t // tu, cfg.temporal_tile // tc if t > 1 else 1, cfg.overlap, tu, 1),
        _plan_axis(h // s, cfg.spatial_tile // s, cfg.overlap, s, 1),
        _plan_axis(w // s, cfg.spatial_tile // s, cfg.overlap, s, 1),
    ]
    return _run_tiles(model.encode, x, axes, cfg.progress, _tile_batch(cfg, axes, out_side=False))


def _is_video(z: Tensor, tc: int, num_frames: int | None) -> bool:
    """Whether latents z decode to a video (True) or an image, checking num_frames like VideoDCAE.decode."""
    t = z.shape[2]
    if num_frames is None:
        return t > 1
    if num_frames != t * tc and not (t == 1 and num_frames == 1):
        allowed = f"1 or {t * tc}" if t == 1 else str(t * tc)
        raise ValueError(f"{t} latent frames decode to num_frames={allowed}, got {num_frames}")
    return num_frames > 1


def tiled_decode(model: Autoencoder, z: Tensor, cfg: TilingConfig, num_frames: int | None = None) -> Tensor:
    """model.decode(z, num_frames) for latents z (b, c, t, h, w), computed tile by tile in latent units."""
    s, tc = _check_tiles(model, cfg)
    if z.ndim != 5:
        raise ValueError(f"expected latents (b, c, t, h, w), got {tuple(z.shape)}")
    video = _is_video(z, tc, num_frames)
    t, h, w = z.shape[2:]
    tu = tc if video else 1
    axes = [
        _plan_axis(t, cfg.temporal_tile // tc if video else 1, cfg.overlap, 1, tu),
        _plan_axis(h, cfg.spatial_tile // s, cfg.overlap, 1, s),
        _plan_axis(w, cfg.spatial_tile // s, cfg.overlap, 1, s),
    ]
    fn = lambda tile: model.decode(tile, num_frames=tile.shape[2] * tu)
    return _run_tiles(fn, z, axes, cfg.progress, _tile_batch(cfg, axes, out_side=True))


UNTILED_PIXELS = 1 << 15  # a spatial tile no input reaches: space is never cut


def frame_chunks(frames: int, overlap: float = 0.25) -> TilingConfig:
    """Temporal tiles only: clips longer than `frames` are encoded (or decoded) `frames` at a time, overlaps blended.

    Activation memory then grows with `frames`, not with the clip length, so long training clips fit; space is left
    whole because spatial tiles change what the global linear attention sees far more than temporal ones.
    """
    return TilingConfig(
        spatial_tile=UNTILED_PIXELS,
        temporal_tile=frames,
        overlap=overlap,
        threshold_pixels=UNTILED_PIXELS,
        progress=False,
    )


def encode(model: Autoencoder, x: Tensor, cfg: TilingConfig | None = None) -> Tensor:
    """model.encode(x), tiled when x exceeds the config's thresholds (or tiling is forced on)."""
    cfg = TilingConfig() if cfg is None else cfg
    if getattr(model, "native_tiling", False):
        return model.encode(x)
    if x.ndim == 5 and cfg.should_tile(*x.shape[2:]):
        return tiled_encode(model, x, cfg)
    return model.encode(x)


def decode(model: Autoencoder, z: Tensor, cfg: TilingConfig | None = None, num_frames: int | None = None) -> Tensor:
    """model.decode(z, num_frames), tiled when the decoded size exceeds the config's thresholds (or forced on)."""
    cfg = TilingConfig() if cfg is None else cfg
    if getattr(model, "native_tiling", False):
        return model.decode(z, num_frames)
    if z.ndim == 5:
        frames = z.shape[2] * model.temporal_compression if _is_video(z, model.temporal_compression, num_frames) else 1
        s = model.spatial_compression
        if cfg.should_tile(frames, z.shape[3] * s, z.shape[4] * s):
            return tiled_decode(model, z, cfg, num_frames)
    return model.decode(z, num_frames)


def chunked_latents(model: Any, x: Tensor, frames: int) -> Tensor:
    """`model.encode_latents(x)` (scaled, as the generator sees latents) computed `frames` frames at a time; a model
    with `native_tiling` encodes the whole clip itself."""
    if getattr(model, "native_tiling", False):
        return model.encode_latents(x)
    z = encode(model, x, frame_chunks(frames))
    return z if model.scaling_factor is None else z / model.scaling_factor
