"""Side by side in one command: the demo's tokenizer trained with subnormal floats flushed to zero (the trainers'
opt-in `train.flush_denormal`) and kept, with the median step per block of steps for video and image batches.

    .venv/bin/python scripts/bench_denormals.py --steps 200 --threads 2 --out runs/bench_denormals

Both runs are the demo's `cinedit tokenizer train debug` argv (the `demo` DC-AE, its schedule, seeds 42) on the
sample data (`--meta`: your own curated CSV instead), without the adversarial phase; they alternate block by block
in the table, not in time (the flushed run first), each in a fresh process: the mode is per thread, and torch's
intra-op threads take it from the thread that starts them, so a second run in one process would inherit the
first's. Writes `<out>/bench.json`.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import sys
from pathlib import Path

import torch

from cinedit.configs import config_from_argv
from cinedit.data.sample import build_sample_data
from cinedit.demo.calibrate import time_run
from cinedit.demo.plan import TOKENIZER_CROP_SCALE, TOKENIZER_MODEL, TOKENIZER_PRESET, tokenizer_schedule
from cinedit.tokenizer import train as tokenizer_train


def tokenizer_config(meta: Path, steps: int, out: Path, flush: bool):
    argv = [
        TOKENIZER_PRESET,
        f"--data.meta={meta}",
        f"--model.preset={TOKENIZER_MODEL}",
        f"--data.crop_scale={TOKENIZER_CROP_SCALE}",
        *tokenizer_schedule(steps),
        f"--disc.start={steps + 1}",
        f"--train.steps={steps}",
        "--train.eval_every=0",
        "--train.ckpt_every=0",
        "--train.progress=false",
        "--train.device=cpu",
        f"--train.flush_denormal={str(flush).lower()}",
        f"--train.out_dir={out}",
        "--train.overwrite=true",
    ]
    return config_from_argv("tokenizer", argv)


def timed_run(meta: Path, steps: int, out: Path, flush: bool, threads: int) -> list[float]:
    """One run's step intervals (steps 2..N), in the process that calls it."""
    torch.set_num_threads(threads)
    cfg, name = tokenizer_config(meta, steps, out, flush)
    return time_run(cfg, name, tokenizer_train.HOOKS)["step_intervals_s"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--steps", type=int, default=200, help="training steps of each run (default 200)")
    p.add_argument("--block", type=int, default=25, help="steps per row of the table (default 25)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads (default: torch's)")
    p.add_argument("--meta", type=Path, help="a curated CSV (default: the sample data, built into OUT)")
    p.add_argument("--out", type=Path, default=Path("runs/bench_denormals"))
    args = p.parse_args(argv)
    if args.steps < 2 * args.block:
        p.error(f"--steps {args.steps} must be at least two blocks (--block {args.block})")
    sample = args.out / "sample_data"
    meta = args.meta or (sample / "meta.csv" if (sample / "meta.csv").is_file() else build_sample_data(sample))
    if not meta.is_file():
        p.error(f"--meta {meta} is not a file")
    cfg, _ = tokenizer_config(meta, args.steps, args.out, True)
    images = [tokenizer_train.image_step(cfg.train.seed, n, cfg.train.image_share) for n in range(2, args.steps + 1)]
    runs = {}
    for flag in (True, False):
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            job = (meta, args.steps, args.out / f"flush_{flag}".lower(), flag, args.threads)
            runs[flag] = pool.apply(timed_run, job)
    rows = []
    print(f"{args.threads} torch threads; median seconds a step (steps counted from 2: step 1 builds the kernels)")
    print("| steps | video, flushed | video, kept | image, flushed | image, kept |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for lo in range(0, args.steps - 1, args.block):
        row: dict = {"steps": [lo + 2, min(lo + 1 + args.block, args.steps)]}
        for flag, times in runs.items():
            for kind, want in (("video", False), ("image", True)):
                block = [t for t, im in zip(times[lo : lo + args.block], images[lo : lo + args.block]) if im == want]
                row[f"{kind}_{'flushed' if flag else 'kept'}_s"] = round(statistics.median(block), 3) if block else None
        rows.append(row)
        cells = [row[k] for k in ("video_flushed_s", "video_kept_s", "image_flushed_s", "image_kept_s")]
        text = " | ".join("-" if c is None else f"{c:.3f}" for c in cells)
        print(f"| {row['steps'][0]}-{row['steps'][1]} | {text} |")
    totals = {("flushed" if k else "kept"): round(sum(v), 2) for k, v in runs.items()}
    print(f"steps 2-{args.steps} in all: flushed {totals['flushed']} s, kept {totals['kept']} s")
    args.out.mkdir(parents=True, exist_ok=True)
    doc = {"threads": args.threads, "steps": args.steps, "rows": rows, "total_s": totals}
    (args.out / "bench.json").write_text(json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
