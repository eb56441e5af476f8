"""Sharded safetensors cache of per-sample tensors (latents, text embeddings) with a JSON index.

On disk: ``shard-00000.safetensors, shard-00001.safetensors, ...`` holding tensors named
``f"{key}/{name}"``, and ``index.json``::

    {"format": "cinedit-cache", "version": 1,
     "entries": {key: {"shard": "shard-00000.safetensors", "tensors": [name, ...], "meta": {...}}}}

Every file is written atomically (`cinedit.runtime.files`), shard first and index after, so a crash never
leaves an index that points at a missing or partial shard.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from cinedit.configs.data import BucketConfig
from cinedit.data.buckets import Bucketer
from cinedit.data.video import frame_stride as default_stride
from cinedit.data.video import num_sampled_frames
from cinedit.runtime.files import atomic_path, write_text

INDEX_FILE = "index.json"
EMPTY_TEXT_FILE = "empty_text.safetensors"  # the empty prompt's embeddings, beside a cache's shards
FORMAT = "cinedit-cache"
VERSION = 1


def _json_default(x: Any) -> Any:
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, (Path, os.PathLike)):
        return str(x)
    raise TypeError(
        f"cache meta values must be JSON-serialisable (str, int, float, list, dict), got {type(x).__name__}"
    )


class CacheWriter:
    """Appends samples to shards of about `shard_size_mb` and keeps `index.json` in step with them."""

    def __init__(self, out_dir: str | os.PathLike, shard_size_mb: float = 1024, append: bool = False):
        if shard_size_mb <= 0:
            raise ValueError(f"shard_size_mb must be positive, got {shard_size_mb}")
        self.dir = Path(out_dir)
        self.shard_bytes = int(shard_size_mb * 2**20)
        self.entries: dict[str, dict] = {}
        index = self.dir / INDEX_FILE
        if index.exists():
            if not append:
                raise FileExistsError(
                    f"{self.dir} already holds a cache ({INDEX_FILE}): pass append=True to add to it, "
                    f"or write to an empty folder"
                )
            self.entries = CacheReader(self.dir).entries
        self.dir.mkdir(parents=True, exist_ok=True)
        existing = sorted(self.dir.glob("shard-*.safetensors"))
        # Continue numbering after every shard on disk, including orphans of a crashed run, never overwriting one.
        self._next_shard = max((int(p.stem.split("-")[1]) for p in existing), default=-1) + 1
        self._buffer: dict[str, torch.Tensor] = {}
        self._pending: dict[str, dict] = {}
        self._bytes = 0
        self._closed = False

    def __contains__(self, key: str) -> bool:
        return key in self.entries or key in self._pending

    def __len__(self) -> int:
        return len(self.entries) + len(self._pending)

    def add(self, key: str, tensors: dict[str, torch.Tensor], meta: dict | None = None) -> None:
        """Queue one sample's tensors under `key`; a shard is written once the queue reaches the shard size."""
        if self._closed:
            raise RuntimeError("CacheWriter is closed: open a new one with append=True to add more samples")
        if key in self:
            raise KeyError(f"key {key!r} is already in the cache at {self.dir}; keys must be unique")
        if not tensors:
            raise ValueError(f"key {key!r}: no tensors to store")
        meta = dict(meta or {})
        json.dumps(meta, default=_json_default)  # fail now, not at the next index write
        bad = {n: type(t).__name__ for n, t in tensors.items() if not isinstance(t, torch.Tensor)}
        if bad:
            raise TypeError(f"key {key!r}: expected torch.Tensor values, got {bad}")
        for name, t in tensors.items():
            # A copy: safetensors refuses views that share storage (e.g. rows of one batched encoder output).
            t = t.detach().to("cpu", copy=True).contiguous()
            self._buffer[f"{key}/{name}"] = t
            self._bytes += t.numel() * t.element_size()
        self._pending[key] = {"tensors": list(tensors), "meta": meta}
        if self._bytes >= self.shard_bytes:
            self.flush()

    def flush(self) -> None:
        """Write the queued samples as one shard, then the index that lists them."""
        if not self._pending:
            return
        name = f"shard-{self._next_shard:05d}.safetensors"
        with atomic_path(self.dir / name) as tmp:
            save_file(self._buffer, str(tmp), metadata={"format": FORMAT})
        for key, entry in self._pending.items():
            self.entries[key] = {"shard": name, **entry}
        self._next_shard += 1
        self._buffer, self._pending, self._bytes = {}, {}, 0
        self._write_index()

    def _write_index(self) -> None:
        index = {"format": FORMAT, "version": VERSION, "entries": self.entries}
        text = json.dumps(index, default=_json_default)
        write_text(self.dir / INDEX_FILE, text)

    def close(self) -> None:
        """Write what is queued and the final index."""
        if self._closed:
            return
        self.flush()
        if not (self.dir / INDEX_FILE).exists():
            self._write_index()  # an empty cache still gets an index, so readers see a finished cache
        self._closed = True

    def __enter__(self) -> CacheWriter:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        # After an error, still keep the samples already handed over: the index never lists a partial shard.
        self.close()


class CacheReader:
    """Reads samples of a cache written by `CacheWriter`, opening each shard lazily on first use."""

    def __init__(self, cache_dir: str | os.PathLike):
        self.dir = Path(cache_dir)
        if not self.dir.is_dir():
            raise FileNotFoundError(f"cache folder {self.dir} does not exist: build it with `cinedit data cache`")
        index = self.dir / INDEX_FILE
        if not index.is_file():
            raise FileNotFoundError(
                f"{self.dir} has no {INDEX_FILE}: not a cache, or its writer never finished a shard (re-run the cache)"
            )
        data = json.loads(index.read_text())
        if data.get("format") != FORMAT or data.get("version") != VERSION:
            raise ValueError(
                f"{index}: format {data.get('format')!r} version {data.get('version')!r}, expected {FORMAT!r} "
                f"version {VERSION}; rebuild the cache with this version of cinedit"
            )
        self.entries: dict[str, dict] = data["entries"]
        self._handles: dict[str, Any] = {}

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def keys(self) -> list[str]:
        """Keys in the order they were written."""
        return list(self.entries)

    def _entry(self, key: str) -> dict:
        try:
            return self.entries[key]
        except KeyError:
            raise KeyError(f"key {key!r} is not in the cache at {self.dir} ({len(self)} entries)") from None

    def meta(self, key: str) -> dict:
        """The meta dict stored with `key`."""
        return self._entry(key)["meta"]

    def tensor_names(self, key: str) -> list[str]:
        """Names of the tensors stored with `key`."""
        return list(self._entry(key)["tensors"])

    def _shard(self, name: str):
        handle = self._handles.get(name)
        if handle is None:
            path = self.dir / name
            if not path.is_file():
                raise FileNotFoundError(f"{path} is listed in {self.dir / INDEX_FILE} but missing; rebuild the cache")
            handle = self._handles[name] = safe_open(str(path), framework="pt")
        return handle

    def get(self, key: str, names: list[str] | None = None) -> dict[str, torch.Tensor]:
        """One sample's tensors by name (all of them, or only `names`)."""
        entry = self._entry(key)
        names = entry["tensors"] if names is None else names
        unknown = [n for n in names if n not in entry["tensors"]]
        if unknown:
            raise KeyError(f"key {key!r} has no tensors {unknown}; it has {entry['tensors']}")
        shard = self._shard(entry["shard"])
        return {n: shard.get_tensor(f"{key}/{n}") for n in names}

    def __getstate__(self) -> dict:
        # Open shard handles do not pickle; DataLoader workers reopen them on first use.
        return {**self.__dict__, "_handles": {}}


# ----------------------------------------------------------------------------------------------------------------------
# what `cinedit data cache` writes around the shards, and what the generator trainer reads back


def read_empty_text(cache_dir: str | Path) -> tuple[torch.Tensor, torch.Tensor, str] | None:
    """(txt (l, d), vec (d), text-encoder identity) of the empty prompt stored with a cache, or None."""
    path = Path(cache_dir) / EMPTY_TEXT_FILE
    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as f:
        return f.get_tensor("txt"), f.get_tensor("vec"), (f.metadata() or {}).get("text_encoder", "")


def sample_key(path: str, shape: tuple[int, int, int]) -> str:
    """`NAME-HASH-TxHxW`: stable across runs, different per source file and per shape."""
    digest = hashlib.sha1(path.encode()).hexdigest()[:12]
    return f"{Path(path).stem}-{digest}-{'x'.join(map(str, shape))}"


def write_empty_text(cache_dir: str | Path, txt: torch.Tensor, vec: torch.Tensor, identity: str) -> Path:
    """Store the empty prompt's (txt (l, d), vec (d)) with a cache, atomically (caption dropout needs them without
    loading the text encoder)."""
    path = Path(cache_dir) / EMPTY_TEXT_FILE
    tensors = {"txt": txt.contiguous().cpu(), "vec": vec.contiguous().cpu()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"text_encoder": identity})
    return path


def plan_shapes(meta: Any, buckets: BucketConfig | None, size: tuple[int, int] | None, num_frames: int, stride: int):
    """(T, H, W) per row (None: no bucket fits): bucket shapes (keep_prob taken as 1) or the fixed size."""
    if buckets is not None:
        always = replace(buckets, table={r: {t: (1.0, b) for t, (_, b) in f.items()} for r, f in buckets.table.items()})
        bucketer = Bucketer(always, stride)
        codes = bucketer.assign_meta(meta)
        return [bucketer.buckets[c].shape if c >= 0 else None for c in codes]
    shapes = []
    for n, fps in zip(meta["num_frames"], meta["fps"]):
        if int(n) <= 1:
            shapes.append((1, *size))
        else:
            s = stride or default_stride(float(fps))
            shapes.append((num_frames, *size) if num_sampled_frames(int(n), s) >= num_frames else None)
    return shapes
