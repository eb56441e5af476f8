"""cinedit.tokenizer: the Video DC-AE (model, presets, loading and saving, image DC-AE inflation)."""

from cinedit.tokenizer.loading import init_from_image_dcae, load_pretrained, save_pretrained
from cinedit.tokenizer.model import PRESETS, DCAEConfig, VideoDCAE, config_from_reference, load_weights

__all__ = [
    "PRESETS",
    "DCAEConfig",
    "VideoDCAE",
    "config_from_reference",
    "init_from_image_dcae",
    "load_pretrained",
    "load_weights",
    "save_pretrained",
]
