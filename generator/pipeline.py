"""A generation pipeline on disk: the MMDiT, the tokenizer whose latents it was trained on, and the text encoder.

Layout of a pipeline folder (what `cinedit generator train` writes as `<out_dir>/model`, and what
`cinedit generator sample --ckpt` reads):

    generator/   config.json + model.safetensors   (cinedit.generator.loading.save_pretrained)
    tokenizer/   config.json + model.safetensors   (cinedit.tokenizer.loading.save_pretrained)
    pipeline.json  {"format", "text_encoder": TextEncoderConfig fields, "sampler": SamplerConfig fields, "fps"}

The release ships the MMDiT and the tokenizer as single safetensors files; `load_pipeline` also takes those
through `generator=` / `tokenizer=` paths with a text-encoder config.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cinedit.configs.generator import TEXT_ENCODERS, SamplerConfig, TextEncoderConfig
from cinedit.generator.loading import load_pretrained as load_generator
from cinedit.generator.loading import save_pretrained as save_generator
from cinedit.generator.text import TextEncoder, load_text_encoder
from cinedit.runtime.files import write_json
from cinedit.tokenizer.loading import load_tokenizer
from cinedit.tokenizer.loading import save_pretrained as save_tokenizer

FORMAT = "cinedit-pipeline-v1"
PIPELINE_FILE = "pipeline.json"
GENERATOR_DIR = "generator"
TOKENIZER_DIR = "tokenizer"


@dataclass
class Pipeline:
    """Everything sampling needs, loaded."""

    generator: Any  # cinedit.generator.model.MMDiT
    tokenizer: Any  # cinedit.tokenizer.model.VideoDCAE
    text_encoder: TextEncoder
    text_config: TextEncoderConfig
    sampler: SamplerConfig
    fps: float
    # Text-to-image-to-video: the Flux.1-dev model and its 2D autoencoder that make the first frame.
    t2i_generator: Any = None
    t2i_tokenizer: Any = None


def check_compatible(generator: Any, tokenizer: Any, text_config: TextEncoderConfig, text: TextEncoder | None) -> None:
    """Raise ValueError when the three parts cannot work together (latent width, text widths)."""
    cfg = generator.config
    want = tokenizer.config.latent_channels * cfg.patch_size**2
    if cfg.in_channels != want:
        raise ValueError(
            f"the generator takes {cfg.in_channels} input channels but the tokenizer gives "
            f"{tokenizer.config.latent_channels} latent channels x patch {cfg.patch_size}^2 = {want}"
        )
    if text is not None and (text.txt_dim, text.vec_dim) != (cfg.context_in_dim, cfg.vec_in_dim):
        raise ValueError(
            f"the text encoder ({text_config.kind}) gives widths txt {text.txt_dim} / vec {text.vec_dim}, "
            f"the generator expects {cfg.context_in_dim} / {cfg.vec_in_dim}"
        )


def save_pipeline(
    out_dir: str | os.PathLike,
    generator: Any,
    tokenizer: Any,
    text_config: TextEncoderConfig,
    sampler: SamplerConfig | None = None,
    fps: float = 24.0,
) -> Path:
    """Write a pipeline folder (each file atomically; pipeline.json last, so a folder with it is complete)."""
    check_compatible(generator, tokenizer, text_config, None)
    out = Path(out_dir)
    save_generator(generator, out / GENERATOR_DIR)
    save_tokenizer(tokenizer, out / TOKENIZER_DIR)
    doc = {
        "format": FORMAT,
        "text_encoder": dataclasses.asdict(text_config),
        "sampler": dataclasses.asdict(sampler or SamplerConfig()),
        "fps": fps,
    }
    write_json(out / PIPELINE_FILE, doc)
    return out


def load_pipeline(
    path: str | os.PathLike | None = None,
    generator: str | os.PathLike | None = None,
    tokenizer: str | os.PathLike | None = None,
    text_config: TextEncoderConfig | str | None = None,
    device: str = "cpu",
) -> Pipeline:
    """A pipeline from a pipeline folder, with any part replaced by an explicit path or text-encoder config.

    Without a folder, `generator`, `tokenizer` and `text_config` must all be given (e.g. the release's MMDiT
    and Video DC-AE files with `text_config="release"`).
    """
    doc: dict[str, Any] = {}
    if path is not None:
        root = Path(path)
        if not (root / PIPELINE_FILE).is_file():
            raise FileNotFoundError(
                f"{root}: not a pipeline folder (no {PIPELINE_FILE}); pass the `model` folder of a "
                f"`cinedit generator train` run, or --generator / --tokenizer / --text-encoder"
            )
        doc = json.loads((root / PIPELINE_FILE).read_text())
        if doc.get("format") != FORMAT:
            raise ValueError(f"{root / PIPELINE_FILE}: format {doc.get('format')!r}, expected {FORMAT!r}")
        generator = generator or root / GENERATOR_DIR
        tokenizer = tokenizer or root / TOKENIZER_DIR
    missing = [n for n, v in (("generator", generator), ("tokenizer", tokenizer)) if v is None]
    if missing:
        raise ValueError(f"no {' and '.join(missing)} given: pass a pipeline folder or explicit paths")
    if text_config is None:
        if "text_encoder" not in doc:
            raise ValueError("no text encoder given: pass a pipeline folder or a text-encoder config / preset name")
        text_config = TextEncoderConfig(**doc["text_encoder"])
    elif isinstance(text_config, str):
        if text_config not in TEXT_ENCODERS:
            raise ValueError(f"unknown text-encoder preset {text_config!r}; known: {', '.join(TEXT_ENCODERS)}")
        text_config = dataclasses.replace(TEXT_ENCODERS[text_config])
    gen = load_generator(generator).to(device).eval()
    tok = load_tokenizer(tokenizer, device)
    text = load_text_encoder(text_config)
    check_compatible(gen, tok, text_config, text)
    sampler = SamplerConfig(**doc["sampler"]) if "sampler" in doc else SamplerConfig()
    sampler.validate()
    return Pipeline(gen, tok, text, text_config, sampler, float(doc.get("fps", 24.0)))
