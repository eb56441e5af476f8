"""The exponential moving average of a model's weights that both trainers keep and checkpoint."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn


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
