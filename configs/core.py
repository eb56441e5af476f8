"""Typed config machinery: dataclass <-> dict, `--section.field=value` overrides, run-directory files.

Configs are plain nested dataclasses. Everything here works from the type hints, so a new field needs
no registration: it is overridable, saved and reloaded as soon as it is declared.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import json
import math
import os
import sys
import types
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

T = TypeVar("T")

CONFIG_FILE = "config.json"


class ConfigError(ValueError):
    """A config value or override that cannot be applied; the message says what to change."""


def _hints(cls: type) -> dict[str, Any]:
    return get_type_hints(cls)


def field_paths(cfg_or_cls: Any, prefix: str = "") -> list[str]:
    """All dotted leaf paths of a config (``data.meta``, ``buckets.tolerance``, ...)."""
    cls = cfg_or_cls if isinstance(cfg_or_cls, type) else type(cfg_or_cls)
    out = []
    for f in dataclasses.fields(cls):
        tp = _hints(cls)[f.name]
        path = f"{prefix}{f.name}"
        sub = _dataclass_of(tp)
        if sub is not None:
            out.extend(field_paths(sub, path + "."))
        else:
            out.append(path)
    return out


def _dataclass_of(tp: Any) -> type | None:
    """The dataclass behind `tp` (also inside Optional[...]) or None."""
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return tp
    if _is_union(tp):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return _dataclass_of(args[0])
    return None


def _is_union(tp: Any) -> bool:
    return get_origin(tp) is Union or isinstance(tp, types.UnionType)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def convert(value: Any, tp: Any, where: str = "value") -> Any:
    """Convert `value` (a CLI string or a JSON-loaded object) to the type hint `tp`."""
    if tp is Any:
        return value
    if _is_union(tp):
        args = get_args(tp)
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        for a in args:
            if a is type(None):
                continue
            try:
                return convert(value, a, where)
            except ConfigError:
                pass
        raise ConfigError(f"{where}: cannot read {value!r} as {_type_name(tp)}")
    origin = get_origin(tp)
    if origin is Literal:
        choices = get_args(tp)
        for c in choices:
            if value == c or (isinstance(value, str) and str(c) == value):
                return c
        raise ConfigError(f"{where}: {value!r} is not one of {list(choices)}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, str):
            value = _parse_json(value, where)
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, prefix=where + ".")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
            return False
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ConfigError(f"{where}: expected a bool (true/false), got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an int, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected an int, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a float, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    if origin in (list, tuple, dict):
        if isinstance(value, str):
            value = _parse_json(value, where, allow_csv=origin is not dict)
        args = get_args(tp)
        if origin is list:
            if not isinstance(value, (list, tuple)):
                raise ConfigError(f"{where}: expected a list, got {value!r}")
            return [convert(v, args[0] if args else Any, f"{where}[{i}]") for i, v in enumerate(value)]
        if origin is tuple:
            if not isinstance(value, (list, tuple)):
                raise ConfigError(f"{where}: expected a tuple, got {value!r}")
            if len(args) == 2 and args[1] is Ellipsis:
                return tuple(convert(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
            if args and len(args) != len(value):
                raise ConfigError(f"{where}: expected {len(args)} items, got {len(value)} in {value!r}")
            types_ = args or (Any,) * len(value)
            return tuple(convert(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, types_)))
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        kt, vt = args if args else (Any, Any)
        return {convert(k, kt, f"{where} key"): convert(v, vt, f"{where}[{k}]") for k, v in value.items()}
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ConfigError(f"{where}: unsupported type {_type_name(tp)} for {value!r}")


def _parse_json(text: str, where: str, allow_csv: bool = False) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        # `--x.sizes=1,2,3` is friendlier than JSON for flat lists; `[0.9,abc]` (not JSON) is read the same way, so
        # the error names the element that is wrong.
        if allow_csv:
            inner = text.strip()
            if inner[:1] + inner[-1:] in ("[]", "()"):
                inner = inner[1:-1]
            return [s.strip() for s in inner.split(",") if s.strip()]
        raise ConfigError(f"{where}: {text!r} is not valid JSON (mappings are written as JSON)") from None


def check_adamw(section: str, lr: float, betas: tuple[float, float], eps: float, weight_decay: float) -> None:
    """Raise ConfigError unless AdamW's hyper-parameters are usable: finite, lr and eps > 0, betas in [0, 1)."""
    if not (math.isfinite(lr) and lr > 0):
        raise ConfigError(f"{section}.lr must be a positive number, got {lr}")
    for i, b in enumerate(betas):
        if not (math.isfinite(b) and 0 <= b < 1):
            raise ConfigError(f"{section}.betas[{i}] must be in [0, 1), got {b}")
    if not (math.isfinite(eps) and eps > 0):
        raise ConfigError(f"{section}.eps must be a positive number, got {eps}")
    if not (math.isfinite(weight_decay) and weight_decay >= 0):
        raise ConfigError(f"{section}.weight_decay must be >= 0, got {weight_decay}")


def to_dict(cfg: Any) -> Any:
    """A JSON-ready nested dict of a config (tuples become lists, dict keys strings)."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {str(k): to_dict(v) for k, v in cfg.items()}
    if isinstance(cfg, Path):
        return str(cfg)
    return cfg


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build `cls` from a nested dict, converting every value by its type hint; unknown keys fail."""
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        raise ConfigError(_unknown_message(prefix + unknown[0], [prefix + n for n in names]))
    kwargs = {k: convert(v, hints[k], prefix + k) for k, v in data.items()}
    return cls(**kwargs)


def _unknown_message(key: str, known: list[str]) -> str:
    close = difflib.get_close_matches(key, known, n=5, cutoff=0.5)
    if not close:
        # Matching the last component catches a right field under a wrong section.
        leaf = key.rsplit(".", 1)[-1]
        close = [k for k in known if k.rsplit(".", 1)[-1] == leaf] or difflib.get_close_matches(
            leaf, known, n=5, cutoff=0.4
        )
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    return f"unknown config field '{key}'.{hint} (all fields: `--help-config`)"


def set_field(cfg: Any, path: str, raw: Any) -> None:
    """Set the dotted `path` of `cfg` in place, converting `raw` to the field's type."""
    parts = path.split(".")
    obj = cfg
    for i, name in enumerate(parts):
        cls = type(obj)
        names = {f.name for f in dataclasses.fields(cls)}
        if name not in names:
            raise ConfigError(_unknown_message(path, field_paths(cfg)))
        tp = _hints(cls)[name]
        if i == len(parts) - 1:
            setattr(obj, name, convert(raw, tp, path))
            return
        child = getattr(obj, name)
        if child is None:
            sub = _dataclass_of(tp)
            if sub is None:
                raise ConfigError(_unknown_message(path, field_paths(cfg)))
            child = sub()
            setattr(obj, name, child)
        if not dataclasses.is_dataclass(child):
            raise ConfigError(f"'{'.'.join(parts[: i + 1])}' is a {_type_name(tp)} field, not a section")
        obj = child


def parse_overrides(args: list[str]) -> list[tuple[str, str]]:
    """Split ``--a.b=1 --c.d 2`` into [(a.b, 1), (c.d, 2)]; anything else is an error."""
    out = []
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise ConfigError(f"unexpected argument {arg!r}: overrides are written --section.field=value")
        key = arg[2:]
        if "=" in key:
            key, value = key.split("=", 1)
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            i += 1
            value = args[i]
        else:
            raise ConfigError(f"override {arg!r} has no value: write {arg}=VALUE")
        out.append((key.replace("-", "_"), value))
        i += 1
    return out


def apply_overrides(cfg: T, args: list[str]) -> T:
    """Apply command-line overrides to `cfg` in place and return it (validation runs afterwards)."""
    for key, value in parse_overrides(args):
        set_field(cfg, key, value)
    validate(cfg)
    return cfg


def validate(cfg: Any) -> None:
    """Call `validate()` on every config section that defines one (sub-sections first)."""
    if not dataclasses.is_dataclass(cfg):
        return
    for f in dataclasses.fields(cfg):
        validate(getattr(cfg, f.name))
    check = getattr(cfg, "validate", None)
    if callable(check):
        check()


def load_config(path: str | os.PathLike, cls: type[T] | None = None) -> T:
    """Read a saved config (a run directory or its config.json) back into its dataclass."""
    path = Path(path)
    if path.is_dir():
        path = path / CONFIG_FILE
    if not path.is_file():
        raise ConfigError(f"no config at {path}: pass a run directory or the config.json written by a run")
    doc = json.loads(path.read_text())
    type_name = doc.pop("_type", None)
    doc.pop("_preset", None)
    if cls is None:
        if type_name is None:
            raise ConfigError(f"{path} does not name its config type; pass the class to load it")
        cls = run_config_class(type_name, path)
    cfg = from_dict(cls, doc)
    validate(cfg)
    return cfg


# Where run configs were defined before they moved to cinedit.configs: config.json files of older runs name these.
LEGACY_TYPES = {
    "cinedit.tokenizer.train.TokenizerTrainConfig": "cinedit.configs.tokenizer.TokenizerTrainConfig",
    "cinedit.generator.train.GeneratorTrainConfig": "cinedit.configs.generator.GeneratorTrainConfig",
}


def run_config_class(type_name: str, where: Any = "config") -> type:
    """The run-config class a saved config.json names (`_type`). Only `cinedit.configs` modules are imported for it
    (a config file never makes cinedit import other code); a class of another module must already be loaded."""
    type_name = LEGACY_TYPES.get(type_name, type_name)
    module, _, qual = type_name.rpartition(".")
    if not module.startswith("cinedit.configs") and module not in sys.modules:
        raise ConfigError(
            f"{where}: config type {type_name!r} is not a cinedit run config (cinedit.configs.*); import its module "
            f"first, or pass the class to load_config"
        )
    try:
        cls = getattr(importlib.import_module(module), qual)
    except (ImportError, AttributeError):
        raise ConfigError(f"{where}: unknown config type {type_name!r}; was it written by a newer cinedit?") from None
    if not dataclasses.is_dataclass(cls):
        raise ConfigError(f"{where}: config type {type_name!r} is not a config dataclass")
    return cls


def describe(cfg: Any) -> str:
    """One `--path=value` line per leaf field: what `--help-config` prints."""
    lines = []
    for path in field_paths(cfg):
        obj = cfg
        for p in path.split("."):
            obj = getattr(obj, p) if obj is not None else None
        lines.append(f"--{path}={json.dumps(to_dict(obj))}")
    return "\n".join(lines)


__all__ = [
    "ConfigError",
    "apply_overrides",
    "check_adamw",
    "convert",
    "describe",
    "field_paths",
    "from_dict",
    "load_config",
    "parse_overrides",
    "run_config_class",
    "set_field",
    "to_dict",
    "validate",
]
