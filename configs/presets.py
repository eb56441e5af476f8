"""Named presets: functions returning config dataclasses, looked up by name or loaded from a run directory."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cinedit.configs.core import CONFIG_FILE, ConfigError, apply_overrides, load_config, validate

PRESETS: dict[str, dict[str, Callable[[], Any]]] = {}


def preset(kind: str, name: str | None = None) -> Callable:
    """Register a function returning a config as preset `name` (default: the function's name) of `kind`."""

    def register(fn: Callable[[], Any]) -> Callable[[], Any]:
        PRESETS.setdefault(kind, {})[name or fn.__name__] = fn
        return fn

    return register


def resolve(kind: str, name_or_path: str, overrides: list[str] | None = None) -> Any:
    """A preset by name, or the config saved in a run directory / config.json, with overrides applied."""
    path = Path(name_or_path)
    if path.suffix == ".json" or (path.is_dir() and (path / CONFIG_FILE).is_file()) or os.sep in name_or_path:
        cfg = load_config(path)
    else:
        table = PRESETS.get(kind, {})
        if name_or_path not in table:
            import difflib

            close = difflib.get_close_matches(name_or_path, table, n=5, cutoff=0.4)
            hint = f" Did you mean: {', '.join(close)}?" if close else ""
            raise ConfigError(
                f"unknown {kind} preset {name_or_path!r}.{hint} Known: {', '.join(sorted(table)) or 'none'}; "
                f"or pass a run directory / config.json to re-launch a run."
            )
        cfg = table[name_or_path]()
    validate(cfg)
    return apply_overrides(cfg, overrides or [])
