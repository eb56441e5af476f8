"""cinedit.tokenizer: the Video DC-AE (model, presets, release-checkpoint loading)."""

from cinedit.tokenizer.model import PRESETS, DCAEConfig, VideoDCAE, config_from_reference, load_weights

__all__ = ["PRESETS", "DCAEConfig", "VideoDCAE", "config_from_reference", "load_weights"]
