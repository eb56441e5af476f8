"""Named presets: functions returning config dataclasses, looked up by name or loaded from a run directory.

Registered explicitly here, one table per trainer (no registration as a side effect of importing a trainer).
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cinedit.configs import generator, tokenizer
from cinedit.configs.core import CONFIG_FILE, ConfigError, apply_overrides, describe, load_config, validate

# trainer kind -> {preset name: function returning its run config}
PRESETS: dict[str, dict[str, Callable[[], Any]]] = {"tokenizer": tokenizer.PRESETS, "generator": generator.PRESETS}


def resolve(kind: str, name_or_path: str, overrides: list[str] | None = None) -> Any:
    """A preset by name, or the config saved in a run directory / config.json, with overrides applied."""
    path = Path(name_or_path)
    if path.suffix == ".json" or (path.is_dir() and (path / CONFIG_FILE).is_file()) or os.sep in name_or_path:
        cfg = load_config(path)
        run_dir = path.parent if path.suffix == ".json" else path
        train = getattr(cfg, "train", None)
        if train is not None and hasattr(train, "out_dir") and (run_dir / CONFIG_FILE).is_file():
            # A re-launched run folder continues in itself, also when it was copied or moved (its config.json still
            # names the folder it was started in); --train.out_dir overrides.
            train.out_dir = str(run_dir)
    else:
        table = PRESETS.get(kind, {})
        if name_or_path not in table:
            close = difflib.get_close_matches(name_or_path, table, n=5, cutoff=0.4)
            hint = f" Did you mean: {', '.join(close)}?" if close else ""
            raise ConfigError(
                f"unknown {kind} preset {name_or_path!r}.{hint} Known: {', '.join(sorted(table)) or 'none'}; "
                f"or pass a run directory / config.json to re-launch a run."
            )
        cfg = table[name_or_path]()
    validate(cfg)
    return apply_overrides(cfg, overrides or [])


def config_from_argv(kind: str, argv: list[str]) -> tuple[Any, str]:
    """`PRESET_OR_RUN_DIR [--section.field=value ...] [--help-config]` -> (config, preset or path).

    The shared front half of every training entry point. `--help-config` prints every field with its
    resolved value and exits.
    """
    if not argv or argv[0].startswith("--"):
        known = ", ".join(sorted(PRESETS.get(kind, {}))) or "none"
        raise ConfigError(
            f"name a {kind} preset ({known}) or a run directory first, then --section.field=value overrides"
        )
    name, rest = argv[0], list(argv[1:])
    show = "--help-config" in rest
    if show:
        rest.remove("--help-config")
    cfg = resolve(kind, name, rest)
    if show:
        print(describe(cfg))
        raise SystemExit(0)
    return cfg, name
