"""Resolution x frame-count x aspect-ratio buckets: which (T, H, W) a sample is trained at.

Rules (DESIGN.md 'data, buckets, stages'), applied per sample by `Bucketer`:

1. Resolutions are tried from the highest down. A sample may use resolution `Npx` when its pixel
   count is at most `tolerance` smaller than N**2: ``h * w >= (1 - tolerance) * N**2``.
2. Within a resolution the sample goes to the largest frame count it covers. A video covers T
   frames when it has at least T frames at its stride, ``(num_frames - 1) // stride + 1 >= T``, with
   stride ``ceil(fps / 24)`` or the configured one. Images (num_frames 1) only go to the frame-1
   entry, videos only to entries above 1. A resolution with no fitting entry is skipped.
3. The chosen entry keeps the sample with its keep_prob, by a draw that depends only on (seed,
   sample index, bucket), so every rank computes the same assignment. A sample not kept falls to
   the next lower resolution (back to rule 1); past the lowest it is dropped (None).
4. The (H, W) is that resolution's table size whose aspect ratio (h / w) is closest in log space.
   Ratios are those of the rounded sizes, so a bucket's own shape maps to itself (which cached
   latents, encoded at bucket shapes, rely on).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd

from cinedit.configs.data import BucketConfig, resolution_side
from cinedit.data.video import frame_stride

# width:height of landscape frames; their transposes give the portrait ones.
ASPECT_RATIOS: tuple[tuple[float, float], ...] = (
    (1, 1),
    (5, 4),
    (4, 3),
    (3, 2),
    (8, 5),
    (16, 9),
    (1.85, 1),
    (2, 1),
    (2.39, 1),
)

_MASK64 = (1 << 64) - 1


@dataclass(frozen=True)
class Bucket:
    """One batchable shape: a resolution name, a frame count and a (height, width)."""

    resolution: str
    num_frames: int
    height: int
    width: int

    @property
    def shape(self) -> tuple[int, int, int]:
        """(T, H, W)."""
        return self.num_frames, self.height, self.width


def _round_to(x: float, multiple: int) -> int:
    # Half rounds up (not to even) so sizes do not depend on Python's banker's rounding.
    return max(multiple, int(math.floor(x / multiple + 0.5)) * multiple)


def aspect_sizes(side: int, multiple: int = 32) -> dict[float, tuple[int, int]]:
    """{h / w: (H, W)} per aspect ratio and transpose at about side**2 pixels, sides multiples of `multiple`."""
    out: dict[float, tuple[int, int]] = {}
    for w, h in ASPECT_RATIOS:
        for ratio in {h / w, w / h}:
            out[ratio] = (_round_to(side * math.sqrt(ratio), multiple), _round_to(side / math.sqrt(ratio), multiple))
    return dict(sorted(out.items()))


def _mix(*values: np.ndarray | int) -> np.ndarray:
    """A 64-bit hash (splitmix64 steps) of integers and integer arrays, elementwise with broadcasting."""
    x = np.zeros(1, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for v in values:
            v = v.astype(np.uint64) if isinstance(v, np.ndarray) else np.uint64(int(v) & _MASK64)
            x = (x ^ v) + np.uint64(0x9E3779B97F4A7C15)
            x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
            x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
            x = x ^ (x >> np.uint64(31))
    return x


def mix_seed(*values: int) -> int:
    """Derive a non-negative 63-bit seed from integers (e.g. seed, epoch, index)."""
    return int(_mix(*values)[0] >> np.uint64(1))


def uniform(seed: int, index: np.ndarray | int, salt: np.ndarray | int) -> np.ndarray:
    """Deterministic draws in [0, 1) per (seed, index, salt); the same on every rank and machine."""
    salt = salt if isinstance(salt, int) else np.asarray(salt, dtype=np.int64)
    x = _mix(seed, np.atleast_1d(np.asarray(index, dtype=np.int64)), salt)
    return (x >> np.uint64(11)).astype(np.float64) * 2.0**-53


class Bucketer:
    """Assigns samples to `Bucket`s following the module rules, for one `BucketConfig`.

    `buckets` lists every possible bucket; vectorised assignment returns positions in that list
    (-1 for dropped samples), which keeps per-epoch assignment of millions of rows cheap.
    """

    def __init__(self, config: BucketConfig, frame_stride: int = 0):
        config.validate()
        if frame_stride < 0:
            raise ValueError(f"frame_stride must be >= 0 (0 means ceil(fps / 24)), got {frame_stride}")
        self.config = config
        self.frame_stride = frame_stride
        # Highest resolution first: rule 1 tries them in this order.
        self.resolutions = sorted(config.table, key=resolution_side, reverse=True)
        self.sizes = {res: aspect_sizes(resolution_side(res), config.multiple) for res in self.resolutions}
        self.buckets: list[Bucket] = []
        # Distinct (H, W) per resolution: at small sides several ratios round to the same size.
        self._hw = {
            res: np.array(sorted(set(self.sizes[res].values()), key=lambda hw: hw[0] / hw[1]))
            for res in self.resolutions
        }
        self._log_ratios = {res: np.log(hw[:, 0] / hw[:, 1]) for res, hw in self._hw.items()}
        # Per resolution: its frame counts (ascending), their keep probs and draw salts, and the bucket
        # code of each (frame count, distinct size).
        self._ts: dict[str, np.ndarray] = {}
        self._keep: dict[str, np.ndarray] = {}
        self._salt: dict[str, np.ndarray] = {}
        self._code_table: dict[str, np.ndarray] = {}
        for res in self.resolutions:
            ts = sorted(config.table[res])
            self._ts[res] = np.array(ts, dtype=np.int64)
            self._keep[res] = np.array([config.table[res][t][0] for t in ts])
            self._salt[res] = np.array([zlib.crc32(f"{res}/{t}".encode()) for t in ts], dtype=np.int64)
            first = len(self.buckets)
            self._code_table[res] = np.arange(first, first + len(ts) * len(self._hw[res])).reshape(len(ts), -1)
            self.buckets += [Bucket(res, t, int(h), int(w)) for t in ts for h, w in self._hw[res]]

    def batch_size(self, bucket: Bucket) -> int:
        """Samples per GPU for this bucket."""
        return self.config.table[bucket.resolution][bucket.num_frames][1]

    def keep_prob(self, bucket: Bucket) -> float:
        """Probability that a sample reaching this bucket stays in it."""
        return self.config.table[bucket.resolution][bucket.num_frames][0]

    def strides(self, fps: np.ndarray) -> np.ndarray:
        """Temporal stride per sample: the configured one, else ceil(fps / 24) as `read_video` uses."""
        fps = np.asarray(fps, dtype=np.float64)
        if self.frame_stride:
            return np.full(fps.shape, self.frame_stride, dtype=np.int64)
        uniq, inv = np.unique(fps, return_inverse=True)
        return np.array([frame_stride(float(f)) for f in uniq], dtype=np.int64)[inv.reshape(fps.shape)]

    def assign_codes(
        self,
        height: np.ndarray,
        width: np.ndarray,
        num_frames: np.ndarray,
        fps: np.ndarray,
        index: np.ndarray | None = None,
        seed: int = 0,
        stride: np.ndarray | None = None,
    ) -> np.ndarray:
        """Bucket code (position in `buckets`, -1 = dropped) for each sample, vectorised.

        Args:
            index: the samples' indices for the keep draws (default 0..n-1).
            stride: per-sample temporal stride overriding `strides(fps)` (e.g. 1 for pre-strided caches).
        """
        h = np.asarray(height, dtype=np.int64)
        w = np.asarray(width, dtype=np.int64)
        n = np.asarray(num_frames, dtype=np.int64)
        index = np.arange(len(h)) if index is None else np.asarray(index, dtype=np.int64)
        stride = self.strides(fps) if stride is None else np.asarray(stride, dtype=np.int64)
        is_image = n <= 1
        avail = np.where(is_image, 1, (n - 1) // np.maximum(stride, 1) + 1)
        pixels = h * w
        log_ratio = np.log(np.maximum(h, 1) / np.maximum(w, 1))
        codes = np.full(len(h), -1, dtype=np.int64)
        tol = self.config.tolerance
        for res in self.resolutions:
            side = resolution_side(res)
            sel = np.flatnonzero((codes < 0) & (pixels >= (1 - tol) * side * side))
            if not len(sel):
                continue
            ts = self._ts[res]
            first_video = 1 if ts[0] == 1 else 0
            # Position in `ts` of the largest frame count covered: videos only above the image entry,
            # images only at it; -1 where the resolution has nothing for the sample.
            pos = np.searchsorted(ts, avail[sel], side="right") - 1
            pos = np.where(pos >= first_video, pos, -1)
            pos = np.where(is_image[sel], 0 if first_video else -1, pos)
            sel, pos = sel[pos >= 0], pos[pos >= 0]
            kept = uniform(seed, index[sel], self._salt[res][pos]) < self._keep[res][pos]
            sel, pos = sel[kept], pos[kept]
            aspect = np.abs(log_ratio[sel, None] - self._log_ratios[res][None, :]).argmin(axis=1)
            codes[sel] = self._code_table[res][pos, aspect]
        return codes

    def assign_meta(self, meta: pd.DataFrame, seed: int = 0) -> np.ndarray:
        """Bucket codes for every row of a metadata table (its row positions are the sample indices).

        A `frame_stride` column, when present, gives per-row strides (caches store pre-strided clips).
        """
        missing = [c for c in ("height", "width", "num_frames", "fps") if c not in meta.columns]
        if missing:
            raise ValueError(f"metadata lacks columns {missing} needed for bucketing; re-run `cinedit data index`")
        stride = meta["frame_stride"].to_numpy() if "frame_stride" in meta.columns else None
        return self.assign_codes(
            meta["height"].to_numpy(),
            meta["width"].to_numpy(),
            meta["num_frames"].to_numpy(),
            meta["fps"].to_numpy(dtype=np.float64),
            seed=seed,
            stride=stride,
        )

    def assign(self, row: Mapping | pd.Series, index: int = 0, seed: int = 0) -> Bucket | None:
        """The bucket of one sample (a row with height, width, num_frames, fps), or None if dropped."""
        stride = [row["frame_stride"]] if "frame_stride" in row else None
        code = self.assign_codes(
            [row["height"]], [row["width"]], [row["num_frames"]], [float(row["fps"])], [index], seed, stride
        )[0]
        return None if code < 0 else self.buckets[code]


def assign(
    row: Mapping | pd.Series, config: BucketConfig, index: int = 0, seed: int = 0, frame_stride: int = 0
) -> Bucket | None:
    """The bucket of one sample under `config` (see the module rules), or None if it is dropped."""
    return Bucketer(config, frame_stride).assign(row, index, seed)
