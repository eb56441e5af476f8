"""`cinedit eval vbench generate | score | report`: the VBench text-to-video benchmark, end to end.

- generate: sample a prompt suite in VBench's format (one prompt a line, or VBench_full_info.json), or the standard
  946 prompts of a VBench checkout (--vbench-dir), 5 samples per prompt named `{prompt}-{index}.mp4` as VBench
  looks them up. Sample i of every prompt uses seed --seed + i, so a sample does not depend on the order or on
  what was generated before: an interrupted run resumes, keeping the samples that exist.
- score: run the official `vbench` evaluation, one dimension at a time, in its own Python environment
  (--vbench-python; it pins old transformers / numpy and downloads its models) and collect its result files
  (`<dimension>_eval_results.json`). Temporal flickering needs no learned weights and can be computed in this
  process instead (--in-process), with VBench's definition: per video, the mean absolute difference of consecutive
  RGB frames (0..255) over all pixels and channels, averaged over frame pairs, scored (255 - mean) / 255; the
  dimension's score is the mean over videos. (VBench's leaderboard procedure can first keep only static videos for
  this dimension with its `static_filter` step, which needs optical-flow weights; --in-process does not filter.)
- report: per-dimension scores, VBench's min-max normalisation, Quality (7 dimensions), Semantic (9) and Total =
  (4 Quality + Semantic) / 5 with VBench's weights (dynamic degree 0.5), as JSON, a Markdown table and a bar chart.
  Unknown dimension names are refused.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

from cinedit.data.video import ClipReader, probe
from cinedit.eval import figures
from cinedit.eval.vbench_constants import (
    DIM_WEIGHT,
    NORMALIZE,
    QUALITY,
    QUALITY_WEIGHT,
    SAMPLES_PER_PROMPT,
    SEMANTIC,
    SEMANTIC_WEIGHT,
    STANDARD_PROMPTS,
)
from cinedit.generator.generate import DTYPES, InputError, generate, latent_shape, output_size, spatial_multiple
from cinedit.generator.pipeline import load_pipeline
from cinedit.runtime.dist import resolve_device
from cinedit.runtime.files import write_json, write_text
from cinedit.tokenizer.commands import write_frames

DIMENSIONS: tuple[str, ...] = QUALITY + SEMANTIC
IN_PROCESS = ("temporal_flickering",)  # the dimensions that need no learned weights
RESULT_SUFFIX = "_eval_results.json"
RUNNER = Path(__file__).with_name("vbench_runner.py")
NO_VBENCH = 3  # vbench_runner's exit code when its Python has no `vbench`
REPORT_FILES = ("vbench.json", "vbench.md", "vbench.png")
VIDEO_SUFFIXES = (".mp4", ".gif")
MAX_NAME_BYTES = 255  # a file-name component on common file systems


class VBenchError(ValueError):
    """An input the VBench commands cannot use; the message says how to fix it."""


# ---------------------------------------------------------------------------------------------------- scores


def canonical(name: str) -> str:
    """A dimension name as VBench's result files spell it ("Subject consistency" -> "subject_consistency")."""
    key = name.strip().lower().replace(" ", "_").replace("-", "_")
    if key not in NORMALIZE:
        close = difflib.get_close_matches(key, DIMENSIONS, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise VBenchError(f"unknown VBench dimension {name!r}{hint}; the 16 dimensions are: {', '.join(DIMENSIONS)}")
    return key


def check_scores(scores: dict[str, float]) -> dict[str, float]:
    """Scores keyed by canonical dimension names, each a fraction in [0, 1] as VBench writes them."""
    out: dict[str, float] = {}
    for name, value in scores.items():
        dim = canonical(name)
        if dim in out:
            raise VBenchError(f"dimension {dim} is given twice")
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise VBenchError(f"{dim}: score must be a number, got {value!r}")
        if not 0.0 <= value <= 1.0:
            hint = " (it looks like a percentage: divide by 100)" if 1.0 < value <= 100.0 else ""
            raise VBenchError(f"{dim}: VBench scores are fractions in [0, 1], got {value}{hint}")
        out[dim] = float(value)
    return out


def aggregate(scores: dict[str, float]) -> dict:
    """VBench's leaderboard numbers from per-dimension scores (fractions in [0, 1]).

    Returns {"scores", "normalized" (unweighted, per dimension), "quality", "semantic", "total" (fractions; None when
    a dimension of the group is missing: VBench's own script would count it as 0), "missing"}.
    """
    scores = check_scores(scores)
    norm = {d: (s - NORMALIZE[d][0]) / (NORMALIZE[d][1] - NORMALIZE[d][0]) for d, s in scores.items()}

    def group(dims: tuple[str, ...]) -> float | None:
        if any(d not in norm for d in dims):
            return None
        return sum(norm[d] * DIM_WEIGHT[d] for d in dims) / sum(DIM_WEIGHT[d] for d in dims)

    quality, semantic = group(QUALITY), group(SEMANTIC)
    total = None
    if quality is not None and semantic is not None:
        total = (QUALITY_WEIGHT * quality + SEMANTIC_WEIGHT * semantic) / (QUALITY_WEIGHT + SEMANTIC_WEIGHT)
    ordered = [d for d in DIMENSIONS if d in scores]
    return {
        "scores": {d: scores[d] for d in ordered},
        "normalized": {d: norm[d] for d in ordered},
        "quality": quality,
        "semantic": semantic,
        "total": total,
        "missing": [d for d in DIMENSIONS if d not in scores],
    }


def read_scores(paths: list[str | os.PathLike]) -> dict[str, float]:
    """Per-dimension scores from VBench result files (`{dim: [score, per-video results]}`), folders of them
    (`*_eval_results.json`), or plain `{dim: score}` JSON files."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(p.glob(f"*{RESULT_SUFFIX}"))
            if not found:
                raise VBenchError(f"{p}: no *{RESULT_SUFFIX} files (run `cinedit eval vbench score` first)")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise VBenchError(f"{p}: no such file or folder")
    scores: dict[str, float] = {}
    for f in files:
        try:
            doc = json.loads(f.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise VBenchError(f"{f}: not a JSON file ({e})") from None
        if not isinstance(doc, dict):
            raise VBenchError(f"{f}: expected a JSON object {{dimension: score}}, got {type(doc).__name__}")
        for key, value in doc.items():
            value = value[0] if isinstance(value, list) and value else value  # VBench: [mean, per-video list]
            dim = canonical(key)
            if dim in scores:
                raise VBenchError(f"{f}: dimension {dim} is also given by another file")
            scores[dim] = value
    return check_scores(scores)


# ---------------------------------------------------------------------------------------------------- flickering


def flicker_score(path: str | os.PathLike) -> float:
    """VBench's temporal-flickering score of one video: (255 - mean |frame[t+1] - frame[t]|) / 255."""
    info = probe(path, count_frames=True)
    if info.is_image or info.num_frames < 2:
        raise VBenchError(f"{path}: temporal flickering needs a video of at least 2 frames")
    with ClipReader(path) as reader:
        frames = reader.read(list(range(info.num_frames)))  # (T, H, W, 3) uint8
    diffs = [np.abs(b.astype(np.float32) - a.astype(np.float32)).mean() for a, b in zip(frames[:-1], frames[1:])]
    return (255.0 - float(np.mean(diffs))) / 255.0


def temporal_flickering(videos: list[Path], progress: bool = True) -> tuple[float, list[dict]]:
    """(mean score, per-video results) in VBench's result layout."""
    per_video = [
        {"video_path": str(v), "video_results": flicker_score(v)}
        for v in tqdm(videos, desc="temporal_flickering", unit="video", disable=not progress)
    ]
    return sum(r["video_results"] for r in per_video) / len(per_video), per_video


# ---------------------------------------------------------------------------------------------------- prompts


def read_prompt_suite(path: str | os.PathLike) -> list[str]:
    """Prompts of a suite in VBench's formats: a text file (one a line, like prompts/all_dimension.txt) or a
    VBench_full_info.json list ({"prompt_en": ...}); duplicates are dropped, order kept."""
    path = Path(path)
    if not path.is_file():
        raise VBenchError(f"--prompts {path}: no such file (one prompt a line, or VBench_full_info.json)")
    if path.suffix.lower() == ".json":
        try:
            doc = json.loads(path.read_text())
            prompts = [d["prompt_en"] if isinstance(d, dict) else d for d in doc]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise VBenchError(f"{path}: not a VBench_full_info.json list of {{'prompt_en': ...}} ({e})") from None
    else:
        prompts = path.read_text().splitlines()
    prompts = list(dict.fromkeys(p.strip() for p in prompts if isinstance(p, str) and p.strip()))
    if not prompts:
        raise VBenchError(f"{path}: no prompts")
    return prompts


def standard_suite(vbench_dir: str | os.PathLike) -> Path:
    """The standard prompt list (all 16 dimensions) in a VBench checkout."""
    root = Path(vbench_dir)
    for rel in ("prompts/all_dimension.txt", "prompts/prompts_per_dimension/all_dimension.txt"):
        if (root / rel).is_file():
            return root / rel
    raise VBenchError(
        f"--vbench-dir {root}: no prompts/all_dimension.txt; point it at a clone of https://github.com/Vchitect/VBench"
    )


def full_info_file(vbench_dir: str | os.PathLike) -> Path | None:
    """VBench_full_info.json (prompts and their dimensions) in a VBench checkout, if there."""
    root = Path(vbench_dir)
    found = [root / r for r in ("vbench/VBench_full_info.json", "VBench_full_info.json") if (root / r).is_file()]
    return found[0] if found else None


def sample_name(prompt: str, index: int) -> str:
    """VBench's file name for sample `index` of `prompt`: `{prompt}-{index}.mp4`."""
    name = f"{prompt}-{index}.mp4"
    if "/" in prompt or "\0" in prompt:
        raise VBenchError(f"prompt {prompt!r} has a '/': VBench names files by the prompt, so it cannot be a file name")
    if len(name.encode()) > MAX_NAME_BYTES:
        raise VBenchError(f"prompt {prompt[:60]!r}... is too long for a file name ({len(name.encode())} bytes)")
    return name


def videos_for(videos_dir: Path, dimension: str, full_info: Path | None) -> list[Path]:
    """The videos a dimension is scored on: with a VBench_full_info.json, those of the prompts tagged with the
    dimension (as VBench's standard mode picks them); otherwise every video in the folder."""
    if not videos_dir.is_dir():
        raise VBenchError(f"{videos_dir}: no such folder of sampled videos")
    # Hidden files are write_video's half-written temporaries.
    present = sorted(p for p in videos_dir.iterdir() if p.suffix.lower() in VIDEO_SUFFIXES and p.name[0] != ".")
    if full_info is not None:
        doc = json.loads(Path(full_info).read_text())
        prompts = [d["prompt_en"] for d in doc if dimension in d.get("dimension", [])]
        names = {p.name: p for p in present}
        present = [names[n] for pr in prompts for i in range(SAMPLES_PER_PROMPT) if (n := f"{pr}-{i}.mp4") in names]
    if not present:
        raise VBenchError(
            f"{videos_dir}: no videos to score for {dimension} (generate them with `cinedit eval vbench generate`)"
        )
    return present


# ---------------------------------------------------------------------------------------------------- generate


def run_generate(args: argparse.Namespace) -> int:
    """The `generate` subcommand; returns the exit code."""
    try:
        if bool(args.prompts) == bool(args.vbench_dir):
            raise VBenchError("give the prompt suite as --prompts FILE or the standard one with --vbench-dir DIR")
        suite = Path(args.prompts) if args.prompts else standard_suite(args.vbench_dir)
        prompts = read_prompt_suite(suite)
        if args.vbench_dir and len(prompts) != STANDARD_PROMPTS:
            print(
                f"warning: {suite}: {len(prompts)} prompts; the standard suite has {STANDARD_PROMPTS}", file=sys.stderr
            )
        prompts = prompts[: args.limit] if args.limit else prompts
        if args.samples < 1 or args.num_frames < 2:
            raise VBenchError("--samples must be at least 1 and --num-frames at least 2 (VBench scores videos)")
        out = Path(args.out)
        todo = [(p, i, out / sample_name(p, i)) for p in prompts for i in range(args.samples)]
        total = len(todo)
        todo = [t for t in todo if args.overwrite or not t[2].exists()]
        if not todo:
            print(f"all {total} samples exist in {out}; nothing to do")
            return 0
        device = resolve_device(args.device)
        pipe = load_pipeline(args.ckpt, device=device)
        dtype = args.dtype if args.dtype != "auto" else ("bf16" if device.type == "cuda" else "fp32")
        pipe.generator.to(DTYPES[dtype])
        multiple = spatial_multiple(pipe)
        size = tuple(args.size) if args.size else output_size(args.resolution, args.aspect_ratio, multiple)
        latent_shape(pipe, args.num_frames, *size)
        given = dict(num_steps=args.steps, guidance=args.guidance, seed=args.seed)
        cfg = dataclasses.replace(pipe.sampler, **{k: v for k, v in given.items() if v is not None})
    except (VBenchError, InputError, FileNotFoundError, ValueError) as e:
        print(f"cinedit eval vbench generate: error: {e}", file=sys.stderr)
        return 2
    print(f"{total - len(todo)} of {total} samples exist (kept); generating {len(todo)} at {size[0]}x{size[1]}")
    for prompt, i, path in tqdm(todo, desc="vbench samples", unit="video", disable=args.quiet):
        video = generate(pipe, prompt, args.num_frames, *size, dataclasses.replace(cfg, seed=cfg.seed + i))
        write_frames(path, video, pipe.fps)
    seeds = f"{cfg.seed}..{cfg.seed + args.samples - 1}"
    print(f"{total} samples in {out} ({len(prompts)} prompts x {args.samples}), seeds {seeds}")
    return 0


# ---------------------------------------------------------------------------------------------------- score


def _dimensions(spec: str) -> list[str]:
    if spec == "all":
        return list(DIMENSIONS)
    return list(dict.fromkeys(canonical(d) for d in spec.split(",") if d.strip()))


def check_vbench_python(python: str) -> dict:
    """{"version", "full_info" (the prompt-suite file the package ships, or "")} of the `vbench` in `python`'s
    environment, or VBenchError saying how to set one up."""
    python = shutil.which(python) or python
    if not (Path(python).is_file() and os.access(python, os.X_OK)):
        raise VBenchError(f"--vbench-python {python}: no such executable (the `python` of an environment with vbench)")
    proc = subprocess.run([python, str(RUNNER), "--check"], capture_output=True, text=True)
    if proc.returncode == NO_VBENCH:
        raise VBenchError(
            f"--vbench-python {python} has no `vbench` package. VBench pins old transformers / numpy, so give it its "
            f"own environment: `python -m venv vbench-env && vbench-env/bin/pip install vbench` (plus torch / "
            f"torchvision for your GPU), then pass --vbench-python vbench-env/bin/python"
        )
    if proc.returncode != 0:
        raise VBenchError(f"--vbench-python {python} failed to import vbench:\n{proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_official(args: argparse.Namespace, dim: str, out: Path, full_info: Path | None) -> None:
    """One dimension through the official evaluation in the VBench environment; its output goes to `<dim>.log`."""
    cmd = [args.vbench_python, str(RUNNER), "--videos", str(args.videos), "--dimension", dim, "--output", str(out)]
    cmd += ["--mode", args.mode, "--device", args.device]
    if full_info is not None:
        cmd += ["--full-info", str(full_info)]
    if args.local:
        cmd.append("--local")
    log = out / f"{dim}.log"
    with open(log, "w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        tail = "\n".join(log.read_text().splitlines()[-15:])
        raise VBenchError(f"VBench failed on {dim} (exit {rc}); the end of {log}:\n{tail}")


def write_result(path: Path, dim: str, score: float, per_video: list[dict]) -> None:
    """A result file in VBench's layout: {dim: [score, per-video results]}, atomically."""
    write_text(path, json.dumps({dim: [score, per_video]}, indent=2) + "\n")


def run_score(args: argparse.Namespace) -> int:
    """The `score` subcommand; returns the exit code."""
    try:
        dims = _dimensions(args.dimensions)
        videos = Path(args.videos)
        if not videos.is_dir():
            raise VBenchError(f"{videos}: no such folder of sampled videos")
        full_info = Path(args.full_info) if args.full_info else None
        if full_info is None and args.vbench_dir:
            full_info = full_info_file(args.vbench_dir)
            if full_info is None:
                raise VBenchError(f"--vbench-dir {args.vbench_dir}: no vbench/VBench_full_info.json (a VBench clone?)")
        if full_info is not None and not full_info.is_file():
            raise VBenchError(f"--full-info {full_info}: no such file")
        if args.in_process:
            other = [d for d in dims if d not in IN_PROCESS]
            if other:
                raise VBenchError(
                    f"--in-process computes only {', '.join(IN_PROCESS)}; {', '.join(other)} need VBench's models: "
                    f"pass --vbench-python instead"
                )
        elif not args.vbench_python:
            raise VBenchError(
                "--vbench-python PYTHON is required (an environment with `pip install vbench`), "
                "or --in-process for temporal_flickering alone"
            )
        else:
            found = check_vbench_python(args.vbench_python)
            if args.mode == "vbench_standard" and full_info is None and not found["full_info"]:
                raise VBenchError(
                    f"vbench {found['version']} ships no VBench_full_info.json, which the standard mode needs: "
                    f"pass --full-info FILE or --vbench-dir DIR (a VBench checkout)"
                )
            print(f"vbench {found['version']} in {args.vbench_python}")
    except VBenchError as e:
        print(f"cinedit eval vbench score: error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    failed = []
    for dim in tqdm(dims, desc="dimensions", unit="dim", disable=args.quiet or len(dims) == 1):
        result = out / f"{dim}{RESULT_SUFFIX}"
        if result.exists() and not args.overwrite:
            tqdm.write(f"{result} exists, kept (pass --overwrite to redo it)")
            continue
        try:
            if args.in_process:
                score, per_video = temporal_flickering(videos_for(videos, dim, full_info), progress=not args.quiet)
                write_result(result, dim, score, per_video)
            else:
                run_official(args, dim, out, full_info)
                if not result.is_file():
                    raise VBenchError(f"VBench exited normally but wrote no {result}")
            read_scores([result])  # the file must be readable as VBench's layout
        except (VBenchError, ValueError) as e:
            failed.append(dim)
            print(f"cinedit eval vbench score: error: {e}", file=sys.stderr)
    done: dict[str, float] = {}
    for d in dims:
        if d not in failed and (out / f"{d}{RESULT_SUFFIX}").is_file():
            done.update(read_scores([out / f"{d}{RESULT_SUFFIX}"]))
    for d, s in done.items():
        print(f"  {d:<24} {100 * s:6.2f}%")
    write_json(out / "scores.json", done)
    if failed:
        print(f"{len(failed)} of {len(dims)} dimension(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


# ---------------------------------------------------------------------------------------------------- report


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}%"


def markdown(agg: dict, sources: list[str]) -> str:
    """The report table: per dimension raw and normalised score, then Quality, Semantic and Total."""
    lines = [
        "# VBench",
        "",
        f"From {', '.join(sources)}. Normalised with VBench's min-max table; Quality and Semantic are weighted means "
        f"(dynamic degree weighs 0.5), Total = (4 Quality + Semantic) / 5.",
        "",
        "| dimension | group | score | normalised | weight |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for d in DIMENSIONS:
        group = "quality" if d in QUALITY else "semantic"
        s, n = agg["scores"].get(d), agg["normalized"].get(d)
        lines.append(f"| {d.replace('_', ' ')} | {group} | {_pct(s)} | {_pct(n)} | {DIM_WEIGHT[d]:g} |")
    lines += [
        "",
        "| | score |",
        "| --- | ---: |",
        f"| **Quality** | **{_pct(agg['quality'])}** |",
        f"| **Semantic** | **{_pct(agg['semantic'])}** |",
        f"| **Total** | **{_pct(agg['total'])}** |",
    ]
    if agg["missing"]:
        lines += [
            "",
            f"Missing ({len(agg['missing'])}): {', '.join(agg['missing'])}; groups with a missing dimension "
            "are n/a (VBench's own script would count it as 0).",
        ]
    return "\n".join(lines) + "\n"


def chart(agg: dict):
    """Bar chart: Total, Quality, Semantic, then each dimension's normalised score (missing ones marked)."""

    dark, q_col, s_col = (40, 40, 40), (66, 133, 244), (244, 160, 0)

    def pct(x: float | None) -> float | None:
        return None if x is None else 100 * x

    bars = [("Total", pct(agg["total"]), dark), ("Quality", pct(agg["quality"]), dark)]
    bars.append(("Semantic", pct(agg["semantic"]), dark))
    for d in DIMENSIONS:
        bars.append((d.replace("_", " "), pct(agg["normalized"].get(d)), q_col if d in QUALITY else s_col))
    title = f"VBench: Total {_pct(agg['total'])}, Quality {_pct(agg['quality'])}, Semantic {_pct(agg['semantic'])}"
    return figures.bar_chart(bars, title, note="normalised scores (%); blue = quality, orange = semantic")


def run_report(args: argparse.Namespace) -> int:
    """The `report` subcommand; returns the exit code."""

    out = Path(args.out)
    existing = [out / n for n in REPORT_FILES if (out / n).exists()]
    try:
        if existing and not args.overwrite:
            raise VBenchError(f"{', '.join(map(str, existing))} exist(s); pass --overwrite to replace them")
        agg = aggregate(read_scores(args.results))
    except VBenchError as e:
        print(f"cinedit eval vbench report: error: {e}", file=sys.stderr)
        return 2
    write_json(out / "vbench.json", agg)
    write_text(out / "vbench.md", markdown(agg, args.results))
    figures.save_png(chart(agg), out / "vbench.png")
    print(
        f"Total {_pct(agg['total'])}, Quality {_pct(agg['quality'])}, Semantic {_pct(agg['semantic'])} "
        f"({len(agg['scores'])} of {len(DIMENSIONS)} dimensions); wrote {', '.join(str(out / n) for n in REPORT_FILES)}"
    )
    return 0


# ---------------------------------------------------------------------------------------------------- cli


def add_cli(sub: argparse._SubParsersAction) -> None:
    """Register `vbench` with its `generate`, `score` and `report` subcommands."""
    v = sub.add_parser(
        "vbench",
        help="VBench: generate the prompt suite, score it with the official evaluator, report the totals",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    vsub = v.add_subparsers(dest="vbench_command", required=True, metavar="STEP")

    g = vsub.add_parser("generate", help="sample a prompt suite, 5 videos per prompt, named as VBench expects")
    g.add_argument("--prompts", metavar="FILE", help="prompt suite: one prompt a line, or VBench_full_info.json")
    g.add_argument("--vbench-dir", metavar="DIR", help="a VBench checkout: its standard 946 prompts")
    g.add_argument("--ckpt", required=True, metavar="PIPELINE_DIR", help="pipeline folder (a training run's `model`)")
    g.add_argument("--out", required=True, metavar="DIR", help="folder for the videos")
    g.add_argument("--samples", type=int, default=SAMPLES_PER_PROMPT, help="videos per prompt (default 5)")
    g.add_argument("--num-frames", type=int, default=32, help="a multiple of 4 (default 32)")
    g.add_argument("--resolution", default="256px", help="bucket resolution (default 256px)")
    g.add_argument("--aspect-ratio", default="16:9", help="width:height (default 16:9)")
    g.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), help="explicit size instead of the bucket")
    g.add_argument("--steps", type=int, help="sampling steps (default: the pipeline's)")
    g.add_argument("--guidance", type=float, help="text guidance scale (default: the pipeline's)")
    g.add_argument("--seed", type=int, help="sample i of every prompt uses seed + i (default: the pipeline's seed)")
    g.add_argument("--limit", type=int, default=0, help="only the first N prompts (smoke runs)")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    g.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default="auto", help="auto: bf16 on GPU, else fp32")
    g.add_argument("--overwrite", action="store_true", help="regenerate samples that exist (default: keep them)")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    g.set_defaults(func=run_generate)

    s = vsub.add_parser("score", help="run the official VBench evaluation per dimension and collect its results")
    s.add_argument("videos", metavar="VIDEOS", help="folder of sampled videos")
    s.add_argument("--out", required=True, metavar="DIR", help="folder for <dimension>_eval_results.json files")
    s.add_argument("--dimensions", default="all", help="comma-separated dimensions, or all (default)")
    s.add_argument("--vbench-python", metavar="PYTHON", help="the python of an environment with `vbench` installed")
    s.add_argument("--in-process", action="store_true", help="compute temporal_flickering here, without vbench")
    s.add_argument("--vbench-dir", metavar="DIR", help="a VBench checkout (its VBench_full_info.json)")
    s.add_argument("--full-info", metavar="JSON", help="VBench_full_info.json (default: vbench's own)")
    s.add_argument("--mode", choices=["vbench_standard", "custom_input"], default="vbench_standard")
    s.add_argument("--device", default="cuda", help="device for VBench's models (default cuda)")
    s.add_argument("--local", action="store_true", help="VBench loads its weights from its local cache only")
    s.add_argument("--overwrite", action="store_true", help="redo dimensions whose result file exists")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=run_score)

    r = vsub.add_parser("report", help="normalise, weight and total the scores; Markdown table and bar chart")
    r.add_argument("results", nargs="+", metavar="RESULTS", help="result folders or JSON files")
    r.add_argument("--out", required=True, metavar="DIR", help="where vbench.json, vbench.md and vbench.png go")
    r.add_argument("--overwrite", action="store_true", help="replace existing report files")
    r.set_defaults(func=run_report)
