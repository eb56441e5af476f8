"""`cinedit eval recon`: how well tokenizers reconstruct a set of videos, as numbers, a table and a picture.

The input is a folder (searched recursively), a meta file (.csv / .parquet), one file, or `sample` (the bundled
sample dataset, built into --sample-dir on first use). Each clip is read at --size H W (resize-to-fill + centre
crop; or its own size, which must then be a multiple of the tokenizer's spatial factor, or --pad) and at most
--num-frames frames (trimmed to what the tokenizer takes: a multiple of 4 for the DC-AE, 1 + 4k for the causal
HunyuanVideo VAE; images are single frames), encoded and decoded (tiled when large), and scored per frame, then
per clip: PSNR, SSIM (11x11 Gaussian, sigma 1.5) and LPIPS (AlexNet; reported as unavailable when its ImageNet
backbone is not on this machine). A file that cannot be read is reported and skipped (exit code 1).

--ckpt may be repeated to compare tokenizers on the same clips in one report, one labelled row each (the label is
the checkpoint's file or folder name).

Writes into --out: recon.json (per clip and mean, throughput, settings), recon.md (a table) and recon.png (original,
reconstruction and error, amplified 4x, for the worst and the best clip by PSNR, per tokenizer). Existing files are
kept unless --overwrite. Throughput counts the tokenizer's encode + decode only (not reading or scoring).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from cinedit.data.sample import build_sample_data
from cinedit.data.video import MediaError, to_uint8
from cinedit.eval import figures
from cinedit.runtime.dist import resolve_device
from cinedit.runtime.files import write_json, write_text
from cinedit.tokenizer.commands import (
    InputError,
    find_inputs,
    load_tokenizer,
    read_for,
    reconstruct,
    tiling_for,
)
from cinedit.tokenizer.loading import Tokenizer
from cinedit.tokenizer.lpips import LPIPS, LPIPSConfig, LPIPSUnavailable, build_lpips, lpips
from cinedit.tokenizer.metrics import SSIM_RADIUS, psnr, ssim
from cinedit.tokenizer.tiling import TilingConfig

OUTPUTS = ("recon.json", "recon.md", "recon.png")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
STRIP_FRAMES = 4  # frames shown per clip in the PNG, evenly spaced


@dataclass
class ClipScore:
    """One clip's reconstruction quality (metrics are means over its frames)."""

    path: str
    frames: int
    height: int
    width: int
    psnr: float
    ssim: float | None  # None below SSIM's 11x11 window
    lpips: float | None  # None when LPIPS is unavailable
    seconds: float  # encode + decode


@dataclass
class Strip:
    """The frames of one clip kept for the picture: uint8 (k, H, W, 3) originals, reconstructions, |error|."""

    score: ClipScore
    ref: np.ndarray
    rec: np.ndarray
    err: np.ndarray


def pick_frames(ref: Tensor, rec: Tensor, k: int = STRIP_FRAMES) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """k evenly spaced frames of (1, 3, T, H, W) clips in [-1, 1]: uint8 originals and reconstructions, |error|."""
    t = ref.shape[2]
    idx = sorted({round(i * (t - 1) / max(k - 1, 1)) for i in range(min(k, t))})
    a, b = ref[0][:, idx], rec[0][:, idx]
    err = ((a - b).abs() / 2).mean(dim=0).numpy()  # (k, H, W), in [0, 1] units
    return to_uint8(a), to_uint8(b), err


@dataclass
class TokenizerRun:
    """One tokenizer's pass over the inputs."""

    label: str
    ckpt: str
    kind: str
    config: dict
    scores: list[ClipScore]
    failed: list[dict]
    worst: Strip | None
    best: Strip | None
    wall_s: float

    def report(self) -> dict:
        return {
            "label": self.label,
            "ckpt": self.ckpt,
            "kind": self.kind,
            "tokenizer": self.config,
            "mean": summarize(self.scores, self.wall_s),
            "clips": [asdict(s) for s in self.scores],
            "failed": self.failed,
        }


def score_clip(
    model: Tokenizer, path: Path, args: argparse.Namespace, tiling: TilingConfig, metric: LPIPS | None
) -> tuple[ClipScore, Tensor, Tensor]:
    """Read, reconstruct and score one input; returns (scores, reference, reconstruction)."""
    clip = read_for(model, path, args, max_frames=args.num_frames)
    t0 = time.perf_counter()
    with torch.no_grad():
        rec, ref = reconstruct(model, clip, tiling)  # returns CPU tensors, so the time includes any GPU work
    seconds = time.perf_counter() - t0
    big_enough = min(clip.height, clip.width) >= 2 * SSIM_RADIUS + 1
    score = ClipScore(
        path=str(path),
        frames=rec.shape[2],
        height=clip.height,
        width=clip.width,
        psnr=psnr(rec, ref).item(),
        ssim=ssim(rec, ref).item() if big_enough else None,
        lpips=lpips(rec, ref, metric).item() if metric is not None else None,
        seconds=seconds,
    )
    return score, ref, rec


def _mean(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def summarize(scores: list[ClipScore], wall_s: float) -> dict:
    """Means over clips (each clip counts once) and throughput of the tokenizer calls."""
    frames = sum(s.frames for s in scores)
    model_s = sum(s.seconds for s in scores)
    return {
        "clips": len(scores),
        "psnr": _mean([s.psnr for s in scores]),
        "ssim": _mean([s.ssim for s in scores]),
        "lpips": _mean([s.lpips for s in scores]),
        "frames": frames,
        "model_seconds": model_s,
        "frames_per_s": frames / model_s if model_s > 0 else None,
        "wall_seconds": wall_s,
    }


def _fmt(x: float | None, digits: int) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def _clip_table(run: dict) -> list[str]:
    """One row per clip and the mean of one tokenizer's run."""
    mean = run["mean"]
    lines = [
        "| clip | frames | size | PSNR (dB) | SSIM | LPIPS | time (s) |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    for c in run["clips"]:
        lines.append(
            f"| {Path(c['path']).name} | {c['frames']} | {c['height']}x{c['width']} | {_fmt(c['psnr'], 2)} | "
            f"{_fmt(c['ssim'], 4)} | {_fmt(c['lpips'], 4)} | {c['seconds']:.2f} |"
        )
    lines.append(
        f"| **mean** | {mean['frames']} | | **{_fmt(mean['psnr'], 2)}** | **{_fmt(mean['ssim'], 4)}** | "
        f"**{_fmt(mean['lpips'], 4)}** | {mean['model_seconds']:.2f} |"
    )
    if run["failed"]:
        lines += ["", "Skipped (could not be read):", ""]
        lines += [f"- {f['path']}: {f['error']}" for f in run["failed"]]
    return lines


def markdown(report: dict) -> str:
    """The report as Markdown: settings, one row per clip and the mean (per tokenizer when several, after a
    comparison table with one row per tokenizer), failures."""
    s, runs = report["settings"], report["tokenizers"]
    where = (
        f"at {s['size'] or 'their own size'}, at most {s['num_frames']} frames, {s['device']} ({s['threads']} "
        f"threads) {s['dtype']}, tiling {s['tiling']}"
    )
    if len(runs) == 1:
        mean = runs[0]["mean"]
        lines = [
            f"# Reconstruction: {s['ckpt']}",
            "",
            f"{mean['clips']} clip(s) {where}. Encode + decode: {mean['frames']} frames in "
            f"{mean['model_seconds']:.2f} s ({_fmt(mean['frames_per_s'], 1)} frames/s); "
            f"wall time {mean['wall_seconds']:.1f} s.",
            "",
            *_clip_table(runs[0]),
        ]
    else:
        lines = [
            f"# Reconstruction: {' vs '.join(r['label'] for r in runs)}",
            "",
            f"The same {len(report['inputs'])} input(s) {where}; each tokenizer reads as many frames as it takes.",
            "",
            "| tokenizer | kind | clips | frames | PSNR (dB) | SSIM | LPIPS | frames/s |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for r in runs:
            m = r["mean"]
            lines.append(
                f"| {r['label']} | {r['kind']} | {m['clips']} | {m['frames']} | {_fmt(m['psnr'], 2)} | "
                f"{_fmt(m['ssim'], 4)} | {_fmt(m['lpips'], 4)} | {_fmt(m['frames_per_s'], 1)} |"
            )
        for r in runs:
            lines += ["", f"## {r['label']} ({r['ckpt']})", "", *_clip_table(r)]
    if report["lpips_unavailable"]:
        lines += ["", f"LPIPS: unavailable. {report['lpips_unavailable']}"]
    return "\n".join(lines) + "\n"


def strip_png(picks: list[tuple[str, Strip]]) -> figures.Image.Image:
    """Original / reconstruction / error rows for each picked clip, stacked.

    The error is |original - reconstruction| in [0, 1] units, amplified 4x: black is exact, white is 0.25 or more.
    """
    panels = []
    for name, st in picks:
        s = st.score
        quality = f"PSNR {s.psnr:.2f} dB" + (f", SSIM {s.ssim:.4f}" if s.ssim is not None else "")
        frames = f"{s.frames} frame{'s' if s.frames != 1 else ''}"
        title = f"{name}: {Path(s.path).name} ({frames}, {s.height}x{s.width}), {quality}"
        rows = [
            ("original", list(st.ref)),
            ("reconstruction", list(st.rec)),
            ("|error| x4", list(figures.error_map(st.err, gain=4.0))),
        ]
        panels.append(figures.image_grid(rows, title))
    return figures.stack(panels)


def _fail(msg: object, code: int = 2) -> int:
    print(f"cinedit eval recon: error: {msg}", file=sys.stderr)
    return code


def _inputs(args: argparse.Namespace) -> list[Path]:
    if args.input != "sample":
        return find_inputs(args.input)[0]

    root = Path(args.sample_dir)
    meta = root / "meta.csv"
    if not meta.is_file():
        print(f"building the sample dataset in {root} (once)", file=sys.stderr)
        meta = build_sample_data(root, overwrite=False, progress=not args.quiet)
    return find_inputs(meta)[0]


def _lpips_metric(args: argparse.Namespace, device: torch.device) -> tuple[LPIPS | None, str]:
    """The LPIPS network, or None and the reason it is unavailable."""
    try:
        cfg = LPIPSConfig(args.lpips_net, args.lpips_backbone, args.lpips_heads)
        return build_lpips(cfg).to(device), ""
    except LPIPSUnavailable as e:
        return None, str(e)


def ckpt_labels(ckpts: list[str]) -> list[str]:
    """A row label per checkpoint: its file or folder name, numbered where two share one."""
    names = [Path(c).name or str(c) for c in ckpts]
    return [f"{n} #{i + 1}" if names.count(n) > 1 else n for i, n in enumerate(names)]


def run_tokenizer(
    model: Tokenizer,
    label: str,
    ckpt: str,
    inputs: list[Path],
    args: argparse.Namespace,
    tiling: TilingConfig,
    metric: LPIPS | None,
) -> TokenizerRun:
    """Score one tokenizer on every input, keeping only the frames the picture needs (worst and best clip)."""
    run = TokenizerRun(label, ckpt, model.kind, asdict(model.config), [], [], None, None, 0.0)
    t0 = time.perf_counter()
    for path in tqdm(inputs, desc=f"recon {label}", unit="clip", disable=args.quiet):
        try:
            score, ref, rec = score_clip(model, path, args, tiling, metric)
        except (InputError, MediaError, ValueError) as e:
            run.failed.append({"path": str(path), "error": str(e)})
            tqdm.write(f"skipped {path}: {e}", file=sys.stderr)
            continue
        run.scores.append(score)
        if run.worst is None or score.psnr < run.worst.score.psnr:
            run.worst = Strip(score, *pick_frames(ref, rec))
        if run.best is None or score.psnr > run.best.score.psnr:
            run.best = Strip(score, *pick_frames(ref, rec))
    run.wall_s = time.perf_counter() - t0
    return run


def run_recon(args: argparse.Namespace) -> int:
    """The `recon` subcommand; returns the exit code."""
    out = Path(args.out)
    existing = [out / n for n in OUTPUTS if (out / n).exists()]
    if existing and not args.overwrite:
        return _fail(f"{', '.join(map(str, existing))} exist(s); pass --overwrite to replace, or choose another --out")
    if args.num_frames < 1:
        return _fail(f"--num-frames must be at least 1, got {args.num_frames}")
    ckpts = [str(c) for c in args.ckpt]
    labels = ckpt_labels(ckpts)
    try:
        device = resolve_device(args.device)
        inputs = _inputs(args)
        metric, lpips_note = None, ""
        runs: list[TokenizerRun] = []
        for i, (ckpt, label) in enumerate(zip(ckpts, labels)):
            model = load_tokenizer(ckpt, device).to(DTYPES[args.dtype])
            tiling = tiling_for(args, model, progress=False)
            if i == 0:
                metric, lpips_note = _lpips_metric(args, device)
                if lpips_note:
                    print(f"LPIPS unavailable (reported as n/a): {lpips_note}", file=sys.stderr)
            runs.append(run_tokenizer(model, label, ckpt, inputs, args, tiling, metric))
            del model  # one tokenizer in memory at a time
            if not runs[-1].scores:
                who = f" by {label}" if len(ckpts) > 1 else ""
                return _fail(f"none of the {len(inputs)} input(s) could be read{who}; see the errors above")
    except (InputError, FileNotFoundError, FileExistsError, ValueError) as e:
        return _fail(e)

    settings = {
        "ckpt": ckpts[0] if len(ckpts) == 1 else ckpts,
        "input": str(args.input),
        "size": list(args.size) if args.size else None,
        "num_frames": args.num_frames,
        "stride": args.stride,
        "pad": args.pad,
        "device": str(device),
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "tiling": args.tiling,
        "lpips_net": args.lpips_net,
    }
    per_run = [r.report() for r in runs]
    report: dict = {"settings": settings}
    if len(runs) == 1:  # the one-tokenizer report keeps its flat layout
        settings["tokenizer"] = per_run[0]["tokenizer"]
        report.update(mean=per_run[0]["mean"], clips=per_run[0]["clips"], failed=per_run[0]["failed"])
    report.update(inputs=[str(p) for p in inputs], tokenizers=per_run, lpips_unavailable=lpips_note or None)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "recon.json", report)
    write_text(out / "recon.md", markdown(report))
    picks = []
    for r in runs:
        prefix = f"{r.label} " if len(runs) > 1 else ""
        same = r.worst.score is r.best.score
        picks += [(f"{prefix}worst", r.worst)] + ([] if same else [(f"{prefix}best", r.best)])
    figures.save_png(strip_png(picks), out / "recon.png")
    for r, rep in zip(runs, per_run):
        mean = rep["mean"]
        who = f"{r.label}: " if len(runs) > 1 else ""
        print(
            f"{who}{mean['clips']} clip(s): PSNR {_fmt(mean['psnr'], 2)} dB, SSIM {_fmt(mean['ssim'], 4)}, "
            f"LPIPS {_fmt(mean['lpips'], 4)}; {_fmt(mean['frames_per_s'], 1)} frames/s encode + decode"
        )
    print(f"wrote {', '.join(str(out / n) for n in OUTPUTS)}")
    failed = sum(len(r.failed) for r in runs)
    if failed:
        print(f"{failed} of {len(inputs) * len(runs)} input(s) skipped", file=sys.stderr)
        return 1
    return 0


def add_cli(sub: argparse._SubParsersAction) -> None:
    """Register `recon`."""
    p = sub.add_parser(
        "recon",
        help="tokenizer reconstruction report: PSNR / SSIM / LPIPS per clip, throughput, table and picture",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("input", metavar="IN", help="a folder, a meta file (.csv / .parquet), one file, or `sample`")
    p.add_argument(
        "--ckpt",
        required=True,
        action="append",
        help="tokenizer: a model folder or a release safetensors file (DC-AE, HunyuanVideo VAE, Flux AE); repeat to "
        "compare several in one report",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="where recon.json, recon.md and recon.png go")
    p.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), help="resize-to-fill + centre crop to H x W")
    p.add_argument("--num-frames", type=int, default=16, help="at most this many frames per clip (default 16)")
    p.add_argument("--stride", type=int, default=1, help="temporal stride in source frames (default 1)")
    p.add_argument(
        "--pad", action="store_true", help="pad sizes to the tokenizer's multiple (scored on the original area)"
    )
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="tokenizer dtype (default fp32)")
    p.add_argument("--tiling", choices=["auto", "on", "off"], default="auto", help="default: tile large inputs")
    p.add_argument(
        "--tile-size", type=int, default=None, help="spatial tile in pixels (default 256; HunyuanVAE: its config's)"
    )
    p.add_argument("--tile-frames", type=int, default=32, help="temporal tile in frames (default 32)")
    p.add_argument("--lpips.net", dest="lpips_net", choices=["alex", "vgg"], default="alex", help="default alex")
    p.add_argument(
        "--lpips.backbone",
        dest="lpips_backbone",
        default="",
        metavar="PATH",
        help="torchvision ImageNet checkpoint (default: looked up in the torch hub cache)",
    )
    p.add_argument("--lpips.heads", dest="lpips_heads", default="", metavar="PATH", help="default: the lpips package's")
    p.add_argument("--sample-dir", default="runs/sample_data", help="where `sample` is built (default %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="replace existing report files")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run_recon)
