"""Control-adapter fine-tuning (`finetune_control_debug`): edge controls made from the sample data, a short run on
a frozen debug base, the held-out flow loss with the control below the one with zeroed control tokens, the base
untouched, only the adapter optimized and checkpointed, the first step the base's, and sampling with `--control`."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from harness import assert_same_after, kill_and_resume
from safetensors.torch import load_file

from cinedit.configs import PRESETS, ConfigError
from cinedit.configs.generator import CONTROL_KINDS, ControlConfig, GeneratorModelConfig, text_encoder
from cinedit.data import control as data_control
from cinedit.data.dataset import VideoDataset
from cinedit.data.meta import read_meta, write_meta
from cinedit.data.video import read_video
from cinedit.generator import generate as gen
from cinedit.generator import train as train_mod
from cinedit.generator.control import (
    ControlAdapter,
    ControlAdapterConfig,
    save_adapter,
    unused_parameters,
    with_control,
)
from cinedit.generator.loading import load_pretrained
from cinedit.generator.math import make_ids, make_txt_ids
from cinedit.generator.model import MMDiT
from cinedit.generator.pipeline import SamplerConfig, save_pipeline
from cinedit.runtime.checkpoint import latest_checkpoint
from cinedit.runtime.logs import read_metrics
from cinedit.tokenizer.loading import load_tokenizer

BUCKETS = '{"64px": {"8": [1.0, 2]}}'  # one bucket shape: cheap steps
STEPS = 8
HELD_OUT = ("door_panel", "parked_bicycle")  # two 272x640 clips (a bucket of their own aspect, one eval batch)


def small_size(h: int, w: int) -> tuple[int, int]:
    """The clip's size divided by the largest factor that keeps both sides even and the aspect exact, so the
    control (made quickly at this size) maps onto the clip's crop exactly."""
    k = next(k for k in range(max(1, h // 64), 0, -1) if not (h % k or w % k or (h // k) % 2 or (w // k) % 2))
    return h // k, w // k


@pytest.fixture(scope="module")
def metas(sample_data, tmp_path_factory) -> tuple[Path, Path]:
    """(train meta, held-out meta) of the sample clips with a `control_edges` column (`data.control`'s API)."""
    root = tmp_path_factory.mktemp("control_data")
    df = read_meta(sample_data[1])
    df = df[df["num_frames"] > 1].reset_index(drop=True)
    paths = []
    for src, h, w in zip(df["path"], df["height"], df["width"]):
        dst = root / "edges" / f"{Path(src).stem}.mp4"
        dst.parent.mkdir(exist_ok=True)
        data_control.make_control(src, dst, data_control.ControlOptions("edges"), size=small_size(h, w))
        paths.append(str(dst))
    df["control_edges"] = paths
    held = df["path"].map(lambda p: Path(p).stem in HELD_OUT)
    return write_meta(df[~held], root / "train.csv"), write_meta(df[held], root / "held.csv")


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    config = train_mod.model_config(GeneratorModelConfig(preset="debug"), 16, 384, 384)
    path = tmp_path_factory.mktemp("control_base") / "model"
    save_pipeline(path, MMDiT(config), load_tokenizer("debug"), text_encoder("debug"), SamplerConfig(num_steps=2))
    return path


def argv(meta: Path, base: Path, out: Path, *extra: str) -> list[str]:
    return [
        "finetune_control_debug",
        f"--data.meta={meta}",
        f"--model.init_from={base}",
        f"--train.out_dir={out}",
        f"--data.buckets.table={BUCKETS}",
        "--train.progress=false",
        "--train.log_every=1",
        *extra,
    ]


@pytest.fixture(scope="module")
def run(metas, base, tmp_path_factory) -> dict:
    """A finished control run with a held-out evaluation at steps 0 and STEPS; what the trainer held at export."""
    train, held = metas
    out = tmp_path_factory.mktemp("control_run") / "run"
    seen: dict = {"out": out}
    real_export = train_mod.export

    def export(tr, out_dir):
        seen["backbone"] = {k: v.detach().clone() for k, v in tr.module.model.state_dict().items()}
        seen["optimized"] = {id(p) for g in tr.optimizer.param_groups for p in g["params"]}
        seen["adapter"] = {n: id(p) for n, p in tr.module.adapter.named_parameters()}
        return real_export(tr, out_dir)

    extra = (f"--train.steps={STEPS}", f"--train.eval_every={STEPS}", f"--control.eval_meta={held}",
             "--train.eval_batches=1", "--parallel.plugin=torch", "--train.ckpt_every=0")  # fmt: skip
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_mod, "export", export)
        assert train_mod.main(argv(train, base, out, *extra)) == 0
    return seen


# ----------------------------------------------------------------------------------------------------------------------


def test_configs() -> None:
    assert CONTROL_KINDS == data_control.KINDS
    cfg = PRESETS["generator"]["finetune_control_debug"]()
    assert cfg.control.enabled and cfg.control.columns() == ["control_edges"] and not cfg.ema.enabled
    big = PRESETS["generator"]["finetune_control_256px"]()
    assert big.control.enabled and big.model.preset == "11b-dcae" and len(big.control.hint_blocks) == 8
    assert ControlConfig(kind="edges,flow").columns() == ["control_edges", "control_flow"]
    for bad in (dict(kind="normals"), dict(kind="edges,edges"), dict(kind="edges,flow", column="a"),
                dict(num_blocks=2, hint_blocks=[0]), dict(scale=-1.0)):  # fmt: skip
        with pytest.raises(ConfigError):
            ControlConfig(**bad).validate()
    cfg.ema.enabled = True
    with pytest.raises(ConfigError, match="EMA"):
        cfg.validate()


def test_missing_control_column_names_the_command(sample_data) -> None:
    with pytest.raises(ConfigError, match="cinedit data control .* --kind edges --out DIR"):
        VideoDataset(sample_data[1], controls=["control_edges"])


def test_control_frames_follow_the_clip(metas) -> None:
    """The control is read with the clip's temporal crop and spatial crop: its edges sit on the clip's edges."""
    train, _ = metas
    ds = VideoDataset(train, controls=["control_edges"])
    item = ds[(0, 8, 64, 64, 123)]
    control, video = item["control"], item["video"]
    assert control.shape == (1, *video.shape)
    # The edge map of the frames read equals the control frames read (up to resize and codec blur).
    frames = data_control.to_uint8(video)
    expect = data_control.edges(frames).astype(np.float32) / 255
    got = (control[0].permute(1, 2, 3, 0).numpy() + 1) / 2
    other = (ds[(0, 8, 64, 64, 7)]["control"][0].permute(1, 2, 3, 0).numpy() + 1) / 2  # another temporal crop
    corr = lambda a, b: np.corrcoef(a.mean(-1).ravel(), b.mean(-1).ravel())[0, 1]
    assert corr(got, expect) > 0.3 and corr(got, expect) > corr(other, expect), (corr(got, expect), corr(other, expect))


def test_unused_parameters_are_the_ones_without_gradient(base) -> None:
    model = load_pretrained(base / "generator")
    adapter = ControlAdapter.from_backbone(model, ControlAdapterConfig(num_blocks=2))
    for proj in adapter.hint_out:  # non-zero hints, so every used parameter gets a non-None gradient
        torch.nn.init.normal_(proj.weight, std=0.01)
    cfg, g = model.config, torch.Generator().manual_seed(0)
    x = dict(img=torch.randn(1, 8, cfg.in_channels, generator=g), img_ids=make_ids(2, 2, 2, batch=1),
             txt=torch.randn(1, 3, cfg.context_in_dim, generator=g), txt_ids=make_txt_ids(1, 3),
             timesteps=torch.rand(1, generator=g), vec=torch.randn(1, cfg.vec_in_dim, generator=g))  # fmt: skip
    with with_control(model, adapter, torch.randn(1, 8, cfg.in_channels, generator=g)):
        model(**x).square().mean().backward()
    assert sorted(n for n, p in adapter.named_parameters() if p.grad is None) == sorted(unused_parameters(adapter))


def test_control_lowers_the_held_out_loss(run) -> None:
    evals = {r["step"]: r for r in read_metrics(run["out"]) if "eval/loss_zero_control" in r}
    assert sorted(evals) == [0, STEPS]
    # Zero-initialised hints: at step 0 the control changes nothing.
    assert evals[0]["eval/loss_control"] == evals[0]["eval/loss_zero_control"]
    after = evals[STEPS]
    assert after["eval/loss_control"] < after["eval/loss_zero_control"], after
    assert after["eval/loss_control"] < evals[0]["eval/loss_control"]


def test_only_the_adapter_trains_and_checkpoints(run, base) -> None:
    backbone = load_pretrained(base / "generator")
    original = backbone.state_dict()
    assert run["backbone"].keys() == original.keys()
    assert all(torch.equal(run["backbone"][k], original[k]) for k in original), "the frozen base changed"
    unused = unused_parameters(ControlAdapter(ControlAdapterConfig(num_blocks=2), backbone.config))
    assert unused and set(unused) < set(run["adapter"])
    trainable = {i for n, i in run["adapter"].items() if n not in unused}
    assert run["optimized"] == trainable
    ckpt = latest_checkpoint(run["out"])
    keys = {k for f in ckpt.rglob("model*.safetensors") for k in load_file(str(f))}
    assert keys and all(k.startswith("adapter.") for k in keys), sorted(keys)[:5]
    exported = run["out"] / "model" / train_mod.CONTROL_ADAPTER_DIR
    assert (exported / "config.json").is_file() and (exported / "model.safetensors").is_file()
    assert not (run["out"] / "model" / "generator").exists()


def test_first_step_is_the_base(run, metas, base, tmp_path) -> None:
    """The same first batch, timesteps and noise through the plain base (control off) give the same loss."""
    out = tmp_path / "plain"
    assert train_mod.main(argv(metas[0], base, out, "--control.enabled=false", "--train.steps=1",
                               "--train.eval_every=0", "--parallel.plugin=torch")) == 0  # fmt: skip
    plain = {r["step"]: r["loss"] for r in read_metrics(out) if "loss" in r}
    controlled = {r["step"]: r["loss"] for r in read_metrics(run["out"]) if "loss" in r}
    assert plain[1] == controlled[1]


def test_control_resume_after_a_kill_continues_exactly(metas, base, tmp_path) -> None:
    """Only the adapter is checkpointed; the frozen base is rebuilt from `model.init_from` on resume."""
    common = ("--train.steps=4", "--train.eval_every=0", "--parallel.plugin=torch")
    r = kill_and_resume(
        train_mod, lambda out, *extra: argv(metas[0], base, out, *extra), tmp_path, common, 3, 2, "loss"
    )
    assert r.resumed_from == 2 and r.logged_before_kill == [1, 2]
    assert_same_after(r.full, r.killed, ("loss", "grad_norm"), step=2)
    a, b = (
        load_file(str(p / "model" / train_mod.CONTROL_ADAPTER_DIR / "model.safetensors")) for p in (r.full, r.killed)
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_control_needs_a_base(metas, tmp_path) -> None:
    assert train_mod.main(argv(metas[0], Path(""), tmp_path / "x", "--model.init_from=")) == 2


# ----------------------------------------------------------------------------------------------------------------------
# sampling


def sample(ckpt: Path, out: Path, *extra: str) -> np.ndarray:
    parser = argparse.ArgumentParser()
    gen.add_cli(parser.add_subparsers(required=True))
    args = parser.parse_args(
        [
            "sample",
            "--prompt",
            "a bicycle",
            "--ckpt",
            str(ckpt),
            "--out",
            str(out),
            "--num-frames",
            "8",
            "--size",
            "64",
            "64",
            "--steps",
            "2",
            "--device",
            "cpu",
            "--quiet",
            *extra,
        ]  # fmt: skip
    )
    assert args.func(args) == 0
    (mp4,) = out.glob("*.mp4")
    return read_video(mp4).numpy()


def test_sample_with_control(run, metas, base, tmp_path) -> None:
    control = read_meta(metas[1])["control_edges"].iloc[0]
    plain = sample(base, tmp_path / "plain")
    init = save_adapter(
        ControlAdapter.from_backbone(load_pretrained(base / "generator"), ControlAdapterConfig()), tmp_path / "init"
    )
    flags = ("--control", control, "--control-kind", "edges")
    assert np.array_equal(sample(base, tmp_path / "zero", *flags, "--control-adapter", str(init)), plain)
    # A trained adapter changes the sample; `<ckpt>/control_adapter` is the default adapter.
    ckpt = tmp_path / "ckpt"
    shutil.copytree(base, ckpt)
    shutil.copytree(run["out"] / "model" / train_mod.CONTROL_ADAPTER_DIR, ckpt / "control_adapter")
    controlled = sample(ckpt, tmp_path / "trained", *flags)
    assert np.abs(controlled - plain).max() > 0
    # Errors: no adapter to find, a kind the adapter was not trained on.
    parser = argparse.ArgumentParser()
    gen.add_cli(parser.add_subparsers(required=True))
    common = ["sample", "--prompt", "x", "--out", str(tmp_path / "e"), "--num-frames", "8", "--size", "64", "64"]
    args = parser.parse_args([*common, "--ckpt", str(base), *flags, "--device", "cpu"])
    assert args.func(args) == 2
    args = parser.parse_args([*common, "--ckpt", str(ckpt), "--control", control, "--control-kind", "flow"])
    assert args.func(args) == 2
