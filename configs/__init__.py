"""cinedit.configs: typed config dataclasses, the `--section.field=value` override parser and presets."""

from cinedit.configs.core import (
    CONFIG_FILE,
    ConfigError,
    apply_overrides,
    describe,
    field_paths,
    from_dict,
    load_config,
    parse_overrides,
    save_config,
    set_field,
    to_dict,
    validate,
)
from cinedit.configs.data import BucketConfig, DataConfig, debug_buckets, frame_range, stage1_buckets, stage3_buckets
from cinedit.configs.presets import PRESETS, config_from_argv, preset, resolve
from cinedit.configs.train import EMAConfig, LoopConfig

__all__ = [
    "CONFIG_FILE",
    "PRESETS",
    "BucketConfig",
    "ConfigError",
    "DataConfig",
    "EMAConfig",
    "LoopConfig",
    "apply_overrides",
    "config_from_argv",
    "debug_buckets",
    "describe",
    "field_paths",
    "frame_range",
    "from_dict",
    "load_config",
    "parse_overrides",
    "preset",
    "resolve",
    "save_config",
    "set_field",
    "stage1_buckets",
    "stage3_buckets",
    "to_dict",
    "validate",
]
