"""The training loop both trainers run (`run_training` with a trainer's `TrainHooks`), the run-directory checks
before it, the EMA and the endless loader iterator."""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cinedit.configs import ConfigError, load_config, to_dict
from cinedit.runtime.checkpoint import CKPT_DIR, STATE_FILE, checkpoint_problem, resume_checkpoint
from cinedit.runtime.dist import DistInfo, all_gather_objects, barrier, init_distributed
from cinedit.runtime.files import save_config
from cinedit.runtime.logs import METRICS_FILE, MetricsLogger, progress_bar
from cinedit.runtime.rng import rng_state, set_rng_state


def forever(loader: Any) -> Iterator[Any]:
    """Iterate a (resumable) loader epoch after epoch; each new `iter` starts at the loader's saved position."""
    empty_passes = 0
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        # A loader resumed exactly at the end of an epoch yields nothing once, then starts the next epoch.
        empty_passes = empty_passes + 1 if empty else 0
        if empty_passes > 1:
            raise RuntimeError(
                "the data loader yielded no batch in a whole epoch: too few samples for the bucket batch sizes "
                "(or every sample was dropped); add data or lower the batch sizes"
            )


# ----------------------------------------------------------------------------------------------------------------------
# run directories and the train command (shared by the tokenizer and generator trainers)

SAMPLES_DIR = "samples"  # validation samples, `<out_dir>/samples/step_NNNNNNN/` (`train.sample_every`)
RUN_PRODUCTS = ("config.json", METRICS_FILE, CKPT_DIR, "tb", "model", SAMPLES_DIR)
SAMPLE_DATA = "sample_data"  # where presets without a meta build the sample dataset, inside out_dir
LOCK_FILE = "run.lock"  # held while a run trains (pid, host): a second run on the same out_dir is refused


def _comparable(cfg: Any, run_control: tuple[str, ...]) -> dict[str, Any]:
    doc = to_dict(cfg)
    for path in run_control:
        section, name = path.split(".")
        doc[section].pop(name, None)
    return doc


def prepare_run_dir(cfg: Any, info: DistInfo, run_control: tuple[str, ...]) -> Path | None:
    """Check `cfg.train.out_dir` and return the checkpoint to resume from (None: fresh run).

    A fresh run needs an out_dir without a previous run's results; `train.overwrite` removes them (only the run's
    own products). A resumed run must have been started with the same config, up to the `run_control` fields
    (dotted paths such as "train.steps") that a continuation may change.
    """
    out = Path(cfg.train.out_dir)
    products = [out / p for p in RUN_PRODUCTS if (out / p).exists()]
    allowed = (*RUN_PRODUCTS, SAMPLE_DATA, LOCK_FILE)
    others = [p for p in out.iterdir() if p.name not in allowed] if out.is_dir() else []
    if cfg.train.overwrite:
        if info.is_main:
            for p in products:
                shutil.rmtree(p) if p.is_dir() else p.unlink()
        barrier()
        products = []
    if others:
        raise ConfigError(
            f"train.out_dir {out} holds files that are not a training run's ({', '.join(p.name for p in others[:4])}); "
            f"pick an empty or new out_dir"
        )
    if not cfg.train.resume:
        if products:
            raise ConfigError(
                f"train.out_dir {out} already holds a run; continue it with --train.resume=auto, or replace its "
                f"results with --train.overwrite=true"
            )
        return None
    if cfg.train.resume == "auto":
        ckpt, notes = resume_checkpoint(out)
        if info.is_main:
            for note in notes:
                print(f"cinedit: train.resume=auto: {note}", file=sys.stderr)
    else:
        ckpt = Path(cfg.train.resume)
        if not (ckpt / STATE_FILE).is_file():
            raise ConfigError(f"train.resume: {ckpt} is not a checkpoint folder (no state.json)")
        problem = checkpoint_problem(ckpt)
        if problem:
            raise ConfigError(f"train.resume: {ckpt} is damaged: {problem}; name another checkpoint, or use auto")
    saved = out / "config.json"
    if ckpt is not None or products:
        if not saved.is_file():
            raise ConfigError(f"train.out_dir {out} has results but no config.json; cannot check it is this run")
        old, new = _comparable(load_config(saved, type(cfg)), run_control), _comparable(cfg, run_control)
        if old != new:
            diff = sorted(f"{s}.{k}" for s in old for k in set(old[s]) | set(new[s]) if old[s].get(k) != new[s].get(k))
            raise ConfigError(
                f"train.out_dir {out} holds a run with a different config (differs in {', '.join(diff[:6])}); "
                f"resume with its own config (pass the run directory), or use another out_dir"
            )
    return ckpt


@dataclass
class TrainHooks:
    """What a trainer plugs into `run_training`; `tr` is the trainer's own state object (it has a `step`)."""

    kind: str  # "tokenizer" | "generator": the progress bar's name
    run_control: tuple[str, ...]  # config fields a resumed run may change (see `prepare_run_dir`)
    build: Callable[[Any, DistInfo], Any]  # (cfg, info) -> tr
    batches: Callable[[Any], Callable[[int], Any]]  # tr -> next_batch(step), a fresh iterator after loading
    train_step: Callable[[Any, Any, int], dict[str, float]]  # (tr, batch, step) -> scalars
    evaluate: Callable[[Any], dict[str, Any]]  # tr -> scalars, plus (3, H, W) image tensors to log
    save: Callable[[Any, Path], Path]  # (tr, run_dir) -> checkpoint folder, atomically (`save_checkpoint`)
    load: Callable[[Any, Path], None]  # (tr, checkpoint folder)
    export: Callable[[Any, Path], None]  # (tr, out_dir / "model"), main rank only, after the last step
    loss_key: str = "loss"  # the scalar the progress bar shows
    # (tr, logger): validation samples every `train.sample_every` steps; called on every rank, the main rank writes
    # them under `samples_dir(out_dir, step)` and to the logger.
    sample: Callable[[Any, MetricsLogger], None] | None = None


def samples_dir(out_dir: str | os.PathLike, step: int) -> Path:
    """Where the validation samples of `step` go."""
    return Path(out_dir) / SAMPLES_DIR / f"step_{step:07d}"


def _take_lock(out: Path) -> str | None:
    """Create `<out>/run.lock` (pid, host, start time) exclusively; returns why not when a live run holds it. A lock
    whose process is gone (killed; on this host) is taken over with a message."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / LOCK_FILE
    mine = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                owner = json.loads(path.read_text())
                pid, host, since = int(owner["pid"]), str(owner["host"]), owner.get("started", "?")
            except (OSError, ValueError, KeyError, TypeError):
                pid, host, since = -1, mine["host"], "?"  # garbled: nobody can be checked, so nobody holds it
            if host != mine["host"]:
                return (
                    f"train.out_dir {out} is locked by pid {pid} on host {host} (since {since}); two runs must not "
                    f"share an out_dir. If that run is no longer alive, delete {path}"
                )
            if pid != mine["pid"] and _alive(pid):
                return (
                    f"train.out_dir {out} is in use by pid {pid} on this host (since {since}): wait for that run to "
                    f"end, or use another out_dir"
                )
            print(f"cinedit: taking over {path} of pid {pid}, which is no longer running", file=sys.stderr)
            path.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(mine, f)
        return None
    return f"could not take {path}: another run keeps creating it"


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


@contextmanager
def run_lock(out: Path, info: DistInfo) -> Iterator[None]:
    """Hold `<out>/run.lock` for a run (the main rank takes it, every rank learns the outcome); a second run on the
    same out_dir is refused with the owner's pid and host."""
    problem = _take_lock(out) if info.is_main else None
    problem = all_gather_objects(problem)[0]
    if problem:
        raise ConfigError(problem)
    try:
        yield
    finally:
        if info.is_main:
            (out / LOCK_FILE).unlink(missing_ok=True)


def flushes_denormals() -> bool:
    """Whether this thread's float math flushes subnormal numbers to zero (torch has a setter, no getter: under
    flush-to-zero a subnormal double reads back as 0)."""
    return torch.tensor([1e-323], dtype=torch.float64).item() == 0.0


def flushing_share() -> float:
    """The share of a parallel float op's elements whose thread flushes subnormals: 1.0 when every intra-op thread
    does. The mode is per thread and a thread starts with its creator's, so threads of a pool started before
    `torch.set_flush_denormal(True)` keep computing with subnormals. (The probe's tensors are built from integer
    bits and compared as integers: any float conversion or comparison would itself be flushed.)"""
    tiny = torch.ones(1 << 20, dtype=torch.int32).view(torch.float32)  # the smallest subnormal, 1.4e-45
    return ((tiny * 1.5).view(torch.int32) == 0).double().mean().item()


def set_flush_denormal(enabled: bool) -> bool:
    """CPU float math with subnormal numbers flushed to zero (`enabled`) or kept, from now on; returns the mode in
    effect.
    Subnormals (|x| < 1.2e-38 in float32) take a slow path on x86 CPUs; CUDA kernels are not affected.

    The mode is per thread, and torch's intra-op threads take it from the thread that starts them, so the mode of
    threads already running cannot be changed; threads that disagree make an op's result depend on which thread
    computed which part (an x + 0 flushes on one thread and not on another). So every thread always computes in
    one mode: this thread switches only when the pool's threads then agree with it (or start after the switch),
    and otherwise keeps the pool's mode with a warning. Nothing is restored later: threads started after the switch
    keep its mode. `run_training` switches before the run's first parallel op."""
    before = flushes_denormals()
    if enabled != before:
        torch.set_flush_denormal(enabled)  # False (and no change) on a CPU without the flag
        if torch.get_num_threads() > 1 and 0 < flushing_share() < 1:
            torch.set_flush_denormal(before)  # the pool's threads kept the old mode: stay with them
            state = "flushes subnormal floats to zero" if before else "computes with subnormal floats"
            print(
                f"warning: this run {state} (--train.flush_denormal={str(enabled).lower()} not applied): torch's "
                "thread pool started before and keeps that mode. CPU training without flushing may run up to a "
                "third slower; call torch.set_flush_denormal() before the process's first torch op",
                file=sys.stderr,
            )
    return flushes_denormals()


def run_training(cfg: Any, hooks: TrainHooks, preset_name: str | None = None) -> dict[str, float]:
    """The loop both trainers run: a run lock, run-dir checks, resume, steps, logging, evaluation, checkpoints, export.

    Returns the last logged scalars and evaluation metrics, plus `seconds`. A step's `tokens` scalar (if any) is
    logged as `tokens_per_s` over the step's wall time, data loading included. With `train.flush_denormal` the
    run's CPU math flushes subnormal floats to zero (`set_flush_denormal`).
    """
    set_flush_denormal(cfg.train.flush_denormal)  # before the run's first parallel op
    info = init_distributed(cfg.train.device)
    with run_lock(Path(cfg.train.out_dir), info):
        return _run_training(cfg, hooks, preset_name, info)


def _run_training(cfg: Any, hooks: TrainHooks, preset_name: str | None, info: DistInfo) -> dict[str, float]:
    t0 = time.time()
    ckpt = prepare_run_dir(cfg, info, hooks.run_control)
    barrier()  # every rank has checked out_dir before the main rank writes into it
    out = Path(cfg.train.out_dir)
    if info.is_main:
        save_config(cfg, out, preset=preset_name)
    tr = hooks.build(cfg, info)
    logger = MetricsLogger(out, enabled=info.is_main)
    if ckpt is not None:
        try:
            hooks.load(tr, ckpt)
        except FileNotFoundError as e:
            raise ConfigError(
                f"cannot resume from {ckpt}: {e}. It may have been written before checkpoints were sharded: "
                f"continue it with the cinedit version that wrote it, or start this run in another out_dir"
            ) from None
        logger.truncate_after(tr.step)
    else:
        logger.reset()
    tc = cfg.train
    summary: dict[str, float] = {}

    def run_eval() -> None:
        metrics = hooks.evaluate(tr)
        scalars = {k: float(v) for k, v in metrics.items() if not isinstance(v, torch.Tensor)}
        if scalars:
            logger.log(tr.step, scalars)
            summary.update(scalars)
        for tag, img in metrics.items():
            if isinstance(img, torch.Tensor):
                logger.image(tag, img, tr.step)

    def run_samples() -> None:
        # Sampling must not draw from the training RNG streams: a run gives the same losses with it on or off.
        state = rng_state()
        try:
            hooks.sample(tr, logger)
        finally:
            set_rng_state(state)
        barrier()  # the other ranks wait while the main rank samples

    if tr.step == 0 and tc.eval_every:
        run_eval()
    next_batch = hooks.batches(tr)
    bar = progress_bar(tc.steps, min(tr.step, tc.steps), tc.progress and info.is_main, hooks.kind)
    try:
        while tr.step < tc.steps:
            step = tr.step + 1
            t_step = time.perf_counter()
            scalars = hooks.train_step(tr, next_batch(step), step)
            if "tokens" in scalars:
                scalars["tokens_per_s"] = scalars.pop("tokens") / (time.perf_counter() - t_step)
            tr.step = step
            bar.update(1)
            if tc.log_every and step % tc.log_every == 0:
                logger.log(step, scalars)
                summary.update(scalars)
                bar.set_postfix(loss=f"{scalars[hooks.loss_key]:.4f}")
            if tc.eval_every and step % tc.eval_every == 0:
                run_eval()
            if hooks.sample is not None and tc.sample_every and step % tc.sample_every == 0:
                run_samples()
            if (tc.ckpt_every and step % tc.ckpt_every == 0) or step == tc.steps:
                hooks.save(tr, out)
    finally:
        bar.close()
        logger.close()
    if info.is_main:
        hooks.export(tr, out / "model")
    barrier()
    summary["seconds"] = time.time() - t0
    return summary
