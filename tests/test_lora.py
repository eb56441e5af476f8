"""LoRA (`cinedit.generator.lora`): training on a frozen debug base, the exported adapter file, reloading, scales,
merging, sampling with `--lora`, `merge-lora`, exact resume, and ZeRO-2 x cp 2 against one process."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import test_scaleout as scaleout  # its workers; imported as a module so pytest does not collect its tests here
import torch
from distributed import run_workers
from harness import assert_same_after, kill_and_resume
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from cinedit.cli import group_main
from cinedit.configs import PRESETS, ConfigError
from cinedit.configs.generator import LORA_DOUBLE_TARGETS, LORA_SINGLE_TARGETS, GeneratorModelConfig, text_encoder
from cinedit.generator import generate as gen
from cinedit.generator import lora
from cinedit.generator import train as train_mod
from cinedit.generator.loading import load_pretrained
from cinedit.generator.math import make_ids, make_txt_ids
from cinedit.generator.model import MMDiT
from cinedit.generator.pipeline import SamplerConfig, save_pipeline
from cinedit.runtime.checkpoint import latest_checkpoint
from cinedit.runtime.logs import read_metrics
from cinedit.tokenizer.loading import load_tokenizer

BUCKETS = '{"64px": {"8": [1.0, 2]}}'  # one bucket shape: cheap steps, every rank's batch the same shape
STEPS = 3


def argv(meta: Path, base: Path, out: Path, *extra: str) -> list[str]:
    return [
        "lora_debug",
        f"--data.meta={meta}",
        f"--model.init_from={base}",
        f"--train.out_dir={out}",
        f"--data.buckets.table={BUCKETS}",
        "--train.progress=false",
        "--train.eval_every=0",
        "--train.sample_every=0",
        "--train.log_every=1",
        *extra,
    ]


def losses(out: Path, key: str = "loss") -> dict[int, float]:
    return {r["step"]: r[key] for r in read_metrics(out) if key in r}


def inputs(model: MMDiT, seed: int = 0) -> dict[str, torch.Tensor]:
    cfg, g = model.config, torch.Generator().manual_seed(seed)
    return {
        "img": torch.randn(2, 8, cfg.in_channels, generator=g),
        "img_ids": make_ids(2, 2, 2, batch=2),
        "txt": torch.randn(2, 3, cfg.context_in_dim, generator=g),
        "txt_ids": make_txt_ids(2, 3),
        "timesteps": torch.rand(2, generator=g),
        "vec": torch.randn(2, cfg.vec_in_dim, generator=g),
    }


@torch.no_grad()
def predict(model: MMDiT) -> torch.Tensor:
    return model.eval()(**inputs(model))


@pytest.fixture(scope="module")
def meta(sample_data) -> Path:
    return sample_data[1]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A random debug pipeline (generator of the `debug` preset's widths, the debug tokenizer and text encoder)."""
    torch.manual_seed(0)
    config = train_mod.model_config(GeneratorModelConfig(preset="debug"), 16, 384, 384)
    path = tmp_path_factory.mktemp("lora_base") / "model"
    save_pipeline(path, MMDiT(config), load_tokenizer("debug"), text_encoder("debug"), SamplerConfig(num_steps=2))
    return path


@pytest.fixture(scope="module")
def run(meta, base, tmp_path_factory) -> dict:
    """A finished 3-step LoRA run; with the trained model's state and what its optimizer held, taken at export."""
    out = tmp_path_factory.mktemp("lora_run") / "run"
    seen: dict = {"out": out}
    real_export = train_mod.export

    def export(tr, out_dir):
        seen["state"] = {k: v.detach().clone() for k, v in tr.module.state_dict().items()}
        seen["optimized"] = {id(p) for g in tr.optimizer.param_groups for p in g["params"]}
        seen["trainable"] = {id(p) for p in tr.module.parameters() if p.requires_grad}
        seen["lora_ids"] = {id(p) for n, p in tr.module.named_parameters() if ".lora_" in n}
        return real_export(tr, out_dir)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_mod, "export", export)
        assert train_mod.main(argv(meta, base, out, f"--train.steps={STEPS}", "--parallel.plugin=torch")) == 0
    return seen


def trained_model(run: dict, base: Path) -> MMDiT:
    model = load_pretrained(base / "generator")
    lora.apply_lora(model, PRESETS["generator"]["lora_debug"]().lora)
    model.load_state_dict(run["state"])
    return model


# ----------------------------------------------------------------------------------------------------------------------


def test_config_targets_are_the_model_layers_and_validate():
    """The default targets name real linear layers of the MMDiT's blocks; bad values fail with the field's name."""
    model = MMDiT(train_mod.model_config(GeneratorModelConfig(preset="debug"), 16, 384, 384))
    linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert {f"double_blocks.0.{t}" for t in LORA_DOUBLE_TARGETS} <= linears
    assert {f"single_blocks.1.{t}" for t in LORA_SINGLE_TARGETS} <= linears
    cfg = PRESETS["generator"]["lora_debug"]().lora
    lora.apply_lora(model, cfg)
    adapted = {n.rsplit(".lora_A", 1)[0] for n in lora.lora_parameters(model) if ".lora_A." in n}
    assert len(adapted) == 2 * len(LORA_DOUBLE_TARGETS) + 2 * len(LORA_SINGLE_TARGETS)
    assert not any("_mod" in n or "modulation" in n for n in adapted)
    with_mod = MMDiT(model.config)
    lora.apply_lora(with_mod, type(cfg)(enabled=True, rank=2, modulation=True))
    names = set(lora.lora_parameters(with_mod))
    for layer in ("double_blocks.1.txt_mod.lin", "single_blocks.0.modulation.lin", "final_layer.adaLN_modulation.1"):
        assert f"{layer}.lora_A.default.weight" in names
    for bad, match in (("rank=0", "lora.rank"), ('double_targets=["img_attn.qkv"]', "unknown layers")):
        with pytest.raises(ConfigError, match=match):
            field, value = bad.split("=")
            kwargs = {field: json.loads(value) if value.startswith("[") else int(value)}
            type(cfg)(enabled=True, **kwargs).validate()
    ema = PRESETS["generator"]["lora_debug"]()
    ema.ema.enabled = True
    with pytest.raises(ConfigError, match="no EMA"):
        ema.validate()


def test_training_changes_only_the_adapters(run, base):
    """After LoRA training every base weight is bit-identical, the adapters moved, and the optimizer and the
    checkpoints hold the adapters alone."""
    assert sorted(losses(run["out"])) == list(range(1, STEPS + 1))
    assert run["optimized"] == run["trainable"] == run["lora_ids"]
    base_state = load_file(str(base / "generator" / "model.safetensors"))
    state = run["state"]
    for key, value in base_state.items():
        module, _, leaf = key.rpartition(".")
        trained = state.get(key, state.get(f"{module}.base_layer.{leaf}"))
        assert trained is not None and torch.equal(trained, value), key
    lora_b = [v for k, v in state.items() if ".lora_B." in k]
    assert lora_b and all(v.abs().max() > 0 for v in lora_b)  # B starts at zero: every adapter learned
    ckpt = latest_checkpoint(run["out"])
    saved = json.loads((ckpt / "model" / "model.index.json").read_text())["weight_map"]
    assert saved and all(".lora_A.default." in k or ".lora_B.default." in k for k in saved)
    assert not (run["out"] / "model" / "pipeline.json").exists()


def test_exported_adapter_is_small_and_reloads_to_the_same_outputs(run, base, tmp_path, capsys):
    path = run["out"] / "model" / lora.LORA_FILE
    ratio = path.stat().st_size / (base / "generator" / "model.safetensors").stat().st_size
    with capsys.disabled():
        print(f"\nLoRA debug adapter: {path.stat().st_size} bytes, {ratio:.3f} of the full generator file")
    assert ratio < 0.2
    with safe_open(str(path), framework="pt") as f:
        keys, config = list(f.keys()), json.loads(f.metadata()["lora_config"])
    assert all(k.startswith("base_model.model.") and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys)
    assert "base_model.model.double_blocks.0.img_attn.q_proj.lora_A.weight" in keys
    assert (config["r"], config["lora_alpha"]) == (4, 4.0)
    assert json.loads((path.parent / lora.ADAPTER_CONFIG).read_text())["r"] == 4

    # The trained model's base is frozen, a loaded adapter leaves the base's flags as they were: on CPU that picks
    # another matmul kernel for strided inputs (differences ~3e-7), so outputs are compared to 1e-6.
    want = predict(trained_model(run, base))
    fresh = load_pretrained(base / "generator")
    plain = predict(fresh)
    assert lora.load_lora(fresh, path) == "lora"
    assert torch.allclose(predict(fresh), want, rtol=0, atol=1e-6) and not torch.allclose(want, plain, atol=1e-3)
    # Scales: 0 is the base exactly; the same adapter twice at 0.5 each adds up to one at 1.
    lora.set_lora_scale(fresh, "lora", 0.0)
    assert torch.equal(predict(fresh), plain)
    lora.set_lora_scale(fresh, "lora", 0.5)
    assert lora.load_lora(fresh, path, scale=0.5) == "lora_2"
    assert torch.allclose(predict(fresh), want, rtol=0, atol=1e-6)
    # Merged: plain linears back (the base's keys), the same outputs.
    merged = lora.merge_lora(fresh)
    assert set(merged.state_dict()) == set(load_file(str(base / "generator" / "model.safetensors")))
    assert torch.allclose(predict(merged), want, atol=1e-5)
    # diffusers' key prefix without any config (rank from the shapes, alpha = rank: lora_debug's alpha 4 / rank 4).
    diffusers = tmp_path / "diffusers_lora.safetensors"
    save_file({"transformer." + k[len("base_model.model.") :]: v for k, v in load_file(str(path)).items()}, diffusers)
    other = load_pretrained(base / "generator")
    lora.load_lora(other, diffusers)
    assert torch.allclose(predict(other), want, rtol=0, atol=1e-6)
    # An adapter for other modules is refused with a message.
    bad = tmp_path / "bad.safetensors"
    save_file({"transformer.blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 64)}, bad)
    with pytest.raises(ValueError, match="another model"):
        lora.load_lora(load_pretrained(base / "generator"), bad)


def sample(ckpt: Path, out: Path, *extra: str) -> np.ndarray:
    parser = argparse.ArgumentParser()
    gen.add_cli(parser.add_subparsers(required=True))
    args = parser.parse_args(
        [
            "sample",
            "--prompt",
            "a fox",
            "--ckpt",
            str(ckpt),
            "--out",
            str(out),
            "--num-frames",
            "1",
            "--size",
            "64",
            "64",
        ]
        + ["--steps", "2", "--device", "cpu", "--quiet", *extra]
    )
    assert args.func(args) == 0
    (png,) = out.glob("*.png")
    return np.asarray(Image.open(png)).astype(np.int16)


def test_sample_with_lora_scale_0_is_the_base_and_scale_1_the_merged_model(run, base, tmp_path):
    # Three debug steps move a sample by ~0.01 of an 8-bit level: B x 100 makes the adapter's effect visible.
    trained = run["out"] / "model" / lora.LORA_FILE
    with safe_open(str(trained), framework="pt") as f:
        metadata = f.metadata()
    adapter = tmp_path / "strong.safetensors"
    state = {k: v * 100 if ".lora_B." in k else v for k, v in load_file(str(trained)).items()}
    save_file(state, str(adapter), metadata=metadata)
    plain = sample(base, tmp_path / "base")
    assert np.array_equal(sample(base, tmp_path / "zero", "--lora", f"{adapter}:0"), plain)
    adapted = sample(base, tmp_path / "one", "--lora", str(adapter))
    merged_dir = tmp_path / "merged"
    assert (
        group_main("generator", ["merge-lora", "--base", str(base), "--lora", str(adapter), "--out", str(merged_dir)])
        == 0
    )
    assert (merged_dir / "pipeline.json").is_file() and (merged_dir / "tokenizer").is_dir()
    merged = sample(merged_dir, tmp_path / "merged_out")
    assert np.abs(merged - adapted).max() <= 1, "merged and adapted differ by more than one 8-bit level"
    # The adapter changes the sample (measured: max 8 levels, mean 1.5; merged vs adapted: max 0).
    assert np.abs(adapted - plain).max() > 4, np.abs(adapted - plain).mean()
    # An existing --out is refused unless --overwrite; a generator folder as base gives a generator folder.
    args = ["merge-lora", "--base", str(base), "--lora", f"{adapter}:0.5", "--out", str(merged_dir)]
    assert group_main("generator", args) == 2
    assert group_main("generator", [*args, "--overwrite"]) == 0
    gen_out = tmp_path / "merged_generator"
    assert group_main("generator", ["merge-lora", "--base", str(base / "generator"), "--lora", str(adapter),
                                    "--out", str(gen_out)]) == 0  # fmt: skip
    assert {p.name for p in gen_out.iterdir()} == {"config.json", "model.safetensors"}
    half = predict(load_pretrained(merged_dir / "generator"))  # replaced by the scale-0.5 merge
    assert not torch.allclose(half, predict(load_pretrained(gen_out)), atol=1e-4)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporary folders left


def test_lora_resume_after_a_kill_continues_exactly(meta, base, tmp_path):
    common = (f"--model.init_from={base}", "--train.steps=4", "--parallel.plugin=torch")
    r = kill_and_resume(train_mod, lambda out, *extra: argv(meta, base, out, *extra), tmp_path, common, 3, 2, "loss")
    assert r.resumed_from == 2 and r.logged_before_kill == [1, 2]
    assert_same_after(r.full, r.killed, ("loss", "grad_norm"), step=2)
    a, b = (load_file(str(p / "model" / lora.LORA_FILE)) for p in (r.full, r.killed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_lora_under_zero2_with_cp2_matches_one_process(meta, base, tmp_path):
    """2 processes, ColossalAI ZeRO-2 (fp32) over the world and the sequence split over both (ring attention): the
    losses, gradient norms and exported adapter of one plain process."""
    common = ("--train.steps=3", "--train.ckpt_every=0")
    one, two = tmp_path / "one", tmp_path / "two"
    assert run_workers(scaleout.train_worker, 1, argv(meta, base, one, *common, "--parallel.plugin=torch"), False) == [
        0
    ]
    zero_cp = ("--parallel.plugin=zero", "--parallel.zero_stage=2", "--parallel.precision=fp32")
    zero_cp += ("--parallel.cp_size=2", "--parallel.cp_mode=ring")
    assert run_workers(scaleout.train_worker, 2, argv(meta, base, two, *common, *zero_cp), True) == [0, 0]
    for key in ("loss", "grad_norm"):
        a, b = losses(one, key), losses(two, key)
        assert sorted(a) == sorted(b) == [1, 2, 3]
        assert all(b[s] == pytest.approx(a[s], rel=1e-5, abs=1e-6) for s in a), (key, a, b)
    a, b = (load_file(str(p / "model" / lora.LORA_FILE)) for p in (one, two))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_commands_have_help_and_import_peft_only_when_used(capsys):
    for argv in (["merge-lora", "--help"], ["sample", "--help"]):
        with pytest.raises(SystemExit) as e:
            group_main("generator", argv)
        assert e.value.code == 0 and "--lora" in capsys.readouterr().out
    code = "import sys, cinedit.generator.train, cinedit.generator.generate; assert 'peft' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0
