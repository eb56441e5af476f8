"""`cinedit data control`: control videos for a control adapter (edges, optical flow, grey, scribble, mask, and depth
or pose from a model you bring).

Every control video is a playable mp4 with the input's frame count, fps and size (or `--size H W`, resize-to-fill and
centre crop), RGB uint8, so the tokenizer encodes it into control latents exactly like a training clip. What each
kind holds:

- `edges`: Canny edges (scikit-image) of the BT.601 luma, white on black; `--sigma` is Canny's Gaussian.
- `flow`: TV-L1 dense optical flow (scikit-image) from frame i-1 to frame i, colour-coded in HSV: hue is the direction
  on screen counter-clockwise from rightward (0 red = right, 90 yellow-green = up, 180 cyan = left, 270 violet =
  down), saturation the magnitude over the clip's 99th-percentile magnitude (at least `--max-flow` pixels when given,
  else 1 pixel), value 1; no motion is white, as on the Middlebury colour wheel. Frame 0 has no predecessor and
  repeats frame 1's flow (frame0 -> frame1), so no control frame claims the scene is still. Flow is computed with
  the short side scaled to at most `--flow-size` pixels (vectors scaled back): on the 360p sample clips about 4x
  faster than at full size, 0.14 px mean end-point difference on slow motion, a few px on motion over 10 px/frame.
- `grey`: the BT.601 luma in all three channels.
- `scribble`: a thick, simplified edge map: Canny with a wide Gaussian (2x `--sigma`), edge fragments shorter than
  1/16 of the short side dropped, dilated to a stroke width of about 1% of the short side.
- `mask`: the input binarised (luma above `--threshold` becomes white): for a mask video you made (white = the
  region to generate). Random inpainting masks are drawn by the trainer, not stored.
- `depth`, `pose`: the callable `--model module:function` (or `path/to/file.py:function`), given the clip as uint8
  (T, H, W, 3) and returning uint8 (T, H, W, 3) or float (T, H, W) / (T, H, W, 1) in [0, 1], at any (H', W')
  (resized back to the clip's size), as a numpy array or a torch tensor. `--chunk N` calls it on N frames at a time.

INPUT is a video (or image) file, a folder (searched recursively) or a meta file. With one input file `--out` is the
output file (.mp4 for a video, .png for an image); otherwise `--out` is a folder mirroring the inputs' relative
paths, failures go to `OUT_STEM.report.csv` beside it, and for a meta file `OUT/META_STEM.csv` is the meta file with
a `control_KIND` column of absolute paths. Existing outputs are never replaced without `--overwrite`.

`--check META` computes nothing: it checks that the videos a meta file's `control_KIND` column names (made here or
elsewhere) have their row's frame count and size, listing bad rows in `META_STEM.control_KIND.report.csv`.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import importlib.util
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from scipy import ndimage
from skimage import color, feature, morphology, registration, transform
from tqdm import tqdm

from cinedit.data.filter import LUMA
from cinedit.data.index import find_media, parallel_map, reason_counts, report_path, write_report
from cinedit.data.meta import SUFFIXES, MetaError, read_meta, write_meta
from cinedit.data.video import IMAGE_EXTS, VIDEO_EXTS, MediaError, is_image, probe, read_video, to_uint8, write_video
from cinedit.runtime.files import atomic_path

KINDS = ("edges", "flow", "grey", "scribble", "mask", "depth", "pose")
MODEL_KINDS = ("depth", "pose")
FLOW_SIZE = 128  # short side optical flow is computed at
CONTROL_COLUMN = "control_{kind}"  # meta column of precomputed control videos


class ControlError(ValueError):
    """An input or option this command cannot use; the message says how to fix it."""


@dataclass
class ControlOptions:
    """What a control kind needs beyond the frames."""

    kind: str
    sigma: float = 2.0
    threshold: float = 0.5
    flow_size: int = FLOW_SIZE
    max_flow: float | None = None
    model: str | None = None  # "module:function" for depth / pose
    chunk: int = 0  # frames per model call; 0 = the whole clip


# ------------------------------------------------------------------------------------------------ signals


def luma(frames: np.ndarray) -> np.ndarray:
    """uint8 (T, H, W, 3) -> float32 (T, H, W) BT.601 luma in [0, 1]."""
    return frames.astype(np.float32) @ (LUMA / 255.0)


def grey_rgb(x: np.ndarray) -> np.ndarray:
    """float (T, H, W) in [0, 1] or bool -> uint8 (T, H, W, 3) grey frames."""
    x = np.round(np.clip(x.astype(np.float32), 0, 1) * 255).astype(np.uint8)
    return np.repeat(x[..., None], 3, axis=-1)


def edges(frames: np.ndarray, sigma: float = 2.0) -> np.ndarray:
    """Canny edges per frame, white on black: uint8 (T, H, W, 3)."""
    return grey_rgb(np.stack([feature.canny(y, sigma=sigma) for y in luma(frames)]))


def scribble(frames: np.ndarray, sigma: float = 2.0) -> np.ndarray:
    """Thick, simplified edges (a scribble a user could draw): uint8 (T, H, W, 3)."""
    h, w = frames.shape[1:3]
    radius = max(1, round(min(h, w) / 200))
    min_size = max(8, min(h, w) // 16)  # fragments under ~1/16 of the short side are texture, not shape
    out = []
    for y in luma(frames):
        e = feature.canny(y, sigma=2 * sigma)
        e = morphology.remove_small_objects(e, max_size=min_size, connectivity=2)
        out.append(ndimage.binary_dilation(e, structure=morphology.disk(radius)))
    return grey_rgb(np.stack(out))


def mask(frames: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """A user's mask video binarised: white where the luma is above `threshold`, black elsewhere."""
    return grey_rgb(luma(frames) > threshold)


def flow_field(frames: np.ndarray, flow_size: int = FLOW_SIZE) -> np.ndarray:
    """TV-L1 optical flow from frame i-1 to frame i, (T, H, W, 2) float32 (dx, dy) in pixels of the frames; frame 0
    repeats frame 1's (a single frame has zero flow)."""
    t, h, w = frames.shape[:3]
    if t < 2:
        return np.zeros((t, h, w, 2), np.float32)
    scale = min(1.0, flow_size / min(h, w))
    fh, fw = max(8, round(h * scale)), max(8, round(w * scale))
    y = luma(frames)
    if (fh, fw) != (h, w):
        y = np.stack([transform.resize(f, (fh, fw), anti_aliasing=True) for f in y]).astype(np.float32)
    flows = []
    for a, b in zip(y[:-1], y[1:]):
        # (row, col) displacement such that b[r + v, c + u] ~ a[r, c]: the motion from a to b.
        v, u = registration.optical_flow_tvl1(a, b)
        if (fh, fw) != (h, w):
            u = transform.resize(u, (h, w), order=1) * (w / fw)
            v = transform.resize(v, (h, w), order=1) * (h / fh)
        flows.append(np.stack([u, v], axis=-1))
    flows.insert(0, flows[0])
    return np.stack(flows).astype(np.float32)


def flow_to_rgb(flow: np.ndarray, max_flow: float | None = None) -> np.ndarray:
    """Colour-code (T, H, W, 2) flow (dx, dy; y down) as uint8 (T, H, W, 3): hue = direction, saturation = magnitude."""
    dx, dy = flow[..., 0], flow[..., 1]
    magnitude = np.hypot(dx, dy)
    # One scale for the whole clip: a per-frame scale would make the same motion flicker in saturation.
    norm = max(float(np.percentile(magnitude, 99)) if magnitude.size else 0.0, max_flow or 1.0)
    # -dy: screen y points down, and the hue turns counter-clockwise as seen on screen.
    hue = np.mod(np.arctan2(-dy, dx), 2 * np.pi) / (2 * np.pi)
    hsv = np.stack([hue, np.clip(magnitude / norm, 0, 1), np.ones_like(hue)], axis=-1)
    return np.round(color.hsv2rgb(hsv) * 255).astype(np.uint8)


@functools.lru_cache(maxsize=8)
def load_callable(spec: str) -> Callable:
    """The function named by "module:function" or "path/to/file.py:function"."""
    module_name, sep, name = spec.rpartition(":")
    if not sep or not module_name or not name:
        raise ControlError(f"--model {spec!r}: expected module:function (or path/to/file.py:function)")
    try:
        if module_name.endswith(".py"):
            if not os.path.isfile(module_name):
                raise ControlError(f"--model {spec!r}: no such file {module_name}")
            loader = importlib.util.spec_from_file_location(Path(module_name).stem, module_name)
            module = importlib.util.module_from_spec(loader)
            loader.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except ImportError as e:
        raise ControlError(f"--model {spec!r}: cannot import {module_name} ({e}); is it on PYTHONPATH?") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ControlError(f"--model {spec!r}: {module_name} has no function {name!r}")
    return fn


def model_frames(fn: Callable, frames: np.ndarray, chunk: int = 0) -> np.ndarray:
    """Run a user's control model over a clip and check what it returns: uint8 (T, H, W, 3)."""
    t, h, w = frames.shape[:3]
    step = chunk if chunk > 0 else t
    out = [_check_model_output(fn(frames[i : i + step]), len(frames[i : i + step]), (h, w)) for i in range(0, t, step)]
    return np.concatenate(out)


def _check_model_output(y, t: int, size: tuple[int, int]) -> np.ndarray:
    if hasattr(y, "detach"):  # a torch tensor
        y = y.detach().cpu().numpy()
    y = np.asarray(y)
    if y.ndim == 4 and y.shape[-1] == 1:
        y = y[..., 0]
    if y.ndim not in (3, 4) or (y.ndim == 4 and y.shape[-1] != 3) or y.shape[0] != t:
        raise ControlError(
            f"the --model callable returned shape {y.shape} for {t} frames; expected uint8 ({t}, H, W, 3) or float "
            f"({t}, H, W) in [0, 1]"
        )
    if y.dtype != np.uint8:
        if not np.issubdtype(y.dtype, np.floating) or y.ndim != 3:
            raise ControlError(
                f"the --model callable returned {y.dtype} {y.shape}; expected uint8 (T, H, W, 3) or float (T, H, W)"
            )
        lo, hi = float(np.nanmin(y)), float(np.nanmax(y))
        if not (np.isfinite(lo) and np.isfinite(hi)) or lo < -1e-3 or hi > 1 + 1e-3:
            raise ControlError(
                f"the --model callable returned values in [{lo:.3g}, {hi:.3g}]; float output is in [0, 1]"
            )
        y = grey_rgb(y)
    if y.shape[1:3] != size:
        y = np.stack([np.asarray(Image.fromarray(f).resize(size[::-1], Image.Resampling.BILINEAR)) for f in y])
    return y


def control_frames(frames: np.ndarray, opts: ControlOptions, fn: Callable | None = None) -> np.ndarray:
    """The control video of `kind` for uint8 (T, H, W, 3) frames: uint8 (T, H, W, 3)."""
    kind = opts.kind
    if kind == "edges":
        return edges(frames, opts.sigma)
    if kind == "scribble":
        return scribble(frames, opts.sigma)
    if kind == "grey":
        return grey_rgb(luma(frames))
    if kind == "mask":
        return mask(frames, opts.threshold)
    if kind == "flow":
        return flow_to_rgb(flow_field(frames, opts.flow_size), opts.max_flow)
    if kind in MODEL_KINDS:
        if fn is None:
            fn = load_callable(opts.model or "")
        return model_frames(fn, frames, opts.chunk)
    raise ControlError(f"unknown control kind {kind!r}; expected one of {', '.join(KINDS)}")


# --------------------------------------------------------------------------------------------- files


def make_control(src: str | os.PathLike, dst: str | os.PathLike, opts: ControlOptions, size=None, fn=None) -> Path:
    """Read `src` (video or image), write its control video (mp4) or image (png) to `dst` atomically."""
    src, dst = Path(src), Path(dst)
    info = probe(src)
    if not info.is_image and opts.kind == "flow" and info.num_frames < 2:
        raise MediaError(f"{src}: {info.num_frames} frame(s); optical flow needs at least 2")
    frames = to_uint8(read_video(src, stride=1, size=size, start=0, total_frames=info.num_frames or None))
    out = control_frames(frames, opts, fn)
    if info.is_image:
        with atomic_path(dst) as tmp:
            Image.fromarray(out[0]).save(tmp)
        return dst
    h, w = out.shape[1:3]
    if h % 2 or w % 2:
        raise MediaError(f"{src}: {h}x{w} has an odd side, which H.264 cannot store; pass --size H W (even sides)")
    return write_video(dst, out, info.fps if info.fps > 0 else 24.0)


def check_control(src: str | os.PathLike, control: str | os.PathLike, size=None) -> None:
    """Raise `MediaError` when a precomputed control video does not match its source's frame count and size."""
    a = probe(src, count_frames=True)
    b = probe(control, count_frames=True)
    want = size or (a.height, a.width)
    if b.num_frames != a.num_frames or (b.height, b.width) != tuple(want):
        raise MediaError(
            f"{control}: {b.num_frames} frames of {b.height}x{b.width}, its source {src} has {a.num_frames} frames of "
            f"{want[0]}x{want[1]}"
        )


def find_inputs(src: Path) -> tuple[list[Path], pd.DataFrame | None, bool]:
    """(files, the meta table when `src` is a meta file, whether `src` named one media file)."""
    if src.is_dir():
        files = find_media(src)
        if not files:
            raise ControlError(f"{src}: no video or image files found (searched recursively, hidden files skipped)")
        return files, None, False
    if not src.exists():
        raise ControlError(f"{src}: no such file or folder")
    if src.suffix.lower() in SUFFIXES:
        df = read_meta(src)
        if df.empty:
            raise ControlError(f"{src}: the meta file has no rows")
        return [Path(p) for p in df["path"]], df, False
    if src.suffix.lower() not in VIDEO_EXTS | IMAGE_EXTS:
        raise ControlError(f"{src}: not a video, image or meta file (by its extension {src.suffix!r})")
    return [src], None, True


def output_suffix(path: Path) -> str:
    return ".png" if is_image(path) else ".mp4"


def output_names(inputs: list[Path], root: Path | None, out: Path) -> list[Path]:
    """Where each input goes under the folder `out`: its path relative to `root` (or to the folder all inputs share),
    with the output suffix appended unless it is already the suffix (`a/clip.mp4` -> `OUT/a/clip.mp4`,
    `clip.webm` -> `OUT/clip.webm.mp4`)."""
    absolute = [Path(os.path.abspath(p)) for p in inputs]
    base = Path(os.path.abspath(root)) if root is not None else Path(os.path.commonpath([p.parent for p in absolute]))
    outs, seen = [], {}
    for src, full in zip(inputs, absolute):
        rel = full.relative_to(base) if full.is_relative_to(base) else Path(src.name)
        suffix = output_suffix(src)
        dst = out / (rel if rel.suffix.lower() == suffix else rel.with_name(rel.name + suffix))
        if dst in seen:
            raise ControlError(f"{seen[dst]} and {src} would both be written to {dst}; rename one of them")
        seen[dst] = src
        outs.append(dst)
    return outs


def _work(task: tuple[str, str], opts: ControlOptions, size) -> str:
    """One file for the worker pool: "" when written, else the error."""
    src, dst = task
    try:
        make_control(src, dst, opts, size)
        return ""
    except (MediaError, ControlError, ValueError) as e:
        return str(e)
    except Exception as e:  # one strange file must not end a run over thousands
        return f"{type(e).__name__}: {e}"


def _reason(src: str, detail: str) -> str:
    if not os.path.isfile(src):
        return "missing"
    return "unreadable" if "not a readable" in detail or "decod" in detail else "failed"


def check_options(args: argparse.Namespace) -> ControlOptions:
    if args.kind in MODEL_KINDS and not args.model:
        raise ControlError(
            f"--kind {args.kind} needs --model module:function: a Python callable (frames uint8 (T, H, W, 3)) -> "
            f"uint8 (T, H, W, 3) or float (T, H, W) in [0, 1], e.g. a depth or pose estimator you installed"
        )
    if args.model and args.kind not in MODEL_KINDS:
        raise ControlError(f"--model is for --kind {' or '.join(MODEL_KINDS)}; --kind {args.kind} is computed here")
    if args.size and (args.size[0] < 2 or args.size[1] < 2 or args.size[0] % 2 or args.size[1] % 2):
        raise ControlError(f"--size {args.size[0]} {args.size[1]}: H.264 needs even sides of at least 2")
    if args.sigma <= 0 or args.flow_size < 8 or not 0 <= args.threshold <= 1 or args.chunk < 0:
        raise ControlError("--sigma must be > 0, --flow-size >= 8, --threshold in [0, 1], --chunk >= 0")
    return ControlOptions(args.kind, args.sigma, args.threshold, args.flow_size, args.max_flow, args.model, args.chunk)


def check_meta(meta: Path, kind: str, size=None, workers: int = 1, progress: bool = True) -> tuple[int, list[dict]]:
    """Check the precomputed `control_KIND` column of a meta file: (rows checked, report entries of bad rows)."""
    df = read_meta(meta)
    col = CONTROL_COLUMN.format(kind=kind)
    if col not in df.columns:
        raise ControlError(f"{meta}: no {col!r} column; add one with the control video of each row, or compute it")
    base = meta.resolve().parent
    tasks = [
        (p, c if not isinstance(c, str) or os.path.isabs(c) else str(base / c)) for p, c in zip(df["path"], df[col])
    ]
    report = []
    results = parallel_map(functools.partial(_check, size=size), tasks, workers)
    for (p, _), err in tqdm(zip(tasks, results), total=len(tasks), desc=f"check {col}", disable=not progress):
        if err:
            report.append({"path": p, "reason": "mismatch" if "its source" in err else "unreadable", "detail": err})
    return len(tasks), report


def _check(task: tuple[str, str], size) -> str:
    src, control = task
    if not isinstance(control, str) or not control:
        return "no control video named in this row"
    try:
        check_control(src, control, size)
        return ""
    except MediaError as e:
        return str(e)


def _run_check(args: argparse.Namespace, size) -> int:
    prog = "cinedit data control --check: error"
    meta = Path(args.input)
    try:
        if meta.suffix.lower() not in SUFFIXES:
            raise ControlError(
                f"--check reads the {CONTROL_COLUMN.format(kind=args.kind)} column of a meta file, not {meta}"
            )
        n, report = check_meta(meta, args.kind, size, args.workers, not args.quiet)
    except (ControlError, MetaError) as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 1
    rep = write_report(report, meta.with_name(f"{meta.stem}.{CONTROL_COLUMN.format(kind=args.kind)}.report.csv"))
    if report:
        print(
            f"{prog}: {len(report)} of {n} control videos do not match ({reason_counts(report)}); see {rep}",
            file=sys.stderr,
        )
        return 1
    print(f"all {n} {CONTROL_COLUMN.format(kind=args.kind)} videos match their sources; report: {rep}")
    return 0


def run(args: argparse.Namespace) -> int:
    """`cinedit data control`: returns the exit code."""
    prog = "cinedit data control: error"
    if args.check:
        return _run_check(args, tuple(args.size) if args.size else None)
    if not args.out:
        print(f"{prog}: --out is required (a file for one input, a folder for several)", file=sys.stderr)
        return 1
    src, out = Path(args.input), Path(args.out)
    size = tuple(args.size) if args.size else None
    try:
        opts = check_options(args)
        fn = load_callable(opts.model) if opts.model else None
        inputs, df, single = find_inputs(src)
        if single:
            want = output_suffix(src)
            if out.is_dir():
                raise ControlError(
                    f"--out {out} is a folder; with one input --out names the file, e.g. {out / src.stem}{want}"
                )
            if out.suffix.lower() != want:
                raise ControlError(f"--out {out}: the control of {src.name} is written as {want}")
            outputs = [out]
        else:
            if out.exists() and not out.is_dir():
                raise ControlError(f"--out {out} is a file; with several inputs --out names a folder")
            outputs = output_names(inputs, src if src.is_dir() else None, out)
        existing = [p for p in outputs if p.exists()]
        meta_out = out / f"{src.stem}.csv" if df is not None else None
        if meta_out is not None and meta_out.exists():
            existing.append(meta_out)
        more = f" (and {len(existing) - 1} more outputs)" if len(existing) > 1 else ""
        if existing and not args.overwrite:
            raise ControlError(
                f"{existing[0]} already exists{more}: pass --overwrite to replace, or choose another --out"
            )
    except (ControlError, MetaError, MediaError) as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 1
    if single:
        try:
            make_control(src, out, opts, size, fn)
        except (MediaError, ControlError, ValueError) as e:
            print(f"{prog}: {e}", file=sys.stderr)
            return 1
        print(f"{args.kind} control of {src} -> {out}")
        return 0
    tasks = [(str(a), str(b)) for a, b in zip(inputs, outputs)]
    results = parallel_map(functools.partial(_work, opts=opts, size=size), tasks, args.workers)
    report = []
    for (a, _), err in tqdm(zip(tasks, results), total=len(tasks), desc=f"control {args.kind}", disable=args.quiet):
        if err:
            report.append({"path": a, "reason": _reason(a, err), "detail": err})
    rep = write_report(report, report_path(out))
    failed = {e["path"] for e in report}
    if meta_out is not None:
        col = CONTROL_COLUMN.format(kind=args.kind)
        df[col] = [os.path.abspath(b) if a not in failed else "" for a, b in tasks]
        write_meta(df, meta_out, overwrite=True)
    done = len(tasks) - len(report)
    if not done:
        print(f"{prog}: all {len(tasks)} inputs failed ({reason_counts(report)}); see {rep}", file=sys.stderr)
        return 1
    failures = f", {len(report)} failed ({reason_counts(report)})" if report else ""
    extra = f"; meta with {CONTROL_COLUMN.format(kind=args.kind)}: {meta_out}" if meta_out is not None else ""
    print(f"wrote {done} {args.kind} controls{failures} -> {out}; report: {rep}{extra}")
    return 0


def add_cli(subparsers) -> argparse.ArgumentParser:
    """Register `cinedit data control`."""
    p = subparsers.add_parser(
        "control",
        help="write control videos (edges, flow, grey, scribble, mask, depth/pose from your model)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("input", metavar="INPUT", help="a video or image file, a folder, or a meta file (.csv / .parquet)")
    p.add_argument("--kind", required=True, choices=KINDS, help="the control signal to compute")
    p.add_argument("--out", default=None, help="output file (one input) or folder (several); required unless --check")
    p.add_argument(
        "--check",
        action="store_true",
        help="instead of computing, check META's precomputed control_KIND column (frame count and size match each "
        "row's video); bad rows go to META_STEM.control_KIND.report.csv",
    )
    p.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), help="resize to fill and centre-crop to H x W")
    p.add_argument("--sigma", type=float, default=2.0, help="Canny Gaussian sigma for edges (scribble: 2x) (default 2)")
    p.add_argument("--threshold", type=float, default=0.5, help="mask: luma threshold in [0, 1] (default 0.5)")
    p.add_argument(
        "--flow-size", type=int, default=FLOW_SIZE, help=f"flow: short side flow is computed at (default {FLOW_SIZE})"
    )
    p.add_argument(
        "--max-flow", type=float, default=None, help="flow: least magnitude (pixels) of full saturation (default 1)"
    )
    p.add_argument("--model", default=None, help="depth/pose: module:function or path/to/file.py:function")
    p.add_argument("--chunk", type=int, default=0, help="depth/pose: frames per model call (default: the whole clip)")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.add_argument("--workers", type=int, default=1, help="processes for folder and meta inputs (default 1)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
    return p
