"""`cinedit data index`: scan a folder of videos and images into a metadata table, reporting every file it skips.

Each video is judged by what it holds: the time its demuxed packets cover (in frame slots at its frame rate, so
sparse and variable timestamps count the time they claim) against the header's frame count, then the first and the
last frame are decoded (one seek each). Rotated files are indexed with their displayed (upright) height and width.
Files that fail are listed in `<out stem>.report.csv` with a short reason code and never stop the run.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pandas as pd
from PIL import Image
from tqdm import tqdm

from cinedit.data.meta import COLUMNS, SUFFIXES, MetaError, write_meta
from cinedit.data.video import ClipReader, MediaError, VideoInfo, is_image, is_video, probe
from cinedit.runtime.files import atomic_path

REPORT_COLUMNS = ["path", "reason", "detail"]


class Skip(Exception):
    """A file that cannot go into the index; `reason` is a short code for the report."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def report_path(out: str | os.PathLike) -> Path:
    """Where the report for an output meta file goes: `<out stem>.report.csv` beside it."""
    out = Path(out)
    return out.with_name(f"{out.stem}.report.csv")


def write_report(entries: list[dict], path: str | os.PathLike) -> Path:
    """Write report entries (`path,reason,detail`) as CSV, atomically; an empty report still gets its header."""
    path = Path(path)
    with atomic_path(path) as tmp:
        pd.DataFrame(entries, columns=REPORT_COLUMNS).to_csv(tmp, index=False)
    return path


def check_out(out: Path, overwrite: bool) -> None:
    """Fail early, before any scanning, on an --out the run could not write."""
    if out.suffix.lower() not in SUFFIXES:
        raise MetaError(f"--out {out}: metadata files end in .csv or .parquet")
    if out.exists() and not overwrite:
        raise MetaError(f"{out} already exists: pass --overwrite to replace it, or choose another --out")


def find_media(root: str | os.PathLike) -> list[Path]:
    """Videos and images under `root` (recursive, by extension), sorted; hidden files and folders are skipped.
    Symlinked folders are followed (a dataset is often a folder of links to disks); a folder reached a second time
    (a link loop, or two links to one folder) is walked once."""
    root = Path(root)
    found, seen = [], set()
    for folder, dirs, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        # Hidden entries are editor, OS or half-written temporary files (`atomic_path`'s `.<stem>.tmp.mp4`).
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and os.path.realpath(Path(folder, d)) not in seen)
        for name in files:
            if not name.startswith(".") and (is_video(name) or is_image(name)):
                found.append(Path(folder, name))
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


# ---------------------------------------------------------------------------------------------- captions


class Captions:
    """Caption lookup: sidecar `NAME.txt` / `NAME.json` first, then a `path,text` CSV.

    CSV paths may be relative to the scanned folder, absolute, or bare file names (matching a file of that
    name in any subfolder).
    """

    def __init__(self, root: str | os.PathLike, csv: str | os.PathLike | None = None):
        self.root = os.path.abspath(root)
        self.by_path: dict[str, str] = {}
        self.by_name: dict[str, str] = {}
        self.warnings: list[str] = []
        if csv is not None:
            self._load_csv(Path(csv))

    def _load_csv(self, csv: Path) -> None:
        if not csv.is_file():
            raise FileNotFoundError(f"--captions {csv}: no such file; pass a CSV with columns path,text")
        try:
            df = pd.read_csv(csv, dtype=str, keep_default_na=False)
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
            raise MetaError(f"--captions {csv}: not a readable CSV ({e}); expected columns path,text") from None
        missing = [c for c in ("path", "text") if c not in df.columns]
        if missing:
            raise MetaError(f"--captions {csv}: missing columns {missing}; expected columns path,text")
        for p, text in zip(df["path"], df["text"]):
            p = p.strip()
            if not p:
                continue
            self.by_path.setdefault(os.path.normpath(os.path.join(self.root, p)), text)
            if os.path.basename(p) == p:
                self.by_name.setdefault(p, text)

    def get(self, path: Path) -> str | None:
        """The caption of one media file, or None when it has none."""
        text = self._sidecar(path)
        if text is not None:
            return text
        text = self.by_path.get(os.path.normpath(os.path.abspath(path)))
        if text is None:
            text = self.by_name.get(path.name)
        return None if text is None else text.strip()

    def _sidecar(self, path: Path) -> str | None:
        txt, js = path.with_suffix(".txt"), path.with_suffix(".json")
        try:
            if txt.is_file():
                return txt.read_text(encoding="utf-8-sig").strip()
            if js.is_file():
                data = json.loads(js.read_text(encoding="utf-8-sig"))
                text = data.get("text", data.get("caption")) if isinstance(data, dict) else None
                if isinstance(text, str):
                    return text.strip()
                self.warnings.append(f"{js}: no string 'text' or 'caption' key; caption left empty")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            self.warnings.append(f"{path}: sidecar caption unreadable ({e}); caption left empty")
        return None


# -------------------------------------------------------------------------------------------- file checks


def _looks_like_text(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(1024)
    if b"\0" in head:
        return False
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _open_error(path: Path, e: MediaError) -> Skip:
    msg = str(e)
    if "no video stream" in msg:
        return Skip("no_video_stream", "the container holds no video stream (audio only?)")
    if _looks_like_text(path):
        return Skip("not_media", "a text file with a video extension")
    return Skip("unreadable", msg.removeprefix(f"{path}: "))


def check_video(path: str | os.PathLike) -> VideoInfo:
    """Probe one video and check it decodes from first to last frame; raises `Skip` when it does not."""
    path = Path(path)
    if os.path.getsize(path) == 0:
        raise Skip("empty", "0 bytes")
    try:
        info = probe(path, count_frames=True)  # demux only: the time the packets really cover, in frame slots
    except MediaError as e:
        raise _open_error(path, e) from None
    n = info.num_frames
    if info.fps <= 0:
        raise Skip("unreadable", "the video stream reports no frame rate")
    with ClipReader(path) as reader:
        header = reader.num_frames
        # Sparse or variable timestamps cover the header's time with fewer packets; a cut file does not. One slot of
        # rounding between the header's count and the timeline is allowed.
        if header and n < header - 1:
            raise Skip("truncated", f"header says {header} frames, the file's packets end after frame {n}")
        if n < 2:
            raise Skip("too_short", f"{n} frame(s); a video needs at least 2")
        try:
            reader.read([0])
        except MediaError as e:
            raise Skip("unreadable", f"first frame does not decode ({e})") from None
        try:
            reader.read([n - 1])
        except MediaError as e:
            raise Skip("truncated", f"last frame (index {n - 1}) does not decode ({e})") from None
    return info


def check_image(path: str | os.PathLike) -> VideoInfo:
    """Decode one image fully (a header alone misses truncated files); raises `Skip` when it fails."""
    path = Path(path)
    if os.path.getsize(path) == 0:
        raise Skip("empty", "0 bytes")
    try:
        with Image.open(path) as im:
            im.load()
    except Exception as e:  # PIL raises many types for bad files
        reason = "truncated" if "truncated" in str(e).lower() else "unreadable"
        raise Skip(reason, f"not a readable image ({type(e).__name__}: {e})") from None
    return probe(path)  # the displayed (EXIF-upright) size


def inspect(path: str | os.PathLike) -> tuple[VideoInfo | None, str, str]:
    """Check one media file: (info, "", "") when good, (None, reason, detail) when it must be skipped."""
    try:
        return (check_image(path) if is_image(path) else check_video(path)), "", ""
    except Skip as s:
        return None, s.reason, s.detail
    except MediaError as e:
        return None, "unreadable", str(e)
    except Exception as e:  # one strange file must not end a run over thousands
        return None, "error", f"{type(e).__name__}: {e}"


def parallel_map(fn, items: list, workers: int = 1) -> Iterator:
    """`map(fn, items)` in order, over `workers` processes when more than one."""
    if workers <= 1 or len(items) < 2:
        yield from map(fn, items)
        return
    # spawn, not fork: the parent may hold Arrow or OpenMP threads, and forking those can deadlock.
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        yield from pool.map(fn, items, chunksize=max(1, min(16, len(items) // (4 * workers))))


# ------------------------------------------------------------------------------------------------- index


def build_index(
    root: str | os.PathLike,
    captions: str | os.PathLike | None = None,
    relative_to: str | os.PathLike | None = None,
    workers: int = 1,
    progress: bool = True,
) -> tuple[pd.DataFrame, list[dict]]:
    """Index the media under `root`: (rows with the meta COLUMNS, report entries for skipped files).

    Args:
        captions: a `path,text` CSV used for files without a sidecar caption.
        relative_to: write paths relative to this folder (the meta file's); None writes absolute paths.
        workers: processes that check files in parallel.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such folder; pass the folder that holds your videos and images")
    files = find_media(root)
    if not files:
        exts = "video (.mp4, .mov, .mkv, ...) or image (.jpg, .png, ...)"
        raise FileNotFoundError(f"{root}: no {exts} files found (searched recursively, hidden files skipped)")
    table = Captions(root, captions)
    rows, report = [], []
    results = parallel_map(inspect, [str(p) for p in files], workers)
    for path, (info, reason, detail) in tqdm(zip(files, results), total=len(files), desc="index", disable=not progress):
        shown = os.path.abspath(path)
        if info is None:
            report.append({"path": shown, "reason": reason, "detail": detail})
            continue
        if relative_to is not None:
            shown = os.path.relpath(shown, os.path.abspath(relative_to))
        text = table.get(path)
        rows.append(
            {
                "path": shown,
                "text": "" if text is None else text,
                "num_frames": info.num_frames,
                "height": info.height,
                "width": info.width,
                "aspect_ratio": info.height / info.width,
                "resolution": info.height * info.width,
                "fps": info.fps,
            }
        )
    for w in table.warnings:
        print(f"warning: {w}", file=sys.stderr)
    return pd.DataFrame(rows, columns=COLUMNS), report


def reason_counts(entries: Iterable[dict]) -> str:
    """'reason N, ...' for a summary line."""
    counts: dict[str, int] = {}
    for e in entries:
        counts[e["reason"]] = counts.get(e["reason"], 0) + 1
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))


def run(args: argparse.Namespace) -> int:
    """`cinedit data index`: returns the exit code."""
    out = Path(args.out)
    try:
        check_out(out, args.overwrite)
        df, report = build_index(
            args.dir,
            captions=args.captions,
            relative_to=out.absolute().parent if args.relative else None,
            workers=args.workers,
            progress=not args.quiet,
        )
    except (OSError, MetaError) as e:
        print(f"cinedit data index: error: {e}", file=sys.stderr)
        return 1
    rep = write_report(report, report_path(out))
    if df.empty:
        print(
            f"cinedit data index: error: all {len(report)} media files were skipped ({reason_counts(report)}); "
            f"nothing written to {out}. See {rep} for each file and why.",
            file=sys.stderr,
        )
        return 1
    write_meta(df, out, overwrite=args.overwrite)
    no_text = int((df["text"] == "").sum())
    skipped = f"{len(report)} skipped ({reason_counts(report)})" if report else "0 skipped"
    print(f"indexed {len(df)} files ({no_text} without a caption), {skipped} -> {out}; report: {rep}")
    return 0


def add_cli(subparsers) -> argparse.ArgumentParser:
    """Register `cinedit data index`."""
    p = subparsers.add_parser(
        "index",
        help="scan a folder of videos and images into a metadata CSV/Parquet",
        description="Scan DIR recursively for videos and images and write a metadata table "
        "(path,text,num_frames,height,width,aspect_ratio,resolution,fps). Captions come from a sidecar "
        "NAME.txt or NAME.json ('text' or 'caption' key), else from --captions. Files that are empty, "
        "unreadable, truncated or shorter than 2 frames are skipped and listed in OUT_STEM.report.csv.",
    )
    p.add_argument("dir", metavar="DIR", help="folder to scan (recursively; hidden files are ignored)")
    p.add_argument("--out", required=True, help="output metadata file (.csv or .parquet)")
    p.add_argument(
        "--captions",
        default=None,
        help="CSV with columns path,text (path relative to DIR, absolute, or a bare file name)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument(
        "--relative", action="store_true", help="write paths relative to the folder of --out (default: absolute paths)"
    )
    p.add_argument("--workers", type=int, default=1, help="processes that check files in parallel (default 1)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
    return p
