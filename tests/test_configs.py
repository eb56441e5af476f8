"""Config machinery: typed overrides, close-match errors, save / reload / re-launch."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Literal

import pytest

from cinedit.configs import (
    PRESETS,
    BucketConfig,
    ConfigError,
    DataConfig,
    apply_overrides,
    describe,
    load_config,
    resolve,
    stage1_buckets,
    to_dict,
)
from cinedit.runtime.files import save_config


@dataclass
class OptimConfig:
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    schedule: Literal["constant", "cosine"] = "constant"


@dataclass
class RunConfig:
    name: str = "x"
    steps: int = 10
    bf16: bool = True
    grad_ckpt: list[int] = field(default_factory=list)
    resume: str | None = None
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)


def tiny_run() -> RunConfig:
    return RunConfig(name="tiny")


PRESETS["test"] = {"test_run": tiny_run}  # a preset table of this test's own kind, registered explicitly


def test_overrides_convert_types():
    cfg = apply_overrides(
        RunConfig(),
        [
            "--steps=20",
            "--bf16=false",
            "--optim.lr",
            "3e-5",
            "--optim.betas=[0.9,0.98]",
            "--optim.schedule=cosine",
            "--grad-ckpt=1,2,3",
            "--resume=none",
            "--data.meta=meta.csv",
            "--data.buckets.tolerance=0.1",
            '--data.buckets.table={"256px": {"1": [1.0, 45], "32": [0.5, 12]}}',
        ],
    )
    assert cfg.steps == 20 and cfg.bf16 is False and cfg.optim.lr == 3e-5
    assert cfg.optim.betas == (0.9, 0.98) and cfg.optim.schedule == "cosine"
    assert cfg.grad_ckpt == [1, 2, 3] and cfg.resume is None
    assert cfg.data.meta == "meta.csv" and cfg.data.buckets.tolerance == 0.1
    assert cfg.data.buckets.table == {"256px": {1: (1.0, 45), 32: (0.5, 12)}}


@pytest.mark.parametrize(
    "arg, expect",
    [
        ("--optim.lrr=1", "optim.lr"),
        ("--optm.lr=1", "optim.lr"),
        ("--tolerance=0.1", "data.buckets.tolerance"),
        ("--data.bucket.tolerance=0.1", "data.buckets.tolerance"),
    ],
)
def test_unknown_field_lists_close_matches(arg, expect):
    with pytest.raises(ConfigError, match="unknown config field") as e:
        apply_overrides(RunConfig(), [arg])
    assert expect in str(e.value)


@pytest.mark.parametrize(
    "arg, match",
    [
        ("--steps=ten", "steps: expected an int"),
        ("--bf16=maybe", "expected a bool"),
        ("--optim.schedule=linear", "not one of"),
        ("--optim.betas=[0.9]", "expected 2 items"),
        ("--steps", "has no value"),
        ("steps=3", "unexpected argument"),
        ('--data.buckets.table={"256px": {"3": [1.0, 4]}}', "multiples of 4"),
        ("--data.buckets.tolerance=1.5", "tolerance"),
        ("--optim=3", "not valid JSON|expected a mapping"),
    ],
)
def test_bad_values_fail_clearly(arg, match):
    with pytest.raises(ConfigError, match=match):
        apply_overrides(RunConfig(), [arg])


def test_save_reload_and_relaunch(tmp_path):
    cfg = resolve("test", "test_run", ["--steps=7", "--optim.betas=[0.8,0.9]"])
    assert cfg.name == "tiny" and cfg.steps == 7
    path = save_config(cfg, tmp_path / "run", preset="test_run")
    doc = json.loads(path.read_text())
    assert doc["_preset"] == "test_run" and doc["steps"] == 7
    assert load_config(tmp_path / "run") == cfg
    # Re-launch from the run directory with a further override.
    again = resolve("test", str(tmp_path / "run"), ["--steps=9"])
    assert again.steps == 9 and again.optim.betas == (0.8, 0.9) and again.name == "tiny"


def test_unknown_preset_and_missing_config(tmp_path):
    with pytest.raises(ConfigError, match="Did you mean: test_run"):
        resolve("test", "test_rn")
    with pytest.raises(ConfigError, match="no config at"):
        load_config(tmp_path)


def test_stage_buckets_valid_and_roundtrip():
    b = stage1_buckets()
    b.validate()
    assert b.table["256px"][1] == (1.0, 45) and b.table["256px"][32] == (1.0, 12) and b.table["256px"][128] == (1.0, 3)
    from cinedit.configs import from_dict

    assert from_dict(BucketConfig, json.loads(json.dumps(to_dict(b)))) == b


def test_describe_lists_every_field():
    text = describe(RunConfig())
    assert "--optim.lr=0.0001" in text and "--data.buckets.tolerance=0.2" in text


def test_config_from_argv(capsys):
    from cinedit.configs import config_from_argv

    cfg, name = config_from_argv("test", ["test_run", "--steps", "4"])
    assert name == "test_run" and cfg.steps == 4
    with pytest.raises(SystemExit) as e:
        config_from_argv("test", ["test_run", "--help-config", "--steps=5"])
    assert e.value.code == 0 and "--steps=5" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="name a test preset"):
        config_from_argv("test", ["--steps=5"])


@pytest.mark.parametrize(
    "kind, override, match",
    [
        ("tokenizer", "--optim.lr=nan", r"optim\.lr must be a positive number, got nan"),
        ("generator", "--optim.lr=0", r"optim\.lr must be a positive number"),
        ("generator", "--optim.betas=[0.9,1.5]", r"optim\.betas\[1\] must be in \[0, 1\)"),
        ("tokenizer", "--disc.lr=-1", r"disc\.lr must be a positive number"),
        ("tokenizer", "--optim.betas=[0.9,abc]", r"optim\.betas\[1\]: expected a float, got 'abc'"),
    ],
)
def test_optimizer_settings_are_checked_before_a_run_starts(kind, override, match):
    # lr=nan used to pass validation and fail inside AdamW after config.json was written; a bad betas element was
    # reported as the first one.
    with pytest.raises(ConfigError, match=match):
        resolve(kind, "debug", [override])
