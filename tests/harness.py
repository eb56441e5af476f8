"""Kill-and-resume, one harness for both trainers (`cinedit.tokenizer.train`, `cinedit.generator.train`).

A run is killed by making the trainer's `train_step` raise `KeyboardInterrupt` when it reaches a step (what Ctrl-C
or a preempted job does between two steps), then resumed from its latest checkpoint with `--train.resume=auto`.
The resumed run must log what the uninterrupted run logged, bit for bit, from the checkpoint's step on.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest

from cinedit.runtime.checkpoint import latest_checkpoint
from cinedit.runtime.logs import read_metrics


def metric(out: Path, key: str) -> dict[int, float]:
    """step -> value of one key of a run's metrics.jsonl."""
    return {r["step"]: r[key] for r in read_metrics(out) if key in r}


def dying_step(real_step: Callable, at: int) -> Callable:
    """`train_step` that raises KeyboardInterrupt instead of running step `at`."""

    def dies(tr, batch, step):
        if step == at:
            raise KeyboardInterrupt(f"killed at step {step}")
        return real_step(tr, batch, step)

    return dies


@contextmanager
def killed_at(train_mod: ModuleType, step: int):
    """Within the block, the trainer module's `train_step` dies at `step` (restored afterwards, even on errors)."""
    real_step = train_mod.train_step
    train_mod.train_step = dying_step(real_step, step)
    try:
        yield
    finally:
        train_mod.train_step = real_step


@dataclass
class KillAndResume:
    full: Path  # the uninterrupted run
    killed: Path  # the run killed at `kill_at`, then resumed in the same folder
    logged_before_kill: list[int]  # the steps the killed run had logged when it died
    resumed_from: int  # the step of the checkpoint it resumed from


def kill_and_resume(
    train_mod: ModuleType,
    argv: Callable[..., list[str]],
    root: Path,
    common: Iterable[str],
    kill_at: int,
    ckpt_every: int,
    log_key: str,
) -> KillAndResume:
    """Run `train_mod.main(argv(out, *common, ...))` uninterrupted into root/full; into root/killed with a checkpoint
    every `ckpt_every` steps, killed at step `kill_at`; then resumed in root/killed (`--train.resume=auto`)."""
    common = tuple(common)
    full, killed = root / "full", root / "killed"
    assert train_mod.main(argv(full, *common, "--train.ckpt_every=0")) == 0
    ckpt = f"--train.ckpt_every={ckpt_every}"
    with killed_at(train_mod, kill_at), pytest.raises(KeyboardInterrupt, match=f"killed at step {kill_at}"):
        train_mod.main(argv(killed, *common, ckpt))
    logged = sorted(metric(killed, log_key))
    last = latest_checkpoint(killed)
    assert last is not None, f"the killed run left no checkpoint in {killed}"
    resumed_from = json.loads((last / "state.json").read_text())["step"]
    assert train_mod.main(argv(killed, *common, ckpt, "--train.resume=auto")) == 0
    return KillAndResume(full, killed, logged, resumed_from)


def assert_same_after(full: Path, resumed: Path, keys: Iterable[str], step: int) -> None:
    """Both runs logged every key at the same steps, with bit-identical values after `step` (the resume point)."""
    for key in keys:
        a, b = metric(full, key), metric(resumed, key)
        assert a, f"{key}: never logged in {full}"
        assert sorted(a) == sorted(b), (key, sorted(a), sorted(b))
        differ = {s: (a[s], b[s]) for s in a if s > step and a[s] != b[s]}
        assert not differ, f"{key} after the resume from step {step}: step -> (uninterrupted, resumed) {differ}"
