"""The demo's `report.md`: figures, loss curves (matplotlib, Agg), reconstruction strips and sample frames."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from cinedit.data.video import ClipReader, is_image, probe, read_image, to_uint8
from cinedit.demo.plan import command_line, sample_size
from cinedit.eval import figures
from cinedit.runtime.files import atomic_path, write_text
from cinedit.runtime.logs import read_metrics

PHASES = {
    "data": "sample data, curation, loader epoch, decoding speed",
    "calibration": "calibration (a few timed steps of each run)",
    "recon": "held-out reconstructions (start, end, baseline)",
    "tokenizer": "tokenizer training",
    "calibrate": "tokenizer latent scale",
    "cache": "latent + text caches",
    "stage1": "generator stage 1",
    "stage2": "generator stage 2",
    "stage3": "generator stage 3",
    "samples": "sampling (3 videos)",
    "eval": "temporal flickering",
}
PLANNED_EXTRA = {"report": "drawing this report", "other": "start-up and between the phases"}
SHEET_FRAMES = 8  # frames shown per sample row (every other frame of 16)


def _plt():
    import matplotlib  # heavy: loaded only when a report is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after matplotlib.use("Agg"): no display needed

    return plt


def _series(rows: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    pts = [(r["step"], r[key]) for r in rows if key in r]
    if not pts:
        return np.zeros(0), np.zeros(0)
    steps, values = zip(*pts)
    return np.asarray(steps, dtype=float), np.asarray(values, dtype=float)


def _smooth(values: np.ndarray) -> np.ndarray:
    """A centred moving average over ~5% of the points (at least 1)."""
    k = max(1, len(values) // 20)
    if k == 1:
        return values
    padded = np.pad(values, (k // 2, k - 1 - k // 2), mode="edge")
    return np.convolve(padded, np.ones(k) / k, mode="valid")


def _save(fig, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    _plt().close(fig)
    return path


def tokenizer_curves(run_dir: Path, path: Path) -> Path:
    """Training L1 (raw and smoothed) and held-out PSNR of the EMA model over the tokenizer's steps."""

    plt = _plt()
    rows = read_metrics(run_dir)
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.8))
    steps, l1 = _series(rows, "loss/l1")
    a.plot(steps, l1, color="tab:blue", alpha=0.25, lw=0.8, label="per step")
    a.plot(steps, _smooth(l1), color="tab:blue", lw=1.8, label="moving average")
    a.set(title="tokenizer: training L1 loss", xlabel="step", ylabel="L1 (pixels in [-1, 1])")
    a.legend()
    steps, val = _series(rows, "val/psnr")
    b.plot(steps, val, "o-", color="tab:green")
    b.set(title="tokenizer: held-out PSNR (EMA model, trainer's eval)", xlabel="step", ylabel="PSNR (dB)")
    for ax in (a, b):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def generator_curves(stages: dict[str, dict], path: Path) -> Path:
    """Flow loss per step and the fixed-t eval loss of each stage on one step axis (stages one after another)."""

    plt = _plt()
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.8))
    offset = 0
    for (name, st), colour in zip(stages.items(), ("tab:blue", "tab:orange", "tab:green", "tab:red")):
        rows = read_metrics(st["run_dir"])
        steps, loss = _series(rows, "loss")
        a.plot(steps + offset, loss, color=colour, alpha=0.2, lw=0.8)
        a.plot(steps + offset, _smooth(loss), color=colour, lw=1.8, label=name)
        steps, ev = _series(rows, "eval/loss")
        b.plot(steps + offset, ev, "o-", color=colour, label=name)
        offset += int(max((r["step"] for r in rows), default=0))
        for ax in (a, b):
            ax.axvline(offset, color="grey", ls=":", lw=1)
    a.set(title="generator: rectified-flow training loss", xlabel="step (stages in sequence)", ylabel="loss")
    b.set(title="generator: t2v flow loss at t = 0.25 / 0.5 / 0.75", xlabel="step (stages in sequence)", ylabel="loss")
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    return _save(fig, path)


def _video_frames(path: str | Path, size: tuple[int, int] | None = None) -> list[np.ndarray]:
    """Every other frame (up to SHEET_FRAMES) of a video, or the single frame of an image, uint8 (H, W, 3)."""

    if is_image(path):
        return list(to_uint8(read_image(path, size)))
    n = probe(path, count_frames=True).num_frames
    with ClipReader(path) as reader:
        return list(reader.read(list(range(0, n, 2))[:SHEET_FRAMES]))


def sample_sheet(jobs: list[dict], size: tuple[int, int], path: Path) -> Path:
    """For each sample, its input (real clip, photograph or the video to inpaint) above the generated frames."""

    inputs = {"t2v": "real clip (prompt)", "i2v": "photograph", "inpaint": "input video"}
    panels = []
    for j in jobs:
        given = j["real"] or j["ref"]
        rows = [(inputs.get(j["name"], "input"), _video_frames(given, size))]
        rows.append(("generated", _video_frames(j["path"])))
        title = f"{j['name']}: {j['title']}; frames 0, 2, 4, ... (every other frame)"
        panels.append(figures.image_grid(rows, title, cell_height=96, label_width=150))
    return figures.save_png(figures.stack(panels), path)


def _rel(out: Path, path: str | Path) -> str:
    return os.path.relpath(path, out)


def _first_last(rows: list[dict], key: str, share: float = 0.1) -> tuple[float, float]:
    """Mean of `key` over the first and the last `share` of its logged steps."""
    _, v = _series(rows, key)
    if not len(v):
        return float("nan"), float("nan")
    k = max(1, round(len(v) * share))
    return float(v[:k].mean()), float(v[-k:].mean())


def _image_note(stats: dict) -> str:
    """The latent std of images (one latent frame) and of videos, with a warning when they differ 2x or more."""
    if "images" not in stats or "videos" not in stats:
        return ""
    ratio = stats["videos"]["std"] / stats["images"]["std"]
    if 0.5 < ratio < 2:
        return (
            f" Images get latents of std {stats['images']['std']:.3f} and videos {stats['videos']['std']:.3f} "
            f"(ratio {ratio:.2f}): one scale serves both."
        )
    return (
        f" Images (one frame) get latents with {ratio:.0f}x {'smaller' if ratio > 1 else 'larger'} std than videos "
        f"({stats['images']['std']:.4g} vs {stats['videos']['std']:.4g}): one scale cannot fit both, which hurts "
        f"the image batches and image-to-video from a photograph."
    )


def timing_rows(state: dict, planned: dict[str, float] | None = None) -> tuple[list[str], float]:
    """The timings table (with the plan's estimate per phase, when it has one) and the total seconds over every
    phase and every (resumed) call."""
    planned = planned or {}
    lines = [
        "| phase | planned (s) | wall time (s) | steps | s / step | calls | load avg (1 min) after |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    total = 0.0
    for key, runs in state["phases"].items():
        seconds, steps = sum(r["seconds"] for r in runs), sum(r["steps"] for r in runs)
        total += seconds
        per_step = f"{seconds / steps:.3f}" if steps else ""
        name = PHASES.get(key, key)
        plan = f"{planned[key]:.1f}" if key in planned else ""
        load = f"{runs[-1]['load']:.2f}"
        lines.append(f"| {name} | {plan} | {seconds:.1f} | {steps or ''} | {per_step} | {len(runs)} | {load} |")
    for key, name in PLANNED_EXTRA.items():
        if key in planned and key not in state["phases"]:
            lines.append(f"| {name} | {planned[key]:.1f} | | | | | |")
    plan_total = f"**{planned['total']:.1f}**" if "total" in planned else ""
    lines.append(f"| **total** | {plan_total} | **{total:.1f}** | | | | |")
    return lines, total


def plan_rows(plan: Any) -> list[str]:
    """The plan: where it came from, the budget, the machine, and per run its steps and calibrated costs."""
    info = plan.info
    lines = [f"Plan (`plan.json`): {plan.source or 'given'}."]
    if "budget_s" in info:
        lines[0] += (
            f" Budget --minutes {plan.minutes:g} ({info['budget_s']:.0f} s), planned for {info['target_s']:.0f} s; "
            f"estimated {info['estimate_s']['total']:.0f} s."
        )
    m = info.get("machine")
    if m:
        lines[0] += (
            f" Machine: {m['cores']} cores, {m['torch_threads']} torch thread(s), {m['data_workers']} data "
            f"workers; load average {m['load_before']:.2f} at the start, {m['load_1min']:.2f} after the calibration."
        )
    lines[0] += f" Seed {plan.seed}, device {plan.device}, {plan.threads} torch thread(s)."
    runs = info.get("calibration", {}).get("runs", {})
    lines += ["", "| run | steps | calibrated s / step | setup (s) | eval (s) | sample (s) | checkpoint (s) |"]
    lines.append("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for key, n in plan.steps.items():
        c = runs.get(key)
        costs = (
            f"{c['step_s']:.3f} | {c['setup_s']:.1f} | {c['eval_s']:.2f} | {c['sample_s']:.2f} | {c['save_s']:.2f}"
            if c
            else " | | | | "
        )
        lines.append(f"| {'sampling steps' if key == 'sample' else key} | {n} | {costs} |")
    return lines


def write_report(out: Path, ctx: dict[str, Any]) -> Path:
    """Draw the pictures and write `<out>/report.md` (atomically, last: its presence marks a finished demo)."""

    plan, recon, data = ctx["plan"], ctx["recon"], ctx["data"]
    tok_png = tokenizer_curves(ctx["tokenizer_dir"], out / "tokenizer_curves.png")
    gen_png = generator_curves(ctx["stages"], out / "generator_curves.png")
    sheet_png = sample_sheet(ctx["samples"], sample_size(), out / "samples.png")
    timings, total = timing_rows(ctx["state"], plan.info.get("estimate_s"))
    start, end = (
        json.loads((out / "eval" / f"recon_{k}" / "recon.json").read_text())["mean"] for k in ("start", "end")
    )
    base = recon["mean"]["baseline"]
    ar = recon["arithmetic"]
    tok_rows = read_metrics(ctx["tokenizer_dir"])
    _, val = _series(tok_rows, "val/psnr")
    heldout = ", ".join(Path(c["path"]).name for c in recon["clips"])
    cores = os.cpu_count()

    lines = [
        "# cinedit demo report",
        "",
        f"`{ctx.get('command', 'cinedit demo')}`: the two-stage "
        f"(tokenizer, then generator) pipeline on the bundled sample data, with the project's own commands (their "
        f"command lines are below). Wall time {total:.0f} s over all phases (and calls, when resumed) on {cores} "
        f"CPU core(s); the load average after each phase is in the table (other processes inflate the times).",
        "",
        "## Plan and timings",
        "",
        *plan_rows(plan),
        "",
        *timings,
        "",
        "Training steps include the trainers' setup, evaluations and checkpoints. `cinedit demo --plan plan.json` "
        "replays this plan (its step counts, seed and torch threads) without calibrating.",
        "",
        "## 1. Data",
        "",
        f"- sample data: `data/meta.csv` ({data['files']} files); after curation: `data/meta_filtered.csv` "
        f"({data['kept']} rows; dropped rows in `data/{data['dropped_report']}`)",
        "- one bucketed epoch of the resumable loader (256px / 128px buckets):",
        "",
        "| T x H x W | samples |",
        "| --- | ---: |",
        *[f"| {shape} | {n} |" for shape, n in data["epoch_shapes"].items()],
        "",
        "![first, middle and last frame of each batch's first sample](batches.png)",
        "",
        "Decoding speed (32 frames, 256x256, resize-to-fill + centre crop):",
        "",
        "| clip | frames/s |",
        "| --- | ---: |",
        *[f"| {Path(r['path']).name} | {r['frames_per_s']} |" for r in data["bench"]],
        "",
        "## 2. Tokenizer: did it learn?",
        "",
        f"`{command_line('tokenizer train', ctx['tokenizer_argv'])}`",
        "",
        f'{plan.tokenizer_steps} steps from random weights; "untrained" is the trainer\'s own initial model (same '
        f"preset and seed, `eval/tokenizer_init/`). Held-out clips (the trainer holds them out; never trained "
        f"on): {heldout}, scored by `cinedit eval recon` at {ar['clip'][1]} frames, {ar['clip'][2]}x{ar['clip'][3]} "
        f"(stride 2, as in training; reports in `eval/recon_start/`, `eval/recon_end/`).",
        "",
        "| model | PSNR (dB) | SSIM |",
        "| --- | ---: | ---: |",
        f"| untrained (step 0) | {start['psnr']:.2f} | {start['ssim']:.4f} |",
        f"| trained (step {plan.tokenizer_steps}) | {end['psnr']:.2f} | {end['ssim']:.4f} |",
        f"| baseline: average + resize to the same size | {base['psnr']:.2f} | {base['ssim']:.4f} |",
        "",
        f"Training moved held-out PSNR by {end['psnr'] - start['psnr']:+.2f} dB and SSIM by "
        f"{end['ssim'] - start['ssim']:+.4f}; the trained tokenizer is {abs(end['psnr'] - base['psnr']):.2f} dB "
        f"{'above' if end['psnr'] >= base['psnr'] else 'below'} the baseline in PSNR and "
        f"{'above' if end['ssim'] >= base['ssim'] else 'below'} it in SSIM. "
        + (f"The trainer's own held-out PSNR (8 frames) went {val[0]:.2f} -> {val[-1]:.2f} dB." if len(val) else ""),
        "",
        f"Equal size: a clip is 3 x {' x '.join(map(str, ar['clip'][1:]))} = {ar['pixels']:,} values. The "
        f"tokenizer's latent is {' x '.join(map(str, ar['latent']))} = {ar['latent_values']} values "
        f"({ar['pixels'] / ar['latent_values']:.0f}x fewer). The baseline keeps "
        f"{' x '.join(map(str, ar['baseline']))} = {ar['baseline_values']} values: each 4-frame group averaged into "
        f"one frame (the tokenizer's 4x temporal compression), area-downsampled to {ar['baseline'][2]}x"
        f"{ar['baseline'][3]} pixels (the largest size at the clip's aspect whose 3 x h x w fits the latent's "
        f"{ar['latent_values'] // ar['latent'][1]} values per latent frame), then trilinearly upsampled back.",
        "",
        f"![training L1 and held-out PSNR]({_rel(out, tok_png)})",
        "",
        "Reconstruction strips: original, untrained, trained and baseline reconstructions, and the trained "
        "model's error (|original - reconstruction| in [0, 1] units, x4; black is exact):",
        "",
        "![reconstruction strips](recon_strips.png)",
        "",
        "## 3. Generator: the stage chain on cached latents",
        "",
        f"A tokenizer trained from scratch has no latent scale (the `demo` preset's scaling factor is None): on the "
        f"generator's clips and shapes its latents have std {recon['latent']['std']:.3f} (mean "
        f"{recon['latent']['mean']:.3f}). `tokenizer_scaled/` is the same model with scaling_factor "
        f"{recon['latent']['std']:.3f} (the release's is 0.493), so the generator sees unit-variance latents."
        + _image_note(recon["latent"]),
        "",
    ]
    for name, st in ctx["stages"].items():
        rows = read_metrics(st["run_dir"])
        first, last = _first_last(rows, "loss")
        _, ev = _series(rows, "eval/loss")
        steps = plan.stage_steps[name]
        lines += [
            f"### {name}: {ctx['stage_titles'].get(name, '')}",
            "",
            f"`{command_line('generator train', st['argv'])}`",
            "",
            f"- cache `{_rel(out, st['cache_dir'])}` (`cinedit data cache`, the scaled tokenizer, MiniLM): "
            f"{st['cache']['entries']} entries, {st['cache']['unbucketed']} rows fit no bucket",
            f"- {steps} steps; flow loss {first:.4f} (first 10% of steps) -> {last:.4f} (last 10%)",
        ]
        if len(ev):
            lines.append(f"- t2v eval loss (fixed batches, t and noise): {ev[0]:.4f} at step 0 -> {ev[-1]:.4f}")
        lines.append("")
    lines += [
        f"![flow losses per stage]({_rel(out, gen_png)})",
        "",
        "## 4. Samples",
        "",
        f"From the last stage's pipeline, {plan.sample_steps} sampling steps, seed {plan.seed}:",
        "",
    ]
    for j in ctx["samples"]:
        lines += [f'- [{j["name"]}]({_rel(out, j["path"])}): {j["title"]}; prompt "{j["prompt"]}"', ""]
        lines += [f"  `{command_line('generator', j['argv'])}`", ""]
    flick = ctx["flicker"]
    lines += [
        f"![inputs and generated frames]({_rel(out, sheet_png)})",
        "",
        "## 5. Evaluation",
        "",
        "VBench temporal flickering (weight-free: per video, (255 - mean |frame[t+1] - frame[t]|) / 255, averaged "
        "over frame pairs, then over videos; `cinedit.eval.vbench`, without VBench's static-video filter). Higher "
        "means smoother; a still video scores 1, so a blurry, nearly static sample scores high too: read it next to "
        "the real clips.",
        "",
        "| video | temporal flickering |",
        "| --- | ---: |",
        *[f"| {_rel(out, r['video_path'])} | {r['video_results']:.4f} |" for r in flick["per_sample"]],
        f"| **samples (mean)** | **{flick['samples']:.4f}** |",
        *[f"| real: {_rel(out, r['video_path'])} | {r['video_results']:.4f} |" for r in flick["per_real"]],
        f"| **real clips (mean)** | **{flick['real']:.4f}** |",
        "",
        "## Re-running",
        "",
        "Run the same command again to resume an interrupted demo (finished steps are reused, the trainers continue "
        "from their last checkpoint, with the same plan); a finished demo asks for `--overwrite`. `plan.json` holds "
        "the plan, `demo.json` the timings of every call.",
        "",
    ]
    return write_text(out / "report.md", "\n".join(lines))
