"""The runtime both trainers share: process group, seeding and RNG state, EMA, atomic checkpoint directories,
metrics logging, the progress bar, run directories and the training loop (`run_training`).

The booster / plugin built from config and the dp x cp process layout are in `cinedit.parallel`.
"""

from __future__ import annotations

import copy
import json
import os
import random
import shutil
import sys
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

CKPT_DIR = "ckpt"
LATEST = "latest"
METRICS_FILE = "metrics.jsonl"


# ----------------------------------------------------------------------------------------------------------------------
# process group


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the default process group: from torchrun's env vars when present, else a world of one.

    A single process still gets a real (gloo) group, so collectives and DDP code paths run unchanged; it uses
    an in-memory store, so nothing listens on a port. `device` is "auto" (CUDA when available), "cpu" or "cuda".
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was asked for but torch sees no CUDA device")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device == "cuda":
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        backend = "nccl" if device == "cuda" else "gloo"
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            dist.init_process_group(backend, init_method="env://")
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    dev = torch.device("cuda", local_rank) if device == "cuda" else torch.device("cpu")
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, dev)


def destroy_distributed() -> None:
    """Leave the default process group (if any)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def all_gather_objects(obj: Any) -> list[Any]:
    """`obj` from every rank, in rank order (just `[obj]` without a process group)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Element-wise sum over ranks of a list of floats."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def autocast(device: torch.device, precision: str) -> AbstractContextManager:
    """bf16 autocast on CUDA when precision is "bf16"; CPU runs stay in fp32 (exact, and CPU bf16 is slow)."""
    if device.type == "cuda" and precision == "bf16":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


# ----------------------------------------------------------------------------------------------------------------------
# seeding and RNG state


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """The python, numpy and torch (CPU and CUDA) generator states, to store in a checkpoint."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore `rng_state()`."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------------------------------------------------
# EMA


class EMA:
    """Exponential moving average of a model's weights, kept in fp32 on the model's device.

    With `warmup`, the decay of update n is min(decay, (1 + n) / (10 + n)), so early averages are not
    dominated by the random initialisation (it reaches 0.99 after ~900 updates).
    """

    def __init__(self, model: nn.Module, decay: float = 0.99, warmup: bool = True):
        if not 0 <= decay < 1:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.module = copy.deepcopy(model).float().eval().requires_grad_(False)
        self.decay, self.warmup = decay, warmup
        self.updates = 0

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        decay = self.current_decay()
        for e, p in zip(self.module.parameters(), model.parameters()):
            e.lerp_(p.detach().float(), 1 - decay)
        for e, b in zip(self.module.buffers(), model.buffers()):
            e.copy_(b)
        self.updates += 1

    def state_dict(self) -> dict[str, Any]:
        return {"module": self.module.state_dict(), "updates": self.updates, "decay": self.decay}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["module"])
        self.updates = int(state["updates"])


# ----------------------------------------------------------------------------------------------------------------------
# checkpoint directories


def checkpoint_dir(run_dir: str | os.PathLike, step: int) -> Path:
    """`<run_dir>/ckpt/step-000010`."""
    return Path(run_dir) / CKPT_DIR / f"step-{step:06d}"


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The checkpoint named by `<run_dir>/ckpt/latest`, or None."""
    pointer = Path(run_dir) / CKPT_DIR / LATEST
    if not pointer.is_file():
        return None
    path = Path(run_dir) / CKPT_DIR / pointer.read_text().strip()
    return path if path.is_dir() else None


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_checkpoint(run_dir: str | os.PathLike, step: int, write: Callable[[Path], None], info: DistInfo) -> Path:
    """Write a checkpoint atomically: `write(tmp_dir)` runs on every rank into `.step-N.tmp`, which rank 0 renames
    to `step-N` and then points `latest` at. A crash inside `write` leaves only the temporary folder behind
    (removed by the next save) and `latest` on the previous checkpoint.
    """
    final = checkpoint_dir(run_dir, step)
    tmp = final.with_name(f".{final.name}.tmp")
    if info.is_main:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    barrier()
    write(tmp)
    barrier()
    if info.is_main:
        if final.exists():  # the same step saved again (a resumed run): replace the old copy
            old = final.with_name(f".{final.name}.old")
            if old.exists():
                shutil.rmtree(old)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
        _write_text_atomic(final.parent / LATEST, final.name + "\n")
    barrier()
    return final


def prune_checkpoints(run_dir: str | os.PathLike, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints (never the `latest` one); keep <= 0 keeps all."""
    if keep <= 0:
        return
    root = Path(run_dir) / CKPT_DIR
    latest = latest_checkpoint(run_dir)
    steps = sorted(p for p in root.glob("step-*") if p.is_dir())
    for p in steps[:-keep]:
        if latest is None or p.resolve() != latest.resolve():
            shutil.rmtree(p)


def write_json(path: Path, doc: Any) -> None:
    _write_text_atomic(path, json.dumps(doc, indent=2) + "\n")


STATE_FILE = "state.json"


def save_training(
    run_dir: str | os.PathLike,
    step: int,
    info: DistInfo,
    parts: dict[str, tuple[Any, nn.Module, Any]],
    ema: EMA | None,
    state: dict[str, Any],
    keep: int = 0,
) -> Path:
    """One atomic checkpoint of a training run (collective): for each `parts` entry `folder: (booster, model,
    optimizer)` the model and optimizer (sharded, see `cinedit.parallel`), every rank's RNG states, the EMA weights
    and `state.json` (step, EMA updates, world size, plugin, plus the trainer's `state`, e.g. loader positions).
    Then all but the newest `keep` checkpoints are removed (0: keep all)."""

    def write(path: Path) -> None:
        for folder, (booster, model, optimizer) in parts.items():
            (path / folder).mkdir(exist_ok=True)
            booster.save_model(model, path / folder)
            booster.save_optimizer(optimizer, path / folder)
        (path / "rng").mkdir(exist_ok=True)
        torch.save(rng_state(), path / "rng" / f"rank-{info.rank:05d}.pt")
        if info.is_main:
            from safetensors.torch import save_file

            if ema is not None:
                weights = {k: v.contiguous().cpu() for k, v in ema.module.state_dict().items()}
                save_file(weights, str(path / "ema.safetensors"))
            plugin = next(iter(parts.values()))[0].name
            doc = {"step": step, "ema_updates": ema.updates if ema is not None else 0, **state}
            write_json(path / STATE_FILE, {**doc, "world_size": info.world_size, "plugin": plugin})

    out = save_checkpoint(run_dir, step, write, info)
    if info.is_main:
        prune_checkpoints(run_dir, keep)
    return out


def load_training(
    path: Path, info: DistInfo, parts: dict[str, tuple[Any, nn.Module, Any]], ema: EMA | None
) -> dict[str, Any]:
    """Load what `save_training` wrote into `parts` and `ema` (under any process count); returns `state.json`.

    A part whose folder the checkpoint lacks (e.g. a discriminator added later) keeps its fresh state; a rank
    without a saved RNG file (more processes than were saved) keeps its seeded RNG.
    """
    from safetensors.torch import load_file

    doc = json.loads((path / STATE_FILE).read_text())
    for i, (folder, (booster, model, optimizer)) in enumerate(parts.items()):
        if i == 0 or (path / folder).is_dir():
            booster.load_model(model, path / folder)
            booster.load_optimizer(optimizer, path / folder)
    if ema is not None:
        ema.module.load_state_dict(load_file(str(path / "ema.safetensors"), device=str(info.device)))
        ema.updates = int(doc["ema_updates"])
    rng = path / "rng" / f"rank-{info.rank:05d}.pt"
    if rng.is_file():
        set_rng_state(torch.load(rng, weights_only=False))
    return doc


# ----------------------------------------------------------------------------------------------------------------------
# logging


class MetricsLogger:
    """Scalars to `<run_dir>/metrics.jsonl` (always) and TensorBoard (when installed); images to TensorBoard.

    Only the main rank writes. `truncate_after(step)` drops rows past a resumed checkpoint's step, so a run
    killed after its last checkpoint and resumed leaves one row per step.
    """

    def __init__(self, run_dir: str | os.PathLike, enabled: bool = True, tensorboard: bool = True):
        self.path = Path(run_dir) / METRICS_FILE
        self.enabled = enabled
        self.writer = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard not installed: metrics.jsonl only
                SummaryWriter = None
            if SummaryWriter is not None:
                self.writer = SummaryWriter(str(Path(run_dir) / "tb"))

    def truncate_after(self, step: int) -> None:
        if not self.enabled or not self.path.is_file():
            return
        rows = [line for line in self.path.read_text().splitlines() if line.strip()]
        kept = [r for r in rows if json.loads(r).get("step", 0) <= step]
        _write_text_atomic(self.path, "".join(r + "\n" for r in kept))

    def reset(self) -> None:
        if self.enabled and self.path.exists():
            self.path.unlink()

    def log(self, step: int, scalars: dict[str, float]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **{k: float(v) for k, v in scalars.items()}}) + "\n")
        if self.writer is not None:
            for k, v in scalars.items():
                self.writer.add_scalar(k, v, step)

    def image(self, tag: str, img: torch.Tensor, step: int) -> None:
        """A (3, H, W) image in [0, 1]."""
        if self.enabled and self.writer is not None:
            self.writer.add_image(tag, img.clamp(0, 1).cpu(), step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, float]]:
    """The rows of a run's metrics.jsonl."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def progress_bar(total: int, initial: int = 0, enabled: bool = True, desc: str = "train") -> Any:
    """A tqdm bar over steps (silent when disabled or not on the main rank)."""
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, desc=desc, dynamic_ncols=True, file=sys.stderr)


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


__all__ = [
    "EMA",
    "DistInfo",
    "MetricsLogger",
    "TrainHooks",
    "all_gather_objects",
    "all_reduce_sum",
    "autocast",
    "barrier",
    "checkpoint_dir",
    "destroy_distributed",
    "forever",
    "init_distributed",
    "latest_checkpoint",
    "load_training",
    "progress_bar",
    "prune_checkpoints",
    "read_metrics",
    "rng_state",
    "run_training",
    "save_checkpoint",
    "save_training",
    "seed_everything",
    "set_rng_state",
    "write_json",
]


# ----------------------------------------------------------------------------------------------------------------------
# run directories and the train command (shared by the tokenizer and generator trainers)

RUN_PRODUCTS = ("config.json", METRICS_FILE, CKPT_DIR, "tb", "model")
SAMPLE_DATA = "sample_data"  # where presets without a meta build the sample dataset, inside out_dir


def _comparable(cfg: Any, run_control: tuple[str, ...]) -> dict[str, Any]:
    from cinedit.configs import to_dict

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
    from cinedit.configs import ConfigError, load_config

    out = Path(cfg.train.out_dir)
    products = [out / p for p in RUN_PRODUCTS if (out / p).exists()]
    others = [p for p in out.iterdir() if p.name not in (*RUN_PRODUCTS, SAMPLE_DATA)] if out.is_dir() else []
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
        ckpt = latest_checkpoint(out)
    else:
        ckpt = Path(cfg.train.resume)
        if not (ckpt / "state.json").is_file():
            raise ConfigError(f"train.resume: {ckpt} is not a checkpoint folder (no state.json)")
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


def run_training(cfg: Any, hooks: TrainHooks, preset_name: str | None = None) -> dict[str, float]:
    """The loop both trainers run: run-dir checks, resume, steps, logging, evaluation, checkpoints, export.

    Returns the last logged scalars and evaluation metrics, plus `seconds`. A step's `tokens` scalar (if any) is
    logged as `tokens_per_s` over the step's wall time, data loading included.
    """
    import time

    from cinedit.configs import save_config

    info = init_distributed(cfg.train.device)
    t0 = time.time()
    ckpt = prepare_run_dir(cfg, info, hooks.run_control)
    barrier()  # every rank has checked out_dir before the main rank writes into it
    out = Path(cfg.train.out_dir)
    if info.is_main:
        save_config(cfg, out, preset=preset_name)
    tr = hooks.build(cfg, info)
    logger = MetricsLogger(out, enabled=info.is_main)
    if ckpt is not None:
        from cinedit.configs import ConfigError

        try:
            hooks.load(tr, ckpt)
        except FileNotFoundError as e:
            raise ConfigError(
                f"cannot resume from {ckpt}: {e}. It may have been written before checkpoints were sharded: "
                f"continue it with the cinedit version that wrote it, or start over with --train.overwrite=true"
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


def add_train_cli(subparsers: Any, kind: str, fit: Callable[[Any, str], Any], help: str, description: str) -> Any:
    """Register `cinedit <kind> train PRESET_OR_RUN_DIR [--section.field=value ...]` calling `fit(cfg, name)`."""
    import argparse

    from cinedit.configs import PRESETS, ConfigError, config_from_argv

    def run(args: argparse.Namespace) -> int:
        try:
            cfg, name = config_from_argv(kind, args.args)
            summary = fit(cfg, name)
        except ConfigError as e:
            print(f"cinedit {kind} train: error: {e}", file=sys.stderr)
            return 2
        finally:
            destroy_distributed()
        if summary:
            print(" ".join(f"{k}={v:.4g}" for k, v in sorted(summary.items())))
        return 0

    names = ", ".join(sorted(PRESETS.get(kind, {})))
    p = subparsers.add_parser(
        "train",
        help=help,
        description=f"{description} Presets: {names}; or pass a run directory to re-launch it. Overrides are "
        f"--section.field=value (--help-config lists every field); continue a run with --train.resume=auto; "
        f"torchrun launches `python -m cinedit.{kind}.train` on several processes.",
    )
    p.add_argument(
        "args", nargs=argparse.REMAINDER, metavar="PRESET_OR_RUN_DIR [--section.field=value ...] [--help-config]"
    )
    p.set_defaults(func=run)
    return p


def train_main(kind: str, add_cli: Callable[[Any], Any], argv: list[str] | None = None) -> int:
    """`python -m cinedit.<kind>.train ...`: the same command as `cinedit <kind> train ...`."""
    import argparse

    parser = argparse.ArgumentParser(prog=f"python -m cinedit.{kind}.train")
    add_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["train", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)
