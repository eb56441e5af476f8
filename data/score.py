"""`cinedit data score`: the motion score the Open-Sora 2.0 release captioned and filtered its training clips with.

That score is ffmpeg's `vmafmotion` (the VMAF motion feature: the mean absolute difference of consecutive frames'
Gaussian-blurred luma, on the 8-bit scale) averaged over the clip, the "VMAF Motion avg" that
`ffmpeg -i clip.mp4 -vf vmafmotion -f null -` prints. Here the same filter of the ffmpeg that PyAV bundles runs on
the decoded frames through an `av.filter.Graph` (buffer -> vmafmotion -> buffersink; the graph converts pixel
formats the filter does not take, as the ffmpeg command does), and the clip's score is the mean of the per-frame
scores in the frame metadata `lavfi.vmafmotion.score`, the first frame's 0 included, as ffmpeg averages. The
per-frame values come with 2 decimals, so the mean can differ from ffmpeg's log by up to 0.005.

Images have no motion: they get score 0.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from fractions import Fraction
from functools import partial
from pathlib import Path

import av
import av.filter
import numpy as np
import pandas as pd
from tqdm import tqdm

from cinedit.data.captions import MOTION_SCORE_COLUMN
from cinedit.data.index import check_out, parallel_map, reason_counts, report_path, write_report
from cinedit.data.meta import MetaError, read_meta, write_meta
from cinedit.data.video import ClipReader, MediaError, is_image, probe

FILTER = "vmafmotion"
SCORE_KEY = "lavfi.vmafmotion.score"  # per-frame metadata the filter attaches (checked in tests/test_motion_score.py)


class MotionScoreError(RuntimeError):
    """The bundled ffmpeg cannot compute the score at all (as opposed to one file that cannot be read)."""


def check_filter() -> None:
    """Raise `MotionScoreError` when the ffmpeg inside PyAV has no `vmafmotion` filter."""
    if FILTER not in av.filter.filters_available:
        version = getattr(av, "ffmpeg_version_info", "unknown")
        raise MotionScoreError(
            f"the ffmpeg {version} bundled with PyAV {av.__version__} has no `{FILTER}` filter, which the release's "
            f"motion score is computed with: install a PyAV build whose ffmpeg includes it (the PyPI wheels do: "
            f"`pip install --force-reinstall av`)"
        )


class _Motion:
    """One `vmafmotion` graph fed frame by frame; `scores` collects the per-frame values."""

    def __init__(self, frame: av.VideoFrame, time_base: Fraction):
        self.graph = av.filter.Graph()
        src = self.graph.add_buffer(
            width=frame.width, height=frame.height, format=frame.format.name, time_base=time_base
        )
        motion, sink = self.graph.add(FILTER), self.graph.add("buffersink")
        src.link_to(motion)
        motion.link_to(sink)
        self.graph.configure()
        self.scores: list[float] = []

    def push(self, frame: av.VideoFrame | None) -> None:
        self.graph.vpush(frame)
        while True:
            try:
                out = self.graph.vpull()
            except (av.error.BlockingIOError, av.error.EOFError):
                return
            self.scores.append(float(out.metadata[SCORE_KEY]))


def motion_score(path: str | os.PathLike, max_frames: int = 0, stride: int = 1) -> float:
    """The release's motion score of one video: mean VMAF motion over its frames; images score 0.

    Args:
        max_frames: score at most this many frames (after the stride) from the start; 0 scores the whole clip.
        stride: feed every `stride`-th decoded frame (1, every frame, is what the release scored).

    Raises `MediaError` for a file that cannot be read or decoded.
    """
    if stride < 1 or max_frames < 0:
        raise ValueError(f"stride must be >= 1 and max_frames >= 0, got stride {stride}, max_frames {max_frames}")
    if is_image(path):
        probe(path)  # the header: a missing or broken image is reported, not scored 0
        return 0.0
    check_filter()
    motion, decoded = None, 0
    with ClipReader(path) as reader:
        time_base = reader.stream.time_base or Fraction(1, max(1, round(reader.fps or 24)))
        try:
            for frame in reader.container.decode(reader.stream):
                decoded += 1
                if (decoded - 1) % stride:
                    continue
                if motion is None:
                    motion = _Motion(frame, time_base)
                motion.push(frame)
                if max_frames and len(motion.scores) >= max_frames:
                    break
            if motion is not None:
                motion.push(None)  # flush
        except av.error.FFmpegError as e:
            raise MediaError(f"{path}: decoding failed after {decoded} frame(s) ({e})") from None
    if motion is None or not motion.scores:
        raise MediaError(f"{path}: no decodable video frame")
    return float(np.mean(motion.scores))


def _score(path: str, max_frames: int, stride: int) -> tuple[float, str, str]:
    """motion_score for the worker pool: (score, "", "") or (nan, reason, detail)."""
    if not os.path.isfile(path):
        return math.nan, "missing", "file not found (moved or deleted since indexing?)"
    try:
        return motion_score(path, max_frames, stride), "", ""
    except MediaError as e:
        return math.nan, "unreadable", str(e)
    except MotionScoreError:
        raise
    except Exception as e:  # one strange file must not end the run
        return math.nan, "error", f"{type(e).__name__}: {e}"


def score_meta(
    df: pd.DataFrame, max_frames: int = 0, stride: int = 1, workers: int = 1, progress: bool = True
) -> tuple[pd.DataFrame, list[dict]]:
    """`df` with a `motion_score` column (2 decimals; NaN where the file could not be read) and the report
    entries of those files. An existing `motion_score` column is replaced."""
    check_filter()
    df = df.reset_index(drop=True).copy()
    paths = [str(p) for p in df["path"]]
    score = partial(_score, max_frames=max_frames, stride=stride)
    scores, report = np.full(len(df), np.nan), []
    results = parallel_map(score, paths, workers)
    for i, (s, reason, detail) in enumerate(tqdm(results, total=len(paths), desc="score", disable=not progress)):
        scores[i] = round(s, 2)
        if reason:
            report.append({"path": paths[i], "reason": reason, "detail": detail})
    df[MOTION_SCORE_COLUMN] = scores
    return df, report


def run(args: argparse.Namespace) -> int:
    """`cinedit data score`: returns the exit code."""
    out = Path(args.out)
    t0 = time.perf_counter()
    try:
        if args.frames < 0 or args.stride < 1:
            raise ValueError(f"--frames must be >= 0 and --stride >= 1, got {args.frames} and {args.stride}")
        check_out(out, args.overwrite)
        df = read_meta(args.meta)
        if df.empty:
            raise MetaError(f"{args.meta}: has no rows to score")
        replaced = MOTION_SCORE_COLUMN in df.columns
        scored, report = score_meta(df, args.frames, args.stride, args.workers, progress=not args.quiet)
    except (OSError, ValueError, MotionScoreError) as e:
        print(f"cinedit data score: error: {e}", file=sys.stderr)
        return 1
    if args.relative:
        base = out.absolute().parent
        scored["path"] = [os.path.relpath(p, base) for p in scored["path"]]
    rep = write_report(report, report_path(out))
    write_meta(scored, out, overwrite=args.overwrite)
    images = np.array([is_image(p) for p in df["path"]])
    videos = scored.loc[~images, MOTION_SCORE_COLUMN].dropna()
    seconds = time.perf_counter() - t0
    stats = f"mean {videos.mean():.2f}, min {videos.min():.2f}, max {videos.max():.2f}" if len(videos) else "none"
    bad = f"{len(report)} unreadable ({reason_counts(report)}, score left empty)" if report else "0 unreadable"
    note = f"; replaced the existing {MOTION_SCORE_COLUMN} column" if replaced else ""
    print(
        f"scored {len(videos)} videos (motion score {stats}) and {int(images.sum())} images (score 0), {bad} in "
        f"{seconds:.1f} s -> {out}; report: {rep}{note}"
    )
    return 0


def add_cli(subparsers) -> argparse.ArgumentParser:
    """Register `cinedit data score`."""
    p = subparsers.add_parser(
        "score",
        help="add the release's motion score (ffmpeg vmafmotion) to a metadata file",
        description="Compute every video's motion score as the Open-Sora 2.0 release did (the mean of ffmpeg's "
        "vmafmotion over the clip's frames, using the ffmpeg that PyAV bundles) and write the table with a "
        "motion_score column (2 decimals; images get 0). `cinedit data filter --min-motion/--max-motion` filters "
        "on it and `--data.motion_score_suffix=true` appends it to training captions. Files that cannot be read "
        "keep an empty score and are listed in OUT_STEM.report.csv.",
    )
    p.add_argument("meta", metavar="META", help="input metadata file (.csv or .parquet)")
    p.add_argument("--out", required=True, help="output metadata file (.csv or .parquet)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument(
        "--frames",
        type=int,
        default=0,
        help="score at most the first N frames (after --stride) of each clip; 0 = the whole clip, as the release "
        "(default 0)",
    )
    p.add_argument(
        "--stride",
        type=int,
        default=1,
        help="score every N-th frame (default 1, as the release; a larger stride sees larger motion per step)",
    )
    p.add_argument(
        "--relative", action="store_true", help="write paths relative to the folder of --out (default: absolute paths)"
    )
    p.add_argument("--workers", type=int, default=1, help="processes that score clips in parallel (default 1)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
    return p
