"""`--data.mock=true`: the generator trains on seeded random latents of every bucket shape, with no file read, no video
decoded and no prompt encoded (throughput runs)."""

from __future__ import annotations

import pytest
import torch

from cinedit.cli import main
from cinedit.configs import ConfigError
from cinedit.configs.generator import PRESETS
from cinedit.data.dataset import MockLatentDataset
from cinedit.generator import train as gtrain
from cinedit.runtime.logs import read_metrics
from cinedit.tokenizer.loading import load_tokenizer


def test_mock_samples_are_seeded_by_index_and_shaped_by_the_tokenizer():
    tok = load_tokenizer("debug", "cpu")
    ds = MockLatentDataset([(8, 64, 96), (1, 64, 64)], 3, tok.latent_shape, 7, (16, 5), seed=1)
    assert len(ds) == 6 and ds.exact_shape
    a, b = ds[(0, 8, 64, 96, 0)], ds[(0, 8, 64, 96, 99)]
    assert torch.equal(a["latent"], b["latent"]) and torch.equal(a["txt"], b["txt"])  # by index, not draw seed
    assert not torch.equal(a["latent"], ds[(1, 8, 64, 96, 0)]["latent"])
    assert a["latent"].shape == tok.latent_shape(8, 64, 96) and a["txt"].shape == (7, 16) and a["vec"].shape == (5,)
    assert ds[(3, 1, 64, 64, 0)]["latent"].shape == tok.latent_shape(1, 64, 64)


def test_mock_config_is_checked():
    cfg = PRESETS["debug"]()
    cfg.data.mock, cfg.data.use_cache, cfg.data.cache_dir = True, True, "x"
    with pytest.raises(ConfigError, match="exclude each other"):
        cfg.data.validate()


def test_training_on_mock_data_reads_and_encodes_nothing(tmp_path, monkeypatch, capsys):
    def forbidden(*a, **k):
        raise AssertionError("mock data must not decode video or load a text encoder")

    monkeypatch.setattr(gtrain, "load_text_encoder", forbidden)
    monkeypatch.setattr("cinedit.data.dataset.read_video", forbidden)
    out = tmp_path / "run"
    argv = ["generator", "train", "debug", "--data.mock=true", "--data.mock_samples=4", f"--train.out_dir={out}"]
    assert main([*argv, "--train.steps=4", "--train.progress=false", "--train.eval_every=2"]) == 0
    rows = [r for r in read_metrics(out) if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all(r["loss"] > 0 for r in rows)
    assert any("eval/loss" in r for r in read_metrics(out))
    assert "no validation samples" in capsys.readouterr().out
    assert (out / "model").is_dir()  # the pipeline export still works
