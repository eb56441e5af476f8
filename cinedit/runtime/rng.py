"""Seeding and the RNG states a checkpoint stores (without pickle)."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

try:  # numpy 2 moved it; an RNG state pickled by older checkpoints names one of the two
    from numpy._core.multiarray import _reconstruct as np_reconstruct
except ImportError:
    from numpy.core.multiarray import _reconstruct as np_reconstruct


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


# RNG states are stored without pickle: tensors in safetensors, the scalars as JSON metadata, so reading a
# checkpoint can never run code.
def save_rng_state(state: dict[str, Any], path: str | os.PathLike) -> None:
    """Write `rng_state()` to a safetensors file."""
    py_version, py_state, py_gauss = state["python"]
    np_name, np_keys, np_pos, np_has_gauss, np_cached = state["numpy"]
    tensors = {
        "torch": state["torch"].contiguous(),
        "python": torch.tensor(py_state, dtype=torch.int64),
        "numpy": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
        **{f"cuda.{i}": s.contiguous() for i, s in enumerate(state.get("cuda", []))},
    }
    meta = {
        "python": json.dumps([py_version, py_gauss]),
        "numpy": json.dumps([np_name, int(np_pos), int(np_has_gauss), float(np_cached)]),
    }
    save_file(tensors, str(path), metadata=meta)


def load_rng_state(path: str | os.PathLike) -> dict[str, Any]:
    """Read what `save_rng_state` wrote (or a legacy `.pt` of older checkpoints, through torch's weights-only loader,
    which refuses anything but tensors, containers and the numpy types of an RNG state)."""
    path = Path(path)
    if path.suffix == ".pt":
        allowed = [np.ndarray, np.dtype, type(np.dtype(np.uint32)), np_reconstruct]
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, weights_only=True)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    py_version, py_gauss = json.loads(meta["python"])
    np_name, np_pos, np_has_gauss, np_cached = json.loads(meta["numpy"])
    state = {
        "python": (py_version, tuple(int(v) for v in tensors["python"].tolist()), py_gauss),
        "numpy": (np_name, tensors["numpy"].numpy().astype(np.uint32), np_pos, np_has_gauss, np_cached),
        "torch": tensors["torch"],
    }
    cuda = sorted((k for k in tensors if k.startswith("cuda.")), key=lambda k: int(k.split(".")[1]))
    if cuda:
        state["cuda"] = [tensors[k] for k in cuda]
    return state
