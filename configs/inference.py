"""The public Open-Sora 2.0 release's inference settings, option for option (its `configs/diffusion/inference/*.py`).

A preset fixes what the release's config files fix: resolution and aspect ratio (through the release's size table,
whose sides are multiples of the tokenizer's compression times the patch size: 16 for the HunyuanVAE model, 32 for
the DC-AE one), the frame count (129 = 1 + 4 * 32 for the causal HunyuanVAE, 128 for the DC-AE), 50 steps with the
shifted schedule, text guidance 7.5 / image guidance 3.0 with text, image and temporal oscillation, 24 fps, the
release's motion score 4, and for the `t2i2v_*` presets the first frame made by Flux.1-dev at the 768px image size
with distilled guidance 4.0.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from cinedit.configs.core import ConfigError

TOKENIZER_KINDS = ("hunyuan_vae", "dcae")
COND_TYPES = ("t2v", "i2v_head", "i2v_tail", "i2v_loop", "t2i2v", "v2v_head_half", "v2v_tail_half")


@dataclass(frozen=True)
class InferencePreset:
    """One release inference config."""

    name: str
    tokenizer: str = "hunyuan_vae"  # which release files the preset loads
    resolution: str = "256px"
    aspect_ratio: str = "16:9"  # width:height
    num_frames: int = 129
    num_steps: int = 50
    shift: bool = True
    guidance: float = 7.5
    guidance_img: float = 3.0
    text_osci: bool = True
    image_osci: bool = True
    temporal_osci: bool = True
    fps: int = 24
    motion_score: int | None = 4
    cond_type: str = "t2v"
    t2i_resolution: str = "768px"  # the Flux first frame (t2i2v)
    t2i_guidance: float = 4.0  # Flux.1-dev's distilled guidance
    # The DC-AE release's inference config sets no scaling factor: it samples and decodes unscaled latents.
    tokenizer_scaling: bool = True
    context_parallel: int = 1  # the GPUs the release runs it on with sequence parallelism

    def validate(self) -> None:
        if self.tokenizer not in TOKENIZER_KINDS:
            raise ConfigError(f"preset {self.name}: tokenizer must be one of {TOKENIZER_KINDS}, got {self.tokenizer!r}")
        if self.cond_type not in COND_TYPES:
            raise ConfigError(f"preset {self.name}: cond_type must be one of {COND_TYPES}, got {self.cond_type!r}")
        if self.num_steps < 1 or self.num_frames < 1:
            raise ConfigError(f"preset {self.name}: num_steps and num_frames must be positive")

    @property
    def spatial_multiple(self) -> int:
        """Sides of the size table are multiples of this (the release's AE_SPATIAL_COMPRESSION)."""
        return 16 if self.tokenizer == "hunyuan_vae" else 32


def _presets() -> dict[str, InferencePreset]:
    p256 = InferencePreset("256px")
    p768 = dataclasses.replace(p256, name="768px", resolution="768px", context_parallel=8)
    return {
        "256px": p256,
        "768px": p768,
        "t2i2v_256px": dataclasses.replace(p256, name="t2i2v_256px", cond_type="t2i2v"),
        "t2i2v_768px": dataclasses.replace(p768, name="t2i2v_768px", cond_type="t2i2v"),
        "high_compression": dataclasses.replace(
            p768,
            name="high_compression",
            tokenizer="dcae",
            num_frames=128,
            tokenizer_scaling=False,
            context_parallel=1,
        ),
    }


INFERENCE_PRESETS: dict[str, InferencePreset] = _presets()

__all__ = ["COND_TYPES", "INFERENCE_PRESETS", "TOKENIZER_KINDS", "InferencePreset"]
