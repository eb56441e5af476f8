"""The metadata table: one row per video or image, stored as CSV or Parquet (chosen by extension)."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pandas as pd

from cinedit.runtime.files import atomic_path

# Required columns, in order (DESIGN.md). aspect_ratio is height / width; resolution is height * width.
COLUMNS = ["path", "text", "num_frames", "height", "width", "aspect_ratio", "resolution", "fps"]
NUMERIC_COLUMNS = ["num_frames", "height", "width", "aspect_ratio", "resolution", "fps"]
# Optional cache columns written by `cinedit data cache`.
LATENT_COLUMN = "latent_path"
TEXT_EMB_COLUMN = "text_emb_path"
SUFFIXES = (".csv", ".parquet")


class MetaError(ValueError):
    """A metadata file that cannot be used; the message says how to fix it."""


def _check_suffix(path: Path) -> None:
    if path.suffix.lower() not in SUFFIXES:
        raise MetaError(f"{path}: metadata files end in .csv or .parquet")


def read_meta(path: str | os.PathLike) -> pd.DataFrame:
    """Read a meta file and check its required columns; relative paths resolve against the file's folder."""
    path = Path(path)
    _check_suffix(path)
    if not path.is_file():
        raise MetaError(f"{path}: no such metadata file (make one with `cinedit data index DIR --out {path}`)")
    try:
        if path.suffix.lower() == ".parquet":
            df = pd.read_parquet(path)
        else:
            df = pd.read_csv(path, keep_default_na=False, na_values=[""], dtype={"text": str})
    except pd.errors.EmptyDataError:
        raise MetaError(f"{path}: the file is empty; expected a header with at least {COLUMNS}") from None
    except (ValueError, OSError, pd.errors.ParserError) as e:
        raise MetaError(f"{path}: not a readable metadata table ({e})") from None
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise MetaError(f"{path}: missing columns {missing}; expected at least {COLUMNS}")
    for col in NUMERIC_COLUMNS:
        values = pd.to_numeric(df[col], errors="coerce")
        bad = [i for i, v in enumerate(values) if not math.isfinite(v)]
        if bad:
            rows = ", ".join(str(i + 1) for i in bad[:5]) + (" ..." if len(bad) > 5 else "")
            raise MetaError(
                f"{path}: column {col!r} needs a number in every row, not in row(s) {rows} (1 is the first after the "
                f"header); fix or drop those rows "
                f"(or re-index the videos with `cinedit data index`)"
            )
        df[col] = values
    df["text"] = df["text"].fillna("").astype(str)
    base = path.resolve().parent
    for col in ("path", LATENT_COLUMN, TEXT_EMB_COLUMN):
        if col in df.columns:
            df[col] = [_resolve(p, base) for p in df[col]]
    return df.reset_index(drop=True)


def _resolve(p, base: Path):
    if not isinstance(p, str) or not p:
        return p
    return p if os.path.isabs(p) else str(base / p)


def write_meta(df: pd.DataFrame, path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write a meta file atomically; an existing file is kept unless `overwrite`."""
    path = Path(path)
    _check_suffix(path)
    if path.exists() and not overwrite:
        raise MetaError(f"{path} already exists: pass --overwrite to replace it, or choose another --out")
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise MetaError(f"cannot write {path}: missing columns {missing}")
    cols = COLUMNS + [c for c in df.columns if c not in COLUMNS]
    df = df[cols]
    with atomic_path(path) as tmp:
        if path.suffix.lower() == ".parquet":
            df.to_parquet(tmp, index=False)
        else:
            df.to_csv(tmp, index=False)
    return path
