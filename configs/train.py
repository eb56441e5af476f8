"""The config sections both trainers share: the training loop and the EMA."""

from __future__ import annotations

from dataclasses import dataclass

from cinedit.configs.core import ConfigError

# Fields a resumed run may change without becoming a different run (each trainer adds its own).
RUN_CONTROL = (
    "train.out_dir",  # a run folder may be copied or moved, and resumed where it is
    "train.steps",
    "train.log_every",
    "train.eval_every",
    "train.sample_every",
    "train.ckpt_every",
    "train.keep_checkpoints",
    "train.resume",
    "train.overwrite",
    "train.progress",
    "train.flush_denormal",
    "data.num_workers",
    "data.prefetch_factor",
)


@dataclass
class LoopConfig:
    """The loop: length, intervals, run directory and device (processes and precision: the `parallel` section)."""

    steps: int = 100_000
    log_every: int = 10
    eval_every: int = 1000  # 0: never
    sample_every: int = 0  # validation samples (generator) or reconstructions (tokenizer) to samples/ and tb/; 0: never
    ckpt_every: int = 1000
    keep_checkpoints: int = 0  # keep only the newest N checkpoints (0: all)
    seed: int = 42
    out_dir: str = "runs/train"
    device: str = "auto"  # auto | cpu | cuda
    resume: str = ""  # "" fresh run, "auto" the latest checkpoint in out_dir, or a checkpoint folder
    overwrite: bool = False  # replace a previous run's results in out_dir
    progress: bool = True
    # CPU: flush subnormal floats to zero while training (opt-in). Without it the demo's tokenizer video step slows
    # from 0.25 to 0.29 s over its first 100 steps, against 0.21 s flushed (2 threads; scripts/bench_denormals.py).
    # Off by default: it is a process-wide mode, and flushed math breaks exact identities such as a zero-initialised
    # adapter leaving a sample bit for bit unchanged (tests/test_control_train.py).
    flush_denormal: bool = False

    def validate(self) -> None:
        if self.steps < 0:
            raise ConfigError(f"train.steps must be >= 0, got {self.steps}")
        for name in ("log_every", "eval_every", "sample_every", "ckpt_every"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name} must be >= 0 (0: never), got {getattr(self, name)}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"train.device must be auto, cpu or cuda, got {self.device!r}")
        if not self.out_dir:
            raise ConfigError("train.out_dir is empty")


@dataclass
class EMAConfig:
    """An fp32 EMA copy of the weights on every rank."""

    decay: float = 0.99
    warmup: bool = True  # decay min(decay, (1 + n) / (10 + n)) over the first updates

    def validate(self) -> None:
        if not 0 <= self.decay < 1:
            raise ConfigError(f"ema.decay must be in [0, 1), got {self.decay}")
