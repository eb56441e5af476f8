"""The demo's calibration: a few real training steps of every trained run, timed, before the plan is chosen.

Each run (tokenizer, stage1, stage2, stage3) goes through the trainers' own loop (`run_training` with the trainer's
hooks, on the demo's presets and overrides, in a throwaway folder) for `CALIBRATION_STEPS` steps: one warm-up step
and five timed ones (a step's cost is their median; the tokenizer's run is longer, to time plain and adversarial
steps, video and image ones, apart after its first reads: `plan.tokenizer_step_cost`), with one evaluation at
step 0 and at the end, one validation sample and one checkpoint, each timed too. The generator stages train on a
latent cache of the sample data made with the (barely trained) calibration tokenizer, which also times the cache
the real run builds; one real `generator sample` times the samples. What the trainers build, load and export
falls to `setup_s`. `derive_steps` (plan.py) turns these costs and the budget into step counts.
"""

from __future__ import annotations

import dataclasses
import shutil
import statistics
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from cinedit.runtime.training import run_training

CALIBRATION_STEPS = 6  # one warm-up step, then five timed ones


class Timer:
    """Wraps trainer hooks; records (start, end) of every call of each."""

    def __init__(self) -> None:
        self.calls: dict[str, list[tuple[float, float]]] = {}

    def wrap(self, name: str, fn: Callable | None) -> Callable | None:
        if fn is None:
            return None

        def timed(*args: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*args)
            finally:
                self.calls.setdefault(name, []).append((t0, time.perf_counter()))

        return timed

    def mean(self, name: str) -> float:
        calls = self.calls.get(name, [])
        return sum(b - a for a, b in calls) / len(calls) if calls else 0.0


def calibration_overrides(steps: int = CALIBRATION_STEPS) -> list[str]:
    """Appended to a demo run's argv (later overrides win): a few steps, one eval / sample / checkpoint at the end."""
    return [
        f"--train.steps={steps}",
        f"--train.eval_every={steps}",
        f"--train.sample_every={steps}",
        "--train.ckpt_every=0",  # the trainer still saves the last step
        "--train.progress=false",
    ]


def time_run(cfg: Any, preset: str, hooks: Any) -> dict[str, float]:
    """Train `cfg` (a calibration config) with `hooks` timed; returns its costs (seconds)."""

    timer = Timer()
    timed = dataclasses.replace(
        hooks,
        train_step=timer.wrap("step", hooks.train_step),
        evaluate=timer.wrap("eval", hooks.evaluate),
        sample=timer.wrap("sample", hooks.sample),
        save=timer.wrap("save", hooks.save),
    )
    t0 = time.perf_counter()
    run_training(cfg, timed, preset)
    total = time.perf_counter() - t0
    ends = [b for _, b in timer.calls["step"]]
    # From the end of one step to the end of the next: a step with its data loading and logging. The median, as
    # the first batch of each bucket shape is slow (new kernels); a long run pays that once per shape.
    intervals = [b - a for a, b in zip(ends, ends[1:])]
    step_s = statistics.median(intervals)
    costs = {"step_s": step_s, "eval_s": timer.mean("eval"), "sample_s": timer.mean("sample")}
    costs["save_s"] = timer.mean("save")
    spent = sum(b - a for name in ("eval", "sample", "save") for a, b in timer.calls.get(name, []))
    # build, the first step's excess over a typical one, export
    costs["setup_s"] = max(0.0, total - spent - sum(intervals) - step_s)
    out = {k: round(v, 4) for k, v in costs.items()}
    return out | {"seconds": round(total, 2), "step_intervals_s": [round(t, 3) for t in intervals]}


@contextmanager
def throwaway(folder: Path):
    """A fresh folder, removed afterwards (also when the calibration fails)."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)
