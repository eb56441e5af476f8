"""Validation samples during training (`train.sample_every`): files and TensorBoard videos, unchanged losses and RNG,
nothing when off, clear errors for the prompts file; the tokenizer's held-out reconstructions."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_generator_train import make_media

from cinedit.data.video import probe
from cinedit.generator import train as train_mod
from cinedit.generator.generate import slug
from cinedit.runtime.logs import read_metrics
from cinedit.tokenizer import train as tok_train

PROMPTS = ["a red ball rolls across the floor", "grey stripes on a wall"]


@pytest.fixture(scope="module")
def meta(tmp_path_factory) -> Path:
    return make_media(tmp_path_factory.mktemp("val_data"))


def run(meta: Path, out: Path, *extra: str) -> int:
    argv = ["debug", f"--data.meta={meta}", f"--train.out_dir={out}", "--train.progress=false"]
    common = ("--train.steps=4", "--train.eval_every=0", "--train.ckpt_every=0", "--train.sample_steps=2")
    return train_mod.main([*argv, *common, *extra])


def image_events(out: Path) -> dict[str, list]:
    acc = EventAccumulator(str(out / "tb"))
    acc.Reload()
    return {tag: acc.Images(tag) for tag in acc.Tags()["images"]}


def test_debug_run_writes_playable_samples_and_tensorboard_videos(meta, tmp_path):
    out = tmp_path / "run"
    assert run(meta, out, "--train.sample_every=2") == 0
    prompts = (out / "samples" / "prompts.txt").read_text().splitlines()
    assert len(prompts) == 2  # the debug preset's two sample-data captions
    names = [f"{i:04d}_{slug(p)}" for i, p in enumerate(prompts)]
    for step in (2, 4):
        folder = out / "samples" / f"step_{step:07d}"
        assert sorted(p.name for p in folder.iterdir()) == [f"{n}.mp4" for n in names]
        for name in names:
            info = probe(folder / f"{name}.mp4")
            assert (info.num_frames, info.height, info.width) == (8, 64, 64)
    events = image_events(out)
    for name in names:
        got = events[f"samples/{name}"]
        assert [e.step for e in got] == [2, 4]
        assert all(e.encoded_image_string[:4] == b"GIF8" and (e.height, e.width) == (64, 64) for e in got)
    # Rounds are comparable: the same prompt and seed, a model that changed in between.
    a, b = ((out / "samples" / f"step_{s:07d}" / f"{names[0]}.mp4").read_bytes() for s in (2, 4))
    assert a != b


def test_sampling_leaves_losses_and_rng_streams_unchanged(meta, tmp_path, monkeypatch):
    """A sampling round that also draws from every global RNG (as a sampler might) changes neither the losses nor
    the RNG states each training step starts from; with sample_every=0 nothing is written."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# validation prompts\n\n" + "\n".join(PROMPTS) + "\n")
    real_step, real_sample = train_mod.train_step, train_mod.sample_validation
    states: list = []

    def step_spy(tr, batch, step):
        states.append((torch.get_rng_state().clone(), np.random.get_state()[1].copy(), random.getstate()))
        return real_step(tr, batch, step)

    def greedy_sample(tr, logger):
        real_sample(tr, logger)
        torch.rand(3), np.random.rand(), random.random()

    monkeypatch.setattr(train_mod, "train_step", step_spy)
    monkeypatch.setattr(train_mod, "sample_validation", greedy_sample)
    on, off = tmp_path / "on", tmp_path / "off"
    extra = (f"--train.sample_prompts={prompts}", "--train.sample_frames=1")
    assert run(meta, on, "--train.sample_every=1", *extra) == 0
    states_on, states[:] = list(states), []
    assert run(meta, off, "--train.sample_every=0", *extra) == 0
    loss = lambda out: [r["loss"] for r in read_metrics(out) if "loss" in r]
    assert len(loss(on)) == 4 and loss(on) == loss(off)
    for (t1, n1, p1), (t2, n2, p2) in zip(states_on, states, strict=True):
        assert torch.equal(t1, t2) and np.array_equal(n1, n2) and p1 == p2
    # One frame is written as PNG, one file per prompt and step.
    pngs = sorted(p.relative_to(on / "samples").as_posix() for p in (on / "samples").rglob("*.png"))
    assert pngs == [f"step_{s:07d}/{i:04d}_{slug(p)}.png" for s in range(1, 5) for i, p in enumerate(PROMPTS)]
    assert len(image_events(on)) == 2
    assert not (off / "samples").exists() and not image_events(off)


@pytest.mark.parametrize(
    "content, extra, message",
    [
        (None, (), "no such file"),
        ("# only a comment\n\n", (), "no prompts"),
        ("a cat\n", ("--train.sample_size=[64,48]",), "multiples of 32"),
        ("a cat\n", ("--train.sample_frames=6",), "train.sample_frames=6"),
    ],
)
def test_bad_sample_settings_are_config_errors(meta, tmp_path, capsys, content, extra, message):
    prompts = tmp_path / "prompts.txt"
    if content is not None:
        prompts.write_text(content)
    out = tmp_path / "run"
    assert run(meta, out, "--train.sample_every=2", f"--train.sample_prompts={prompts}", *extra) == 2
    err = capsys.readouterr().err
    assert message in err and ("train.sample" in err)
    assert not read_metrics(out)  # refused before the first step


def test_sample_every_needs_a_prompts_file(meta, tmp_path, capsys):
    assert run(meta, tmp_path / "run", "--train.sample_every=2", "--train.sample_prompts=") == 2
    assert "train.sample_every=2 needs train.sample_prompts" in capsys.readouterr().err


def test_tokenizer_writes_heldout_reconstructions(meta, tmp_path):
    out = tmp_path / "tok"
    argv = ["debug", f"--data.meta={meta}", f"--train.out_dir={out}", "--train.progress=false"]
    assert tok_train.main([*argv, "--train.steps=2", "--train.eval_every=0", "--train.ckpt_every=0",
                           "--train.sample_every=1"]) == 0  # fmt: skip
    for step in (1, 2):
        files = sorted((out / "samples" / f"step_{step:07d}").iterdir())
        assert [p.name for p in files] == ["0000_heldout.mp4", "0001_heldout.mp4"]
        info = probe(files[0])
        assert (info.num_frames, info.height, info.width) == (8, 64, 128)  # clip | reconstruction
    events = image_events(out)
    assert sorted(events) == ["samples/0000_heldout", "samples/0001_heldout"]
    assert [e.step for e in events["samples/0000_heldout"]] == [1, 2]
