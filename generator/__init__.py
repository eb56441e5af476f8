"""cinedit.generator: the MMDiT video generator (model, RoPE/attention math, loading, parallel wrappers)."""

from cinedit.generator.loading import infer_config, load_pretrained, save_pretrained
from cinedit.generator.math import make_ids, make_txt_ids, pack, unpack
from cinedit.generator.model import PRESETS, MMDiT, MMDiTConfig, config_from_reference
from cinedit.generator.parallel import apply_activation_checkpointing

__all__ = [
    "PRESETS",
    "MMDiT",
    "MMDiTConfig",
    "apply_activation_checkpointing",
    "config_from_reference",
    "infer_config",
    "load_pretrained",
    "make_ids",
    "make_txt_ids",
    "pack",
    "unpack",
    "save_pretrained",
]
