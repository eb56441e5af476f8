"""LoRA for the MMDiT, injected from outside the model with peft: train, export, load, scale, merge.

`apply_lora` puts peft's LoRA layers into the MMDiT in place (`peft.inject_adapter_in_model`, not `get_peft_model`):
the model stays an `MMDiT`, so its forward, `config`, activation checkpointing, context parallelism and the
boosters see the module they know, and every name keeps its path. A targeted linear `double_blocks.0.img_attn.q_proj`
becomes a peft layer whose base weight is `...q_proj.base_layer.weight` and whose adapter is
`...q_proj.lora_A.<adapter>.weight` / `lora_B`; `merge_lora` puts plain linears back, so the keys are ours again.

Adapter file (`save_lora`; a `lora.enabled` run writes `<out_dir>/model/lora.safetensors`): peft's key format,
`base_model.model.<module>.lora_A.weight` / `.lora_B.weight` with our module names, fp32, the peft `LoraConfig` in
the safetensors metadata (`lora_config`) and as peft's `adapter_config.json` beside it.
`load_lora` also takes diffusers' `transformer.<module>.lora_A.weight` and bare `<module>.lora_A.weight` keys; a
file without a config gets rank from its shapes and alpha = rank (scale 1), as diffusers assumes.

Commands: `cinedit generator merge-lora --base PIPELINE_OR_GENERATOR --lora FILE[:SCALE] ... --out DIR`; sampling
takes adapters with `cinedit generator sample --lora FILE[:SCALE]`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from cinedit.configs.generator import LORA_MODULATION, LoRAConfig
from cinedit.generator.loading import load_pretrained, save_pretrained
from cinedit.generator.model import MMDiT
from cinedit.generator.pipeline import GENERATOR_DIR, PIPELINE_FILE
from cinedit.runtime.files import atomic_path, write_json

LORA_FILE = "lora.safetensors"
ADAPTER_CONFIG = "adapter_config.json"  # peft's name for the config beside the weights
PEFT_PREFIX = "base_model.model."  # the key prefix we write (peft's PeftModel)
DIFFUSERS_PREFIX = "transformer."  # diffusers' pipeline-component prefix, accepted on loading
DEFAULT_ADAPTER = "default"
_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A|lora_B)\.weight$")


def import_peft() -> SimpleNamespace:
    """peft's LoRA pieces. Imported on first use: peft loads transformers (~9 s), which a run without LoRA and
    `cinedit generator --help` never need."""
    from peft import LoraConfig  # heavy
    from peft.functional import (  # heavy
        cast_adapter_dtype,
        get_peft_model_state_dict,
        inject_adapter_in_model,
        set_adapter,
        set_peft_model_state_dict,
    )
    from peft.tuners.lora import LoraLayer
    from peft.tuners.tuners_utils import BaseTunerLayer

    return SimpleNamespace(
        LoraConfig=LoraConfig,
        LoraLayer=LoraLayer,
        BaseTunerLayer=BaseTunerLayer,
        cast_adapter_dtype=cast_adapter_dtype,
        get_peft_model_state_dict=get_peft_model_state_dict,
        inject_adapter_in_model=inject_adapter_in_model,
        set_adapter=set_adapter,
        set_peft_model_state_dict=set_peft_model_state_dict,
    )


# ----------------------------------------------------------------------------------------------------------------------
# training


def target_pattern(cfg: LoRAConfig) -> str:
    """The regular expression (peft `target_modules`, matched against whole module names) of `cfg`'s layers."""

    def alternatives(names: list[str] | tuple[str, ...]) -> str:
        return "|".join(re.escape(n) for n in names)

    double, single, top = list(cfg.double_targets), list(cfg.single_targets), []
    if cfg.modulation:
        double += ["img_mod.lin", "txt_mod.lin"]
        single += ["modulation.lin"]
        top += [n for n in LORA_MODULATION if n.startswith("final_layer.")]
    parts = [
        rf"{kind}\.\d+\.({alternatives(names)})"
        for kind, names in (("double_blocks", double), ("single_blocks", single))
        if names
    ]
    parts += [re.escape(n) for n in top]
    return "|".join(f"({p})" for p in parts)


def peft_config(cfg: LoRAConfig) -> Any:
    """peft's `LoraConfig` for our `LoRAConfig`."""
    return import_peft().LoraConfig(
        r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=target_pattern(cfg)
    )


def apply_lora(model: MMDiT, cfg: LoRAConfig, name: str = DEFAULT_ADAPTER) -> MMDiT:
    """Inject fresh adapters (A random, B zero: the output is the base model's) into `model` in place and freeze
    everything else. The adapters are fp32 whatever the base's dtype (a bf16 base stays bf16)."""
    peft = import_peft()
    peft.inject_adapter_in_model(peft_config(cfg), model, adapter_name=name)
    peft.cast_adapter_dtype(model, name, autocast_adapter_dtype=True)
    for pname, p in model.named_parameters():
        p.requires_grad_(f".lora_A.{name}." in pname or f".lora_B.{name}." in pname)
    return model


def lora_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The trainable parameters by name (after `apply_lora`: the adapters alone)."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def adapter_names(model: nn.Module) -> list[str]:
    """The adapters injected into `model`, in the order they were added."""
    return list(getattr(model, "peft_config", {}))


def adapter_state(model: nn.Module, name: str = DEFAULT_ADAPTER) -> dict[str, Tensor]:
    """One adapter's tensors in the file's key format (`base_model.model.<module>.lora_A.weight`), fp32 on CPU."""
    state = import_peft().get_peft_model_state_dict(model, adapter_name=name)
    return {PEFT_PREFIX + k: v.detach().float().contiguous().cpu() for k, v in state.items()}


def save_lora(model: nn.Module, path: str | os.PathLike, name: str = DEFAULT_ADAPTER, base: str = "") -> Path:
    """Write adapter `name` as one safetensors file (atomically) with its peft config in the metadata, and that
    config as `adapter_config.json` beside it; `base` (the model it adapts) goes into both."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    config = model.peft_config[name].to_dict()
    config["base_model_name_or_path"] = base or None
    # peft's JSON (sets as lists); the config's target_modules is our pattern, a string.
    text = json.dumps(config, default=lambda v: sorted(v) if isinstance(v, set) else str(v), indent=2, sort_keys=True)
    with atomic_path(path) as tmp:
        save_file(adapter_state(model, name), str(tmp), metadata={"format": "pt", "lora_config": text})
    write_json(path.parent / ADAPTER_CONFIG, json.loads(text))
    return path


# ----------------------------------------------------------------------------------------------------------------------
# loading, scales, merging


def read_lora(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, Any] | None]:
    """(state with bare `<module>.lora_A.weight` keys, peft config dict or None) of an adapter file: peft's,
    diffusers' or bare keys; the config from the file's metadata, else `adapter_config.json` beside it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LoRA file {path}: no such file")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        state = {k: f.get_tensor(k) for k in f.keys()}
    for prefix in (PEFT_PREFIX, DIFFUSERS_PREFIX):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
            break
    other = sorted(k for k in state if not _KEY.match(k))
    if other or not state:
        raise ValueError(
            f"{path}: not a LoRA file of lora_A / lora_B weights ({len(other)} other keys, e.g. {other[:3]}); "
            f"expected `{PEFT_PREFIX}<module>.lora_A.weight` (peft) or `{DIFFUSERS_PREFIX}<module>.lora_A.weight`"
        )
    config = None
    if "lora_config" in meta:
        config = json.loads(meta["lora_config"])
    elif (path.parent / ADAPTER_CONFIG).is_file():
        config = json.loads((path.parent / ADAPTER_CONFIG).read_text())
    return state, config


def _config_for(state: dict[str, Tensor], config: dict[str, Any] | None, modules: list[str]) -> Any:
    peft = import_peft()
    known = {f.name for f in dataclasses.fields(peft.LoraConfig)}
    doc = {k: v for k, v in (config or {}).items() if k in known and k not in ("peft_type", "peft_version")}
    if not config:
        rank = next(v.shape[0] for k, v in state.items() if k.endswith(".lora_A.weight"))
        doc.update(r=rank, lora_alpha=rank)
    # The modules the file holds weights for, by their exact names: what the config's pattern matched when saved.
    doc["target_modules"] = modules
    doc["inference_mode"] = True
    return peft.LoraConfig(**doc)


def load_lora(model: MMDiT, path: str | os.PathLike, scale: float = 1.0, name: str | None = None) -> str:
    """Add the adapter in `path` to `model` (frozen) at `scale`, active together with the adapters already loaded;
    returns its name (default: the file name, made unique)."""
    peft = import_peft()
    state, config = read_lora(path)
    modules = sorted({_KEY.match(k)["module"] for k in state})
    linears = {n for n, m in model.named_modules() if isinstance(m, (nn.Linear, peft.LoraLayer))}
    foreign = [m for m in modules if m not in linears]
    if foreign:
        raise ValueError(
            f"{path}: adapts modules this MMDiT has no linear layer for ({foreign[:3]}): is it an adapter for another "
            f"model (architecture or module names)?"
        )
    taken = adapter_names(model)
    if name is None:
        stem = re.sub(r"\W", "_", Path(path).stem) or "lora"
        name, i = stem, 2
        while name in taken:
            name, i = f"{stem}_{i}", i + 1
    elif name in taken:
        raise ValueError(f"an adapter named {name!r} is already loaded")
    # peft freezes the base; keep its flags: on CPU a frozen weight takes another matmul kernel for strided inputs,
    # and an adapter at scale 0 must give the base's outputs bit for bit.
    flags = {p: p.requires_grad for p in model.parameters()}
    peft.inject_adapter_in_model(_config_for(state, config, modules), model, adapter_name=name)
    try:
        result = peft.set_peft_model_state_dict(model, state, adapter_name=name)
    except RuntimeError as e:  # shapes: another hidden size or rank than the config says
        raise ValueError(f"{path}: its tensors do not fit this model: {e}") from None
    missing = [k for k in result.missing_keys if f".{name}." in k]
    if result.unexpected_keys or missing:
        raise ValueError(f"{path}: unexpected keys {result.unexpected_keys[:3]}, missing {missing[:3]}")
    peft.set_adapter(model, [*taken, name], inference_mode=True)  # every loaded adapter active and frozen
    for p, flag in flags.items():
        p.requires_grad_(flag)
    set_lora_scale(model, name, scale)
    return name


def set_lora_scale(model: nn.Module, name: str, scale: float) -> None:
    """Scale adapter `name`'s update: `scale` * alpha / rank * B @ A (0: the base model)."""
    layers = [m for m in model.modules() if isinstance(m, import_peft().LoraLayer) and name in m.lora_A]
    if not layers:
        raise ValueError(f"no adapter named {name!r}; loaded: {adapter_names(model)}")
    for layer in layers:
        layer.set_scale(name, scale)


def merge_lora(model: MMDiT) -> MMDiT:
    """Add every active adapter's scaled update to its base weight and put plain linears back in place (peft's
    `merge_and_unload`, for a model injected without a PeftModel): the keys are the base model's again."""
    peft = import_peft()
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, peft.BaseTunerLayer)]
    for name, layer in layers:
        layer.merge(adapter_names=list(layer.active_adapters))
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer.get_base_layer())
    if hasattr(model, "peft_config"):
        del model.peft_config
    return model


def parse_lora_spec(spec: str) -> tuple[str, float]:
    """`FILE[:SCALE]` -> (FILE, SCALE); SCALE defaults to 1.0 (a file whose name itself ends in `:N` still works)."""
    path, sep, tail = spec.rpartition(":")
    if sep and not Path(spec).is_file():
        try:
            return path, float(tail)
        except ValueError:
            pass
    return spec, 1.0


def load_loras(model: MMDiT, specs: list[str] | None) -> list[str]:
    """`load_lora` for each `FILE[:SCALE]` of `specs`, in order; returns the adapter names."""
    return [load_lora(model, path, scale) for path, scale in map(parse_lora_spec, specs or [])]


# ----------------------------------------------------------------------------------------------------------------------
# `cinedit generator merge-lora`


def merged_model(base: str | os.PathLike, specs: list[str]) -> MMDiT:
    """The base generator (a pipeline folder's, a generator folder or a single file) with the adapters merged in,
    computed in fp32 and returned in the base's dtype."""
    root = Path(base)
    model = load_pretrained(root / GENERATOR_DIR if (root / PIPELINE_FILE).is_file() else root)
    dtype = next(model.parameters()).dtype
    load_loras(model.float(), specs)
    return merge_lora(model).to(dtype)


def write_merged(base: str | os.PathLike, model: MMDiT, out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write `model` as a generator folder, or, for a pipeline `base`, as a copy of that pipeline with this
    generator; atomically (a temporary folder renamed when complete)."""
    base, out = Path(base), Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"--out {out} exists; pass --overwrite to replace it")
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        if (base / PIPELINE_FILE).is_file():
            shutil.copytree(base, tmp, ignore=lambda d, names: [GENERATOR_DIR] if Path(d) == base else [])
            save_pretrained(model, tmp / GENERATOR_DIR)
        else:
            save_pretrained(model, tmp)
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def run_merge(args: argparse.Namespace) -> int:
    """The `merge-lora` subcommand; returns the exit code."""
    try:
        if Path(args.out).exists() and not args.overwrite:
            raise FileExistsError(f"--out {args.out} exists; pass --overwrite to replace it")
        model = merged_model(args.base, args.lora)
        write_merged(args.base, model, args.out, args.overwrite)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"cinedit generator merge-lora: error: {e}", file=sys.stderr)
        return 2
    print(f"{args.out}: {Path(args.base).name} with {len(args.lora)} adapter(s) merged")
    return 0


def add_cli(sub: argparse._SubParsersAction) -> None:
    """Register `merge-lora`."""
    p = sub.add_parser(
        "merge-lora",
        help="merge LoRA adapters into a generator or pipeline",
        description="Add LoRA adapters (each at its scale) into the base generator's weights and write the merged "
        "model: a pipeline folder when --base is one, else a generator folder.",
    )
    p.add_argument("--base", required=True, metavar="PATH", help="pipeline folder, generator folder or .safetensors")
    p.add_argument(
        "--lora", required=True, action="append", metavar="FILE[:SCALE]", help="adapter file, repeatable (scale 1.0)"
    )
    p.add_argument("--out", required=True, metavar="DIR", help="the merged model folder (must not exist)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.set_defaults(func=run_merge, command="merge-lora")


__all__ = [
    "LORA_FILE",
    "adapter_names",
    "adapter_state",
    "add_cli",
    "apply_lora",
    "load_lora",
    "load_loras",
    "lora_parameters",
    "merge_lora",
    "merged_model",
    "parse_lora_spec",
    "peft_config",
    "read_lora",
    "save_lora",
    "set_lora_scale",
    "target_pattern",
    "write_merged",
]
