"""Atomic file writes: every file cinedit writes appears whole or not at all, also when a run is killed."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from cinedit.configs.core import CONFIG_FILE, to_dict


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside `path` to write to; it replaces `path` when the block ends without an error and is
    removed when it raises. The temporary name keeps the suffix, so writers that choose a format by the file
    name (PIL, PyAV, pandas) write the right one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write `text` to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def json_ready(x: Any) -> Any:
    """`x` with non-finite floats as the strings "inf", "-inf" and "nan" (JSON has none; a PSNR of identical frames
    is inf)."""
    if isinstance(x, float) and not math.isfinite(x):
        return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")
    if isinstance(x, dict):
        return {k: json_ready(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_ready(v) for v in x]
    return x


def write_json(path: str | os.PathLike, doc: Any) -> Path:
    """Write `doc` as indented JSON, atomically; non-finite floats become strings (`json_ready`)."""
    return write_text(path, json.dumps(json_ready(doc), indent=2) + "\n")


def save_config(cfg: Any, run_dir: str | os.PathLike, name: str = CONFIG_FILE, preset: str | None = None) -> Path:
    """Write a resolved run config as JSON into `run_dir` (atomically); `cinedit.configs.load_config` reads it."""
    doc = {"_type": f"{type(cfg).__module__}.{type(cfg).__qualname__}", "_preset": preset, **to_dict(cfg)}
    return write_json(Path(run_dir) / name, doc)
