"""cinedit.configs: typed config dataclasses, the `--section.field=value` override parser, the run schemas of both
trainers and their presets. The bottom layer: it imports no other cinedit package.

- `core`: dataclass <-> dict, overrides, `validate` (every section's `validate()` raises `ConfigError`), loading
- `data`: the data and bucket sections; `train`: the loop and EMA sections; `parallel`: the `parallel` section
- `tokenizer`, `generator`: each trainer's run schema and presets; `presets`: the preset tables and lookup
"""

from cinedit.configs.core import (
    CONFIG_FILE,
    ConfigError,
    apply_overrides,
    describe,
    field_paths,
    from_dict,
    load_config,
    parse_overrides,
    set_field,
    to_dict,
    validate,
)
from cinedit.configs.data import BucketConfig, DataConfig, debug_buckets, frame_range, stage1_buckets, stage3_buckets
from cinedit.configs.parallel import ParallelConfig
from cinedit.configs.presets import PRESETS, config_from_argv, resolve
from cinedit.configs.train import RUN_CONTROL, EMAConfig, LoopConfig

__all__ = [
    "CONFIG_FILE",
    "PRESETS",
    "RUN_CONTROL",
    "BucketConfig",
    "ConfigError",
    "DataConfig",
    "EMAConfig",
    "LoopConfig",
    "ParallelConfig",
    "apply_overrides",
    "config_from_argv",
    "debug_buckets",
    "describe",
    "field_paths",
    "frame_range",
    "from_dict",
    "load_config",
    "parse_overrides",
    "resolve",
    "set_field",
    "stage1_buckets",
    "stage3_buckets",
    "to_dict",
    "validate",
]
