"""Parallelism applied to an MMDiT from outside: selective activation checkpointing.

Context parallelism will swap `cinedit.generator.math.attention`; nothing here changes the model's code.
"""

from __future__ import annotations

import types

from torch import nn
from torch.utils.checkpoint import checkpoint

from cinedit.generator.model import MMDiT


def _checkpointed_forward(self: nn.Module, *args, **kwargs):
    return checkpoint(type(self).forward, self, *args, use_reentrant=False, **kwargs)


def is_checkpointed(block: nn.Module) -> bool:
    return getattr(block.forward, "__func__", None) is _checkpointed_forward


def checkpoint_block(block: nn.Module) -> bool:
    """Recompute `block`'s activations in backward (non-reentrant); False if it already was."""
    if is_checkpointed(block):
        return False
    # A bound method in the instance shadows the class's forward and leaves the state-dict keys as they are;
    # copy.deepcopy (EMA) rebinds it to the copy.
    block.forward = types.MethodType(_checkpointed_forward, block)
    return True


def apply_activation_checkpointing(model: MMDiT, n_double: int | None = None, n_single: int | None = None) -> int:
    """Checkpoint the first n double and the first n single blocks (None: all of them); returns how many now are."""
    for blocks, n in ((model.double_blocks, n_double), (model.single_blocks, n_single)):
        n = len(blocks) if n is None else n
        if n < 0:
            raise ValueError(f"the number of checkpointed blocks must be >= 0 or None, got {n}")
        for block in list(blocks)[:n]:
            checkpoint_block(block)
    return sum(is_checkpointed(b) for b in [*model.double_blocks, *model.single_blocks])
