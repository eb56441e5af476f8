"""The `parallel` section both trainers share: processes, precision, gradient clipping, context parallelism.

`cinedit.runtime.booster.build_booster` turns it into a booster. Plugins:

- ``"torch"``: plain PyTorch, DDP when the world has more than one process.
- ``"ddp"``: ColossalAI's `TorchDDPPlugin` (CPU or GPU).
- ``"zero"``: ColossalAI's `LowLevelZeroPlugin`, ZeRO stage 1 or 2, bf16 working weights over fp32 masters.
- ``"hybrid"``: ColossalAI's `HybridParallelPlugin` for context parallelism.
- ``"auto"``: ``"zero"`` on CUDA (``"hybrid"`` when cp_size > 1 in bf16), ``"ddp"`` on CPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cinedit.configs.core import ConfigError

PLUGINS = ("auto", "torch", "ddp", "zero", "hybrid")
PRECISIONS = ("bf16", "fp32")
CP_MODES = ("ulysses", "ring", "hybrid")


@dataclass
class ParallelConfig:
    """How a trainer spreads over processes; see the module docstring."""

    # auto | torch | ddp | zero | hybrid. auto: zero on CUDA (hybrid when cp_size > 1 in bf16), ddp on CPU.
    plugin: str = "auto"
    # ZeRO stage of zero/hybrid: 1 shards the optimizer states and masters, 2 also the gradients.
    zero_stage: int = 2
    # zero/hybrid: "bf16" keeps bf16 working weights over fp32 masters. torch/ddp keep fp32 weights either way
    # (the trainers autocast). hybrid needs bf16: ColossalAI 0.5.0 refuses its ZeRO in fp32.
    precision: str = "bf16"
    # Clip the global gradient norm to this (0: no clipping); zero/hybrid clip inside their optimizer step.
    grad_clip: float = 1.0
    # ZeRO gradient reduce bucket in MB of working-precision gradients (ColossalAI counts it in M elements).
    reduce_bucket_mb: int = 128
    # Context-parallel group size: this many contiguous ranks split one sample's sequence. 1: no cp.
    cp_size: int = 1
    # How a cp group attends: "ring" (KV blocks passed around), "ulysses" (all-to-all to head shards) or
    # "hybrid" (Ulysses inside subgroups of cp_ulysses_size ranks, ring across them).
    cp_mode: str = "ring"
    # The Ulysses degree of cp_mode "hybrid" (must divide cp_size); 0 chooses it (see `ulysses_size`).
    cp_ulysses_size: int = 0

    def validate(self) -> None:
        if self.plugin not in PLUGINS:
            raise ConfigError(f"parallel.plugin must be one of {list(PLUGINS)}, got {self.plugin!r}")
        if self.zero_stage not in (1, 2):
            raise ConfigError(f"parallel.zero_stage must be 1 or 2, got {self.zero_stage}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"parallel.precision must be one of {list(PRECISIONS)}, got {self.precision!r}")
        if not self.grad_clip >= 0:
            raise ConfigError(f"parallel.grad_clip must be >= 0 (0: no clipping), got {self.grad_clip}")
        if self.reduce_bucket_mb < 1:
            raise ConfigError(f"parallel.reduce_bucket_mb must be >= 1, got {self.reduce_bucket_mb}")
        if self.cp_size < 1:
            raise ConfigError(f"parallel.cp_size must be >= 1, got {self.cp_size}")
        if self.cp_mode not in CP_MODES:
            raise ConfigError(f"parallel.cp_mode must be one of {list(CP_MODES)}, got {self.cp_mode!r}")
        if self.cp_ulysses_size < 0:
            raise ConfigError(f"parallel.cp_ulysses_size must be >= 0 (0: automatic), got {self.cp_ulysses_size}")
        if self.cp_ulysses_size and self.cp_mode != "hybrid":
            raise ConfigError(f"parallel.cp_ulysses_size is for cp_mode 'hybrid' only, cp_mode is {self.cp_mode!r}")
        if self.cp_ulysses_size and self.cp_size % self.cp_ulysses_size:
            raise ConfigError(
                f"parallel.cp_ulysses_size {self.cp_ulysses_size} must divide parallel.cp_size {self.cp_size}"
            )
        if self.plugin == "hybrid" and self.cp_size == 1:
            raise ConfigError("parallel.plugin 'hybrid' is the context-parallel plugin: set cp_size > 1, or use 'zero'")
        if self.plugin == "hybrid" and self.precision != "bf16":
            raise ConfigError(
                "parallel.plugin 'hybrid' needs precision 'bf16' (ColossalAI 0.5.0's HybridParallelPlugin refuses "
                "ZeRO in fp32); use plugin 'zero' with cp_size > 1 for fp32"
            )

    def resolve_plugin(self, device: Any) -> str:
        """The concrete plugin for `device` ("auto" resolved)."""
        if self.plugin != "auto":
            return self.plugin
        if device.type != "cuda":
            return "ddp"
        return "hybrid" if self.cp_size > 1 and self.precision == "bf16" else "zero"

    def ulysses_size(self, num_heads: int | None = None) -> int:
        """The Ulysses degree: cp_size for "ulysses", 1 for "ring", cp_ulysses_size for "hybrid"; 0 there picks
        the largest of 2, 4, 8 that divides cp_size (and `num_heads`) and leaves a ring of >= 2."""
        if self.cp_mode == "ulysses":
            return self.cp_size
        if self.cp_mode == "ring":
            return 1
        if self.cp_ulysses_size:
            return self.cp_ulysses_size
        fits = [
            u
            for u in (2, 4, 8)
            if self.cp_size % u == 0 and self.cp_size // u >= 2 and (num_heads is None or num_heads % u == 0)
        ]
        return fits[-1] if fits else 1
