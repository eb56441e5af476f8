"""`cinedit data filter`: drop static, low-motion, small and short clips from a metadata table.

This command's own scores, `static_ratio` and `frame_diff`, come from a window of up to `sample_frames`
consecutive frames at the training stride ceil(fps / 24), taken from the middle of the clip (intros and outros are
often title cards or fades). Frames are downscaled to at most 256 px on the short side (AREA) before scoring, which
keeps decoding and differencing cheap and barely changes a mean absolute difference. Differences are on the 0-255
scale of BT.601 luma; a pair of consecutive sampled frames is static when its mean absolute difference is below
`static_threshold` (`static_ratio` is the share of such pairs, `--max-static-ratio` bounds it); `frame_diff` is the
mean of those differences (0-255), and `--min-frame-diff` bounds it.

`--min-motion` / `--max-motion` bound only the `motion_score` column, the release's VMAF motion written by
`cinedit data score` (a different quantity on a different scale, and the number `--data.motion_score_suffix` puts
in training captions). This command never writes that column: one already in the input is kept untouched, and
without one the motion bounds are an error (run `cinedit data score META --out SCORED` first). A video without a
value there fails them.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from cinedit.data.captions import MOTION_SCORE_COLUMN
from cinedit.data.index import check_out, parallel_map, reason_counts, report_path, write_report
from cinedit.data.meta import MetaError, read_meta, write_meta
from cinedit.data.video import ClipReader, MediaError, frame_stride, is_image, num_sampled_frames, probe

SCORE_SIZE = 256  # short side frames are scored at
LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def score_indices(num_frames: int, fps: float, sample_frames: int) -> list[int]:
    """Source frame indices scored for a clip: up to `sample_frames` at stride ceil(fps/24), centred."""
    stride = frame_stride(fps)
    k = min(sample_frames, num_sampled_frames(num_frames, stride))
    span = (k - 1) * stride + 1 if k > 0 else 0
    start = max(0, (num_frames - span) // 2)
    return [start + i * stride for i in range(k)]


def frame_scores(
    path: str | os.PathLike,
    static_threshold: float = 0.9,
    sample_frames: int = 32,
    num_frames: int | None = None,
    max_short_side: int = SCORE_SIZE,
) -> tuple[float, float]:
    """(static_ratio, frame_diff) of one video; raises `MediaError` if it cannot be read or is too short.

    Args:
        num_frames: the file's frame count if known (e.g. from the index); spares a demux.
    """
    with ClipReader(path) as reader:
        n = num_frames or reader.num_frames or probe(path, count_frames=True).num_frames
        indices = score_indices(n, reader.fps, sample_frames)
        if len(indices) < 2:
            raise MediaError(f"{path}: {n} frame(s) give {len(indices)} sampled frame(s); scoring needs 2")
        h, w = reader.stream.codec_context.height, reader.stream.codec_context.width
        scale = max_short_side / min(h, w)
        size = (max(1, round(h * scale)), max(1, round(w * scale))) if scale < 1 else None
        frames = reader.read(indices, size)  # (T, H, W, 3) uint8
    luma = frames.astype(np.float32) @ LUMA  # (T, H, W)
    diffs = np.abs(np.diff(luma, axis=0)).mean(axis=(1, 2))  # (T - 1,)
    return float((diffs < static_threshold).mean()), float(diffs.mean())


def _score(task: tuple[str, int], static_threshold: float, sample_frames: int) -> tuple[float, float, str]:
    """frame_scores for the worker pool: (static_ratio, frame_diff, "") or (nan, nan, error)."""
    path, n = task
    if not os.path.isfile(path):
        return math.nan, math.nan, "missing"
    try:
        return (*frame_scores(path, static_threshold, sample_frames, num_frames=n), "")
    except MediaError as e:
        return math.nan, math.nan, str(e)
    except Exception as e:  # one strange file must not end the run
        return math.nan, math.nan, f"{type(e).__name__}: {e}"


def _precheck(row, keep_images: bool, min_height: int, min_width: int, min_duration: float, min_frames: int):
    """The cheap, metadata-only checks: (reason, detail) of the first that fails, or None."""
    if row.image and not keep_images:
        return "image", "images are dropped (--drop-images)"
    if row.height < min_height or row.width < min_width:
        return "too_small", f"{row.height}x{row.width} is below the minimum {min_height}x{min_width} (HxW)"
    if row.image:
        return None
    if row.num_frames < min_frames:
        return "too_short", f"{row.num_frames} frames < --min-frames {min_frames}"
    duration = row.num_frames / row.fps if row.fps > 0 else 0.0
    if duration < min_duration:
        return "too_short", f"{duration:.2f} s < --min-duration {min_duration} s"
    return None


FRAME_DIFF_COLUMN = "frame_diff"  # this command's mean absolute luma difference (0-255), not the release's score


def _motion_check(score: float, min_motion: float | None, max_motion: float | None):
    """(reason, detail) when a video's release motion score is missing or outside the bounds, else None."""
    if min_motion is None and max_motion is None:
        return None
    score = float(score)
    if math.isnan(score):
        return (
            "no_motion_score",
            "no motion score (the file could not be read when scored): rescore with `cinedit data score`",
        )
    if min_motion is not None and score < min_motion:
        return "low_motion", f"motion_score {score:.3f} < --min-motion {min_motion}"
    if max_motion is not None and score > max_motion:
        return "high_motion", f"motion_score {score:.3f} > --max-motion {max_motion}"
    return None


def check_motion_bounds(
    columns, min_motion: float | None, max_motion: float | None, meta: str = "META", source: str = "the metadata"
) -> None:
    """Raise `MetaError` when a motion bound is given and `columns` lack the release's `motion_score`."""
    if (min_motion is None and max_motion is None) or MOTION_SCORE_COLUMN in columns:
        return
    raise MetaError(
        f"--min-motion/--max-motion bound the release's {MOTION_SCORE_COLUMN!r} column (VMAF motion), and {source} "
        f"has none: run `cinedit data score {meta} --out SCORED` first and filter SCORED (to bound this command's "
        f"own mean luma difference, the {FRAME_DIFF_COLUMN!r} column, use --min-frame-diff instead)"
    )


def filter_meta(
    df: pd.DataFrame,
    static_threshold: float = 0.9,
    max_static_ratio: float = 0.3,
    min_frame_diff: float = 0.0,
    min_motion: float | None = None,
    max_motion: float | None = None,
    min_height: int = 0,
    min_width: int = 0,
    min_duration: float = 0.0,
    min_frames: int = 0,
    sample_frames: int = 32,
    keep_images: bool = True,
    workers: int = 1,
    progress: bool = True,
) -> tuple[pd.DataFrame, list[dict]]:
    """Score and filter meta rows: (kept rows with `static_ratio` and `frame_diff`, report entries for dropped).

    Size filters apply to images and videos; frame, duration and motion filters to videos only. Images get
    NaN scores. `min_frame_diff` bounds this function's mean luma difference (`frame_diff`, 0-255). `min_motion` /
    `max_motion` (None: no bound) bound the release's `motion_score` column (`cinedit data score`), which must be
    in `df` when either is given (ValueError otherwise) and is kept untouched.
    """
    if sample_frames < 2:
        raise ValueError(f"sample_frames must be at least 2 to compare frames, got {sample_frames}")
    check_motion_bounds(df.columns, min_motion, max_motion)
    scored = MOTION_SCORE_COLUMN in df.columns  # the release's score, from `cinedit data score`
    df = df.reset_index(drop=True).copy()
    given = pd.to_numeric(df[MOTION_SCORE_COLUMN], errors="coerce") if scored else None  # text that is no number: NaN
    df["image"] = [is_image(p) for p in df["path"]]
    failed: dict[int, tuple[str, str]] = {}  # row -> (reason, detail)
    images, tasks = [], []
    for i, row in enumerate(df.itertuples(index=False)):
        fail = _precheck(row, keep_images, min_height, min_width, min_duration, min_frames)
        if fail is None and not row.image and len(score_indices(int(row.num_frames), row.fps, sample_frames)) < 2:
            fail = ("too_short", f"{row.num_frames} frame(s): motion scoring needs at least 2 sampled frames")
        if fail is not None:
            failed[i] = fail
        elif row.image:
            images.append(i)
        else:
            tasks.append((i, (row.path, int(row.num_frames))))

    static = np.full(len(df), np.nan)
    diff = np.full(len(df), np.nan)
    score = partial(_score, static_threshold=static_threshold, sample_frames=sample_frames)
    results = parallel_map(score, [t for _, t in tasks], workers)
    for (i, _), (s, m, err) in tqdm(zip(tasks, results), total=len(tasks), desc="filter", disable=not progress):
        static[i], diff[i] = s, m
        if err == "missing":
            failed[i] = ("missing", "file not found (moved or deleted since indexing?)")
        elif err:
            failed[i] = ("unreadable", err)
        elif s > max_static_ratio:
            failed[i] = ("static", f"static_ratio {s:.3f} > --max-static-ratio {max_static_ratio}")
        elif m < min_frame_diff:
            failed[i] = ("low_frame_diff", f"{FRAME_DIFF_COLUMN} {m:.3f} < --min-frame-diff {min_frame_diff}")
        elif scored and (fail := _motion_check(given[i], min_motion, max_motion)) is not None:
            failed[i] = fail
    for i in images:
        path = df.at[i, "path"]
        try:
            probe(path)  # the header only: images are cheap to decode later, and rarely half-written
        except MediaError as e:
            failed[i] = ("missing" if not os.path.isfile(path) else "unreadable", str(e))

    df["static_ratio"] = static
    df[FRAME_DIFF_COLUMN] = diff
    report = [{"path": df.at[i, "path"], "reason": r, "detail": d} for i, (r, d) in sorted(failed.items())]
    kept = df.drop(index=list(failed)).drop(columns="image").reset_index(drop=True)
    return kept, report


def run(args: argparse.Namespace) -> int:
    """`cinedit data filter`: returns the exit code."""
    out = Path(args.out)
    try:
        check_out(out, args.overwrite)
        df = read_meta(args.meta)
        if df.empty:
            raise MetaError(f"{args.meta}: has no rows to filter")
        check_motion_bounds(df.columns, args.min_motion, args.max_motion, meta=str(args.meta), source=str(args.meta))
        kept, report = filter_meta(
            df,
            static_threshold=args.static_threshold,
            max_static_ratio=args.max_static_ratio,
            min_frame_diff=args.min_frame_diff,
            min_motion=args.min_motion,
            max_motion=args.max_motion,
            min_height=args.min_height,
            min_width=args.min_width,
            min_duration=args.min_duration,
            min_frames=args.min_frames,
            sample_frames=args.sample_frames,
            keep_images=args.keep_images,
            workers=args.workers,
            progress=not args.quiet,
        )
    except (OSError, ValueError) as e:
        print(f"cinedit data filter: error: {e}", file=sys.stderr)
        return 1
    rep = write_report(report, report_path(out))
    if kept.empty:
        print(
            f"cinedit data filter: error: all {len(df)} rows were dropped ({reason_counts(report)}); nothing "
            f"written to {out}. Loosen the thresholds, or see {rep} for each row and why.",
            file=sys.stderr,
        )
        return 1
    if args.relative:
        base = out.absolute().parent
        kept["path"] = [os.path.relpath(p, base) for p in kept["path"]]
    write_meta(kept, out, overwrite=args.overwrite)
    dropped = f"dropped {len(report)} ({reason_counts(report)})" if report else "dropped 0"
    print(f"kept {len(kept)} of {len(df)} rows, {dropped} -> {out}; report: {rep}")
    return 0


def add_cli(subparsers) -> argparse.ArgumentParser:
    """Register `cinedit data filter`."""
    p = subparsers.add_parser(
        "filter",
        help="drop static, low-motion, small or short clips from a metadata file",
        description="Score each video's static-frame ratio and frame difference (mean absolute luma difference, "
        "0-255, between consecutive frames at stride ceil(fps/24), up to --sample-frames from the middle of the "
        "clip) and drop rows that fail the thresholds. Adds columns static_ratio and frame_diff (empty for images). "
        "--min-motion/--max-motion bound the release's VMAF motion instead: the motion_score column that "
        "`cinedit data score` writes, which META must have (it is kept untouched; this command never writes it). "
        "Dropped rows are listed in OUT_STEM.report.csv.",
    )
    p.add_argument("meta", metavar="META", help="input metadata file (.csv or .parquet)")
    p.add_argument("--out", required=True, help="output metadata file (.csv or .parquet)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument(
        "--static-threshold",
        type=float,
        default=0.9,
        help="a frame pair whose mean absolute luma difference (0-255) is below this is static (default 0.9)",
    )
    p.add_argument(
        "--max-static-ratio", type=float, default=0.3, help="drop clips with more static pairs than this (default 0.3)"
    )
    p.add_argument(
        "--min-frame-diff",
        type=float,
        default=0.0,
        help="drop videos whose frame_diff (this command's mean absolute luma difference, 0-255) is lower (default 0)",
    )
    p.add_argument(
        "--min-motion",
        type=float,
        default=None,
        help="drop videos whose motion_score (the release's VMAF motion) is lower; META must have the column: run "
        "`cinedit data score META --out SCORED` first (videos without a value are dropped)",
    )
    p.add_argument(
        "--max-motion",
        type=float,
        default=None,
        help="drop videos whose motion_score (the release's VMAF motion) is higher (see --min-motion)",
    )
    p.add_argument("--min-height", type=int, default=0, help="drop videos and images shorter than this (pixels)")
    p.add_argument("--min-width", type=int, default=0, help="drop videos and images narrower than this (pixels)")
    p.add_argument("--min-duration", type=float, default=0.0, help="drop videos shorter than this (seconds)")
    p.add_argument("--min-frames", type=int, default=0, help="drop videos with fewer frames than this")
    p.add_argument("--sample-frames", type=int, default=32, help="frames scored per clip (default 32)")
    images = p.add_mutually_exclusive_group()
    images.add_argument(
        "--keep-images", dest="keep_images", action="store_true", default=True, help="keep images (default)"
    )
    images.add_argument("--drop-images", dest="keep_images", action="store_false", help="drop images")
    p.add_argument(
        "--relative", action="store_true", help="write paths relative to the folder of --out (default: absolute paths)"
    )
    p.add_argument("--workers", type=int, default=1, help="processes that score clips in parallel (default 1)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
    return p
