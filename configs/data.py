"""Data section of run configs: the metadata file, the bucket table and loader settings."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from cinedit.configs.core import ConfigError

# {resolution name: {num_frames: (keep_prob, batch_per_gpu)}}; num_frames 1 is the image bucket.
BucketTable = dict[str, dict[int, tuple[float, int]]]

_RES = re.compile(r"^(\d+)px$")


def resolution_side(name: str) -> int:
    """'256px' -> 256: a resolution name stands for about side**2 pixels."""
    m = _RES.match(name)
    if not m:
        raise ConfigError(f"resolution names look like '256px', got {name!r}")
    return int(m.group(1))


def frame_range(lo: int, hi: int, keep_prob: float, batch: int, step: int = 4) -> dict[int, tuple[float, int]]:
    """Bucket entries for every frame count lo, lo+step, ..., hi with one keep_prob and batch size."""
    return {t: (keep_prob, batch) for t in range(lo, hi + 1, step)}


@dataclass
class BucketConfig:
    """Resolution x frame-count buckets (DESIGN.md 'data, buckets, stages')."""

    table: BucketTable = field(default_factory=dict)
    # A sample may be up to this fraction smaller (in pixels) than a resolution and still use it.
    tolerance: float = 0.2
    # Bucket sides are multiples of this (the DC-AE's 32x spatial compression).
    multiple: int = 32
    # Video frame counts must be multiples of this (the DC-AE's 4x temporal compression); 1 = image.
    frame_multiple: int = 4

    def validate(self) -> None:
        if not self.table:
            raise ConfigError(
                "buckets.table is empty: give at least one {resolution: {num_frames: (keep_prob, batch)}}"
            )
        if not 0 <= self.tolerance < 1:
            raise ConfigError(f"buckets.tolerance must be in [0, 1), got {self.tolerance}")
        for res, frames in self.table.items():
            side = resolution_side(res)
            if side < self.multiple:
                raise ConfigError(f"buckets.table[{res}]: side {side} is below the size multiple {self.multiple}")
            if not frames:
                raise ConfigError(f"buckets.table[{res}] has no frame counts")
            for t, (keep, batch) in frames.items():
                if t < 1 or (t > 1 and t % self.frame_multiple):
                    raise ConfigError(
                        f"buckets.table[{res}][{t}]: video frame counts must be multiples of {self.frame_multiple} "
                        f"(1 is the image bucket)"
                    )
                if not 0 < keep <= 1:
                    raise ConfigError(f"buckets.table[{res}][{t}]: keep_prob must be in (0, 1], got {keep}")
                if batch < 1:
                    raise ConfigError(f"buckets.table[{res}][{t}]: batch size must be >= 1, got {batch}")


@dataclass
class DataConfig:
    """Where samples come from and how they are batched."""

    meta: str = ""  # CSV/Parquet written by `cinedit data index` / `filter`
    buckets: BucketConfig = field(default_factory=lambda: debug_buckets())
    frame_stride: int = 0  # 0: ceil(fps / 24)
    num_workers: int = 2
    prefetch_factor: int = 2
    seed: int = 42
    # Read latents and text embeddings from this cache (`cinedit data cache`) instead of decoding video.
    cache_dir: str = ""
    # A file that went bad after indexing (deleted, truncated, unreadable) is reported, skipped and replaced by the
    # next sample that fills the same bucket; more bad files than this share of the data (at least one is always
    # tolerated) stop the run.
    max_bad_fraction: float = 0.01
    # End each training caption with the release's " {round(motion_score)} motion score." (the meta's motion_score
    # column, written by `cinedit data score`), as the release trained.
    motion_score_suffix: bool = False
    # Keep decoded files in memory, up to this many MiB per process (`cinedit.data.video.MediaCache`), so a training
    # set read again and again is decoded once; 0: off. Frames are kept as decoded (YUV 4:2:0: 1.5 bytes a pixel).
    decode_cache_mb: int = 0

    def validate(self) -> None:
        if self.frame_stride < 0:
            raise ConfigError(f"data.frame_stride must be >= 0 (0 means ceil(fps/24)), got {self.frame_stride}")
        if self.num_workers < 0:
            raise ConfigError(f"data.num_workers must be >= 0, got {self.num_workers}")
        if self.decode_cache_mb < 0:
            raise ConfigError(f"data.decode_cache_mb must be >= 0 (0 turns the cache off), got {self.decode_cache_mb}")
        if not 0 <= self.max_bad_fraction <= 1:
            raise ConfigError(f"data.max_bad_fraction must be in [0, 1], got {self.max_bad_fraction}")
        if not isinstance(self.motion_score_suffix, bool):
            raise ConfigError(f"data.motion_score_suffix must be true or false, got {self.motion_score_suffix!r}")


def debug_buckets() -> BucketConfig:
    """Tiny buckets for CPU smoke runs and tests."""
    return BucketConfig(table={"64px": {1: (1.0, 4), 4: (1.0, 2), 8: (1.0, 2)}, "128px": {1: (1.0, 2), 8: (1.0, 1)}})


def stage1_buckets() -> BucketConfig:
    """256px text-to-video buckets of the first stage, DC-AE frame counts (multiples of 4 up to 128).

    Batch sizes per GPU are the release's for 8x H200 (DESIGN.md): 45 images, 12 / 6 / 4 / 3 videos
    for the four frame ranges, plus high-resolution images.
    """
    table: BucketTable = {
        "256px": {
            1: (1.0, 45),
            **frame_range(4, 32, 1.0, 12),
            **frame_range(36, 64, 1.0, 6),
            **frame_range(68, 96, 1.0, 4),
            **frame_range(100, 128, 1.0, 3),
        },
        "768px": {1: (0.5, 38)},
        "1024px": {1: (0.5, 20)},
    }
    return BucketConfig(table=table)


def stage3_buckets() -> BucketConfig:
    """768px buckets of the third stage (context parallel 4): videos 6 / 4 / 3 / 2 per GPU."""
    table: BucketTable = {
        "768px": {
            1: (1.0, 38),
            **frame_range(4, 32, 1.0, 6),
            **frame_range(36, 64, 1.0, 4),
            **frame_range(68, 96, 1.0, 3),
            **frame_range(100, 128, 1.0, 2),
        },
    }
    return BucketConfig(table=table)
