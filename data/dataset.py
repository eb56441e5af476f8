"""Map-style datasets indexed by sampler items ``(index, num_frames, height, width[, seed])``.

`VideoDataset` decodes pixels at the item's bucket shape; `CachedLatentDataset` returns latents and
text embeddings from a `cinedit data cache` folder. Both take the same items and expose a `.meta`
table for the sampler, so training swaps one for the other.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from cinedit.configs.core import ConfigError
from cinedit.configs.data import DataConfig
from cinedit.data.cache import CacheReader
from cinedit.data.captions import check_motion_scores, training_caption
from cinedit.data.meta import read_meta
from cinedit.data.video import MediaCache, MediaError, frame_stride, num_sampled_frames, read_video

# Tensors that may differ in length within a batch (text tokens): right-padded, with a `<key>_mask`.
PADDED_KEYS = ("txt",)


def _unpack(item: Sequence[int]) -> tuple[int, int, int, int, int]:
    if isinstance(item, (int, np.integer)):
        raise TypeError(
            f"dataset items are (index, num_frames, height, width[, seed]) from BucketBatchSampler, got the bare "
            f"index {item}; build batches with cinedit.data.sampler.BucketBatchSampler"
        )
    if len(item) not in (4, 5):
        raise TypeError(f"expected an item (index, num_frames, height, width[, seed]), got {item!r}")
    index, t, h, w = (int(v) for v in item[:4])
    seed = int(item[4]) if len(item) == 5 else index
    return index, t, h, w, seed


class VideoDataset(Dataset):
    """Clips decoded at their bucket's (T, H, W): stride from fps, seeded random temporal crop, fill + centre crop.

    The caption is the row's `text`, with the motion-score suffix when `config.motion_score_suffix` is on
    (`cinedit.data.captions.training_caption`).

    `controls` names meta columns of control videos (`cinedit data control`, `control_<kind>`): each is read with the
    clip's temporal indices (the same seeded start, stride and frame count), resize-to-fill and centre crop, and
    stacked as `control` (K, C, T, H, W). A control video must have its clip's frame count and aspect ratio.
    """

    def __init__(
        self,
        meta: pd.DataFrame | str | os.PathLike,
        config: DataConfig | None = None,
        replace_bad: bool = False,
        controls: Sequence[str] = (),
    ):
        self.meta = read_meta(meta) if isinstance(meta, (str, os.PathLike)) else meta.reset_index(drop=True)
        self.config = config or DataConfig()
        self.config.validate()
        if self.config.motion_score_suffix:
            source = str(meta) if isinstance(meta, (str, os.PathLike)) else self.config.meta or "the meta table"
            check_motion_scores(self.meta.columns, source)
        self.controls = list(controls)
        missing = [c for c in self.controls if c not in self.meta.columns]
        if missing:
            source = str(meta) if isinstance(meta, (str, os.PathLike)) else self.config.meta or "META"
            kinds = [c.removeprefix("control_") for c in missing]
            raise ConfigError(
                f"{source} has no column {', '.join(missing)} (control videos): make them with "
                + " and ".join(f"`cinedit data control {source} --kind {k} --out DIR`" for k in kinds)
                + " and train on DIR's meta file"
            )
        # Training (replace_bad): an unreadable sample is reported and replaced (`_candidates`), so a step keeps its
        # shape; elsewhere (caching, evaluation) it raises MediaError for the caller to report and skip.
        self.replace_bad = replace_bad
        self.bad: set[int] = set()  # indices found unreadable (per process: each loader worker keeps its own)
        mb = self.config.decode_cache_mb
        self.cache = MediaCache(mb * 2**20) if mb else None  # per process too (a pickled cache starts empty)

    def __len__(self) -> int:
        return len(self.meta)

    def stride(self, fps: float) -> int:
        """Temporal stride of a sample: the configured one, else ceil(fps / 24)."""
        return self.config.frame_stride or frame_stride(fps)

    def __getitem__(self, item: Sequence[int]) -> dict[str, Any]:
        index, t, h, w, seed = _unpack(item)
        if not self.replace_bad:
            return self._read(index, t, h, w, seed)
        for candidate in self._candidates(index, t):
            try:
                return self._read(candidate, t, h, w, seed)
            except (MediaError, OSError) as e:
                self._bad_sample(candidate, e)
        raise ConfigError(f"no sample of the data can fill a {t}x{h}x{w} batch entry: every candidate is unreadable")

    def _read(self, index: int, t: int, h: int, w: int, seed: int) -> dict[str, Any]:
        row = self.meta.iloc[index]
        fps = float(row["fps"])
        stride = self.stride(fps)
        video = read_video(
            row["path"],
            num_frames=t,
            stride=stride,
            size=(h, w),
            rng=np.random.default_rng(seed),
            total_frames=int(row["num_frames"]) or None,
            cache=self.cache,
        )
        extra = {}
        if self.controls:
            extra["control"] = torch.stack([self._read_control(row, c, t, h, w, seed, stride) for c in self.controls])
        return {
            **extra,
            "video": video,  # (C, T, H, W) in [-1, 1]
            "text": training_caption(str(row["text"]), row, self.config.motion_score_suffix),
            "fps": fps / stride,
            "num_frames": t,
            "height": h,
            "width": w,
            "index": index,
            "path": str(row["path"]),
        }

    def _read_control(
        self, row: pd.Series, column: str, t: int, h: int, w: int, seed: int, stride: int
    ) -> torch.Tensor:
        """The row's control video in `column`, at the clip's frames: the same seeded start (from the row's frame
        count), stride, size and crop as `_read`."""
        path = row[column]
        if not isinstance(path, str) or not path:
            raise MediaError(f"{row['path']}: no control video in column {column!r}")
        control = read_video(
            path,
            num_frames=t,
            stride=stride,
            size=(h, w),
            rng=np.random.default_rng(seed),
            total_frames=int(row["num_frames"]) or None,
        )
        if control.shape[1] != t:
            raise MediaError(f"{path}: control has {control.shape[1]} frame(s), the clip {t}")
        return control

    def _candidates(self, index: int, t: int):
        """`index`, then (when it is unreadable) the next samples, in order and wrapping, that can fill a `t`-frame
        entry of the same bucket (an image for t = 1, a clip long enough at its stride otherwise): the same
        replacement on every run, so resuming stays exact."""
        yield index
        n = len(self.meta)
        for j in (index + k for k in range(1, n)):
            j %= n
            if j in self.bad:
                continue
            frames, fps = int(self.meta["num_frames"].iloc[j]), float(self.meta["fps"].iloc[j])
            if (t == 1 and frames == 1) or (t > 1 and num_sampled_frames(frames, self.stride(fps)) >= t):
                yield j

    def _bad_sample(self, index: int, error: Exception) -> None:
        """Report a sample that cannot be read, once, and stop when too much of the data is bad."""
        if index in self.bad:
            return
        self.bad.add(index)
        path = self.meta["path"].iloc[index]
        print(f"cinedit: skipped an unreadable sample ({len(self.bad)} so far): {path}: {error}", file=sys.stderr)
        limit = max(1, int(self.config.max_bad_fraction * len(self.meta)))
        if len(self.bad) > limit:
            raise ConfigError(
                f"{len(self.bad)} of {len(self.meta)} samples are unreadable (more than data.max_bad_fraction="
                f"{self.config.max_bad_fraction}), the last {path}: check the files, re-index them with `cinedit "
                f"data index` (and `data filter`), or raise --data.max_bad_fraction"
            )


class CachedLatentDataset(Dataset):
    """Latents (`latent`) and text embeddings (`txt`, optional pooled `vec`) from a cache written by `CacheWriter`.

    Each cache entry's meta holds the pixel shape the latent was encoded at (`num_frames`, `height`,
    `width`, pre-strided, so `frame_stride` is 1), `fps` and `text`; `.meta` lists them in the cache's
    key order, and the sampler buckets from that stored shape. Text embeddings may live in a separate
    cache (`text_dir`) under the same keys.
    """

    exact_shape = True  # latents cannot be resized: the sampler drops samples bucketed at another shape

    def __init__(self, cache_dir: str | os.PathLike, text_dir: str | os.PathLike | None = None):
        self.latents = CacheReader(cache_dir)
        self.texts = CacheReader(text_dir) if text_dir is not None else self.latents
        self.keys = self.latents.keys()
        rows = []
        for key in self.keys:
            m = self.latents.meta(key)
            missing = [c for c in ("num_frames", "height", "width") if c not in m]
            if missing:
                raise ValueError(f"{Path(cache_dir)}: entry {key!r} lacks meta {missing}; rebuild the cache")
            rows.append(
                {
                    "key": key,
                    "path": m.get("path", ""),
                    "text": m.get("text", ""),
                    "num_frames": int(m["num_frames"]),
                    "height": int(m["height"]),
                    "width": int(m["width"]),
                    "fps": float(m.get("fps", 0.0)),
                    "frame_stride": 1,
                }
            )
        columns = ["key", "path", "text", "num_frames", "height", "width", "fps", "frame_stride"]
        self.meta = pd.DataFrame(rows, columns=columns)

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, item: Sequence[int]) -> dict[str, Any]:
        index, t, h, w, _ = _unpack(item)
        key = self.keys[index]
        row = self.meta.iloc[index]
        if (t, h, w) != (row["num_frames"], row["height"], row["width"]):
            raise ValueError(
                f"cache entry {key!r} was encoded at (T, H, W) = {(row['num_frames'], row['height'], row['width'])} "
                f"but the sampler asked for {(t, h, w)}: sample from this dataset with its exact_shape (the default)"
            )
        out: dict[str, Any] = {"latent": self.latents.get(key, ["latent"])["latent"]}
        names = self.texts.tensor_names(key)
        out.update(self.texts.get(key, [n for n in ("txt", "vec") if n in names]))
        if "txt" not in out:
            raise KeyError(f"cache entry {key!r} has no 'txt' text embedding; cache text embeddings or pass text_dir")
        meta = {"text": str(row["text"]), "fps": float(row["fps"]), "num_frames": t, "height": h, "width": w}
        return {**out, **meta, "index": index}


def collate(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack tensors (equal shapes within a bucket; `txt` is right-padded with a `txt_mask`) and list the rest."""
    if not batch:
        raise ValueError("cannot collate an empty batch")
    out: dict[str, Any] = {}
    for key in batch[0]:
        values = [b[key] for b in batch]
        if not isinstance(values[0], torch.Tensor):
            out[key] = values
            continue
        shapes = {tuple(v.shape) for v in values}
        if len(shapes) == 1:
            out[key] = torch.stack(values)
        elif key in PADDED_KEYS and len({s[1:] for s in shapes}) == 1:
            length = max(s[0] for s in shapes)
            padded = values[0].new_zeros((len(values), length, *values[0].shape[1:]))
            mask = torch.zeros(len(values), length, dtype=torch.bool)
            for i, v in enumerate(values):
                padded[i, : len(v)] = v
                mask[i, : len(v)] = True
            out[key], out[f"{key}_mask"] = padded, mask
        else:
            raise ValueError(
                f"cannot stack {key!r} of shapes {sorted(shapes)}: a batch must come from one bucket "
                f"(use BucketBatchSampler)"
            )
    return out


class MockLatentDataset(Dataset):
    """Seeded random latents and text states for throughput runs: no file is read and nothing is encoded.

    `shapes` lists the pixel shapes (T, H, W) to make, `samples` of each; `latent_shape(T, H, W)` gives a sample's
    (C, t, h, w) latent (the tokenizer's rule). Sample i is drawn from a generator seeded by (seed, i), so it is the
    same in every worker, epoch and resumed run. Like cached latents, samples keep their exact shape.
    """

    exact_shape = True

    def __init__(
        self,
        shapes: Sequence[tuple[int, int, int]],
        samples: int,
        latent_shape: Any,
        text_tokens: int,
        text_dims: tuple[int, int],
        seed: int = 0,
        fps: float = 24.0,
    ):
        if not shapes or samples < 1:
            raise ValueError(f"mock data needs at least one shape and sample, got {len(shapes)} shapes x {samples}")
        self.latent_shape, self.text_tokens, self.text_dims, self.seed = latent_shape, text_tokens, text_dims, seed
        rows = [
            {"path": "", "text": "", "num_frames": t, "height": h, "width": w, "fps": fps, "frame_stride": 1}
            for t, h, w in shapes
            for _ in range(samples)
        ]
        self.meta = pd.DataFrame(rows, columns=["path", "text", "num_frames", "height", "width", "fps", "frame_stride"])

    def __len__(self) -> int:
        return len(self.meta)

    def __getitem__(self, item: Sequence[int]) -> dict[str, Any]:
        index, t, h, w, _ = _unpack(item)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        (txt_dim, vec_dim), row = self.text_dims, self.meta.iloc[index]
        return {
            "latent": torch.randn(self.latent_shape(t, h, w), generator=g),
            "txt": torch.randn(self.text_tokens, txt_dim, generator=g),
            "vec": torch.randn(vec_dim, generator=g),
            "text": "",
            "fps": float(row["fps"]),
            "num_frames": t,
            "height": h,
            "width": w,
            "index": index,
        }
