"""Model folders on disk, shared by every network: `config.json` (the config dataclass) + `model.safetensors`,
and the small state-dict adapter that maps external key names to ours."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from cinedit.runtime.files import atomic_path, write_text

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
# Prefixes that training wrappers put in front of every key (DDP, torch.compile, EMA / checkpoint dicts).
WRAPPER_PREFIXES = ("module.", "_orig_mod.", "model.", "vae.", "ema.")

C = TypeVar("C")


def save_model_folder(model: torch.nn.Module, config: Any, out_dir: str | os.PathLike) -> Path:
    """Write `config.json` + `model.safetensors` into `out_dir`, each atomically (weights first)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = type(model).__name__
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    with atomic_path(out / WEIGHTS_NAME) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt", "class": name})
    write_text(out / CONFIG_NAME, json.dumps({"_class": name, **dataclasses.asdict(config)}, indent=2) + "\n")
    return out


def read_config(path: str | os.PathLike, cls: type[C]) -> C:
    """The `cls` config saved in a model folder's `config.json` (unknown fields are refused)."""
    doc = json.loads(Path(path).read_text())
    doc.pop("_class", None)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(doc) - known)
    if unknown:
        raise ValueError(f"{path}: unknown {cls.__name__} fields {unknown}; was it written by a newer cinedit?")
    return cls(**doc)


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file."""
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def adapt_state_dict(state: dict[str, torch.Tensor], prefix: str | None = None) -> dict[str, torch.Tensor]:
    """Map external key names to ours: drop a given `prefix`, else wrapper prefixes shared by every key."""
    if prefix is not None:
        return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    changed = True
    while changed and state:
        changed = False
        for p in WRAPPER_PREFIXES:
            if all(k.startswith(p) for k in state):
                state = {k[len(p) :]: v for k, v in state.items()}
                changed = True
    return state


def read_checkpoint(
    path: str | os.PathLike, cls: type[C], prefix: str | None = None
) -> tuple[C | None, dict[str, torch.Tensor]]:
    """(config, state dict) of a model folder, or (None, state dict) of a single safetensors file.

    Keys pass through `adapt_state_dict`; the caller decides the architecture of a single file.
    """
    path = Path(path)
    config = None
    if path.is_dir():
        if not (path / CONFIG_NAME).is_file() or not (path / WEIGHTS_NAME).is_file():
            raise FileNotFoundError(f"{path}: a model folder holds {CONFIG_NAME} and {WEIGHTS_NAME}")
        config = read_config(path / CONFIG_NAME, cls)
        path = path / WEIGHTS_NAME
    elif not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint (a model folder or a .safetensors file)")
    elif path.suffix != ".safetensors":
        raise ValueError(f"{path}: only safetensors checkpoints are read (convert .pt/.ckpt files first)")
    return config, adapt_state_dict(read_state_dict(path), prefix)
