"""Pipeline folders: generator + tokenizer + text-encoder config saved and loaded together, checked for fit."""

from __future__ import annotations

import dataclasses

import pytest

from cinedit.generator.model import PRESETS as GENERATORS
from cinedit.generator.model import MMDiT
from cinedit.generator.pipeline import load_pipeline, save_pipeline
from cinedit.generator.sampler import SamplerConfig
from cinedit.generator.text import PRESETS as TEXT
from cinedit.tokenizer.model import PRESETS as TOKENIZERS
from cinedit.tokenizer.model import VideoDCAE


def debug_parts(context: int = 384):
    cfg = dataclasses.replace(GENERATORS["debug"](), context_in_dim=context, vec_in_dim=384)
    return MMDiT(cfg), VideoDCAE(TOKENIZERS["debug"]())


def test_round_trip(tmp_path):
    gen, tok = debug_parts()
    save_pipeline(tmp_path / "p", gen, tok, TEXT["debug"], SamplerConfig(num_steps=7), fps=12.5)
    p = load_pipeline(tmp_path / "p")
    assert p.sampler.num_steps == 7 and p.fps == 12.5 and p.text_config == TEXT["debug"]
    for k, v in gen.state_dict().items():
        assert (p.generator.state_dict()[k] == v).all(), k
    assert p.text_encoder.txt_dim == 384
    # Parts can also be named one by one (e.g. the release files).
    q = load_pipeline(generator=tmp_path / "p/generator", tokenizer=tmp_path / "p/tokenizer", text_config="debug")
    assert q.tokenizer.config == tok.config


def test_mismatches_fail_clearly(tmp_path):
    gen, tok = debug_parts(context=48)
    save_pipeline(tmp_path / "p", gen, tok, TEXT["debug"])
    with pytest.raises(ValueError, match="txt 384 / vec 384, the generator expects 48 / 384"):
        load_pipeline(tmp_path / "p")
    wide = VideoDCAE(dataclasses.replace(TOKENIZERS["debug"](), latent_channels=32))
    with pytest.raises(ValueError, match="32 latent channels"):
        save_pipeline(tmp_path / "q", gen, wide, TEXT["debug"])
    with pytest.raises(FileNotFoundError, match="not a pipeline folder"):
        load_pipeline(tmp_path)
    with pytest.raises(ValueError, match="unknown text-encoder preset"):
        load_pipeline(generator=tmp_path / "p/generator", tokenizer=tmp_path / "p/tokenizer", text_config="t9")
