"""The shared floor: one atomic writer, one device choice, one PSNR, config validation after overrides, saved
configs of older runs, and the preset tables in step with the models."""

from __future__ import annotations

import errno
import json
import pickle
import random
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from cinedit.cli import main
from cinedit.configs import PRESETS, ConfigError, load_config, resolve, to_dict
from cinedit.configs.generator import MMDIT_PRESETS, TEXT_ENCODERS, GeneratorTrainConfig
from cinedit.configs.tokenizer import DCAE_PRESETS, LPIPS_NETS
from cinedit.data import index as data_index
from cinedit.generator import model as mmdit
from cinedit.generator import text
from cinedit.runtime.checkpoint import save_checkpoint
from cinedit.runtime.dist import DistInfo, resolve_device
from cinedit.runtime.files import atomic_path, write_json, write_text
from cinedit.runtime.logs import MetricsLogger, read_metrics
from cinedit.runtime.rng import load_rng_state, rng_state, save_rng_state, seed_everything, set_rng_state
from cinedit.tokenizer import lpips as lpips_mod
from cinedit.tokenizer import model as dcae
from cinedit.tokenizer import train as tokenizer_train
from cinedit.tokenizer.metrics import psnr


def test_atomic_path_replaces_on_success_and_keeps_the_old_file_on_error(tmp_path):
    path = tmp_path / "sub" / "frame.png"
    write_text(path, "old")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_path(path) as tmp:
            assert tmp.parent == path.parent and tmp.suffix == ".png" and tmp != path
            tmp.write_text("half")
            raise RuntimeError("disk full")
    assert path.read_text() == "old" and sorted(p.name for p in path.parent.iterdir()) == ["frame.png"]
    with atomic_path(path) as tmp:
        tmp.write_text("new")
    assert path.read_text() == "new" and sorted(p.name for p in path.parent.iterdir()) == ["frame.png"]


def test_json_writes_inf_as_a_string(tmp_path):
    write_json(tmp_path / "r.json", {"psnr": float("inf"), "rows": [float("-inf"), 1.5], "bad": float("nan")})
    doc = json.loads((tmp_path / "r.json").read_text())  # strict JSON: no Infinity / NaN tokens
    assert doc == {"psnr": "inf", "rows": ["-inf", 1.5], "bad": "nan"}
    log = MetricsLogger(tmp_path, tensorboard=False)
    log.log(3, {"val/psnr": float("inf")})
    assert "Infinity" not in (tmp_path / "metrics.jsonl").read_text()
    assert read_metrics(tmp_path) == [{"step": 3, "val/psnr": "inf"}]


def test_one_device_choice():
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="torch device"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            resolve_device("cuda")


def test_tokenizer_validation_psnr_is_the_eval_psnr():
    # A perfect reconstruction is inf in `val/psnr`, as `cinedit eval recon` reports it (they were two formulas).
    clip = torch.rand(3, 4, 32, 32) * 2 - 1
    tr = SimpleNamespace(
        ema=SimpleNamespace(module=nn.Identity()),
        info=SimpleNamespace(device=torch.device("cpu")),
        cfg=SimpleNamespace(data=SimpleNamespace(eval_batch=2), parallel=SimpleNamespace(precision="fp32")),
        data=SimpleNamespace(heldout=[clip, clip]),
    )
    metrics, _ = tokenizer_train.evaluate(tr)
    assert metrics["val/l1"] == 0 and metrics["val/psnr"] == float("inf")
    noisy = (clip + 0.1 * torch.randn_like(clip)).clamp(-1, 1)
    tr.ema.module = lambda x: noisy[None].expand_as(x)
    metrics, _ = tokenizer_train.evaluate(tr)
    assert metrics["val/psnr"] == pytest.approx(float(psnr(noisy[None], clip[None])), abs=1e-5)


@pytest.mark.parametrize(
    "kind, override, match",
    [
        ("generator", "--parallel.zero_stage=3", "zero_stage must be 1 or 2"),
        ("generator", "--sample.num_steps=0", "num_steps must be at least 1"),
        ("generator", "--text.dtype=fp8", "dtype must be one of"),
        ("generator", "--model.preset=huge", "model.preset must be one of"),
        ("tokenizer", "--loss.lpips.net=squeeze", "net must be one of"),
        ("tokenizer", "--parallel.plugin=zero3", "plugin must be one of"),
    ],
)
def test_every_section_is_validated_after_overrides(kind, override, match):
    # These sections used to check themselves only at construction, which an override (setattr) skips.
    with pytest.raises(ConfigError, match=match):
        resolve(kind, "debug", [override])


def test_configs_saved_by_older_runs_still_load(tmp_path):
    cfg = PRESETS["generator"]["debug"]()
    doc = {"_type": "cinedit.generator.train.GeneratorTrainConfig", "_preset": "debug", **to_dict(cfg)}
    (tmp_path / "config.json").write_text(json.dumps(doc))
    loaded = load_config(tmp_path)
    assert isinstance(loaded, GeneratorTrainConfig) and loaded == cfg
    doc["_type"] = "some_plugin.evil.Config"  # a config file never makes cinedit import a module
    (tmp_path / "config.json").write_text(json.dumps(doc))
    with pytest.raises(ConfigError, match="not a cinedit run config"):
        load_config(tmp_path)


def test_config_preset_names_match_the_models():
    assert set(MMDIT_PRESETS) == set(mmdit.PRESETS)
    assert set(DCAE_PRESETS) == set(dcae.PRESETS)
    assert set(LPIPS_NETS) == set(lpips_mod.NETS)
    assert text.PRESETS is TEXT_ENCODERS


def test_trainers_are_built_with_keywords():
    with pytest.raises(TypeError):
        tokenizer_train.Trainer(None, None, None, None, None, None, None, None)


class _Boom:
    """A pickle that runs code when loaded: what a crafted checkpoint file would hold."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_rng_states_round_trip_without_pickle_and_a_crafted_file_runs_nothing(tmp_path):
    seed_everything(3)
    state = rng_state()
    expected = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    save_rng_state(state, tmp_path / "rank-00000.safetensors")
    seed_everything(99)
    set_rng_state(load_rng_state(tmp_path / "rank-00000.safetensors"))
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == expected
    # Checkpoints written before kept a pickled .pt: read through the weights-only loader.
    torch.save(state, tmp_path / "legacy.pt")
    set_rng_state(load_rng_state(tmp_path / "legacy.pt"))
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == expected
    marker = tmp_path / "code_ran"
    torch.save({"torch": _Boom(marker)}, tmp_path / "crafted.pt")
    with pytest.raises(pickle.UnpicklingError):
        load_rng_state(tmp_path / "crafted.pt")
    assert not marker.exists()


def test_a_full_disk_is_one_line_and_exit_1(tmp_path, monkeypatch, capsys):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "out" / "meta.csv"))

    monkeypatch.setattr(data_index, "write_meta", full)
    (tmp_path / "clips").mkdir()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "clips" / "a.png")
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "clips" / "b.png")
    argv = ["data", "index", str(tmp_path / "clips"), "--out", str(tmp_path / "out" / "meta.csv"), "--quiet"]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err.endswith("Earlier outputs are intact.") and "No space left on device" in err and "MiB free" in err
    assert "Traceback" not in err and len(err.splitlines()) == 1


def test_a_failed_checkpoint_write_leaves_no_temporary_folder(tmp_path):
    info = DistInfo(0, 1, 0, torch.device("cpu"))

    def full(path):
        (path / "half.bin").write_bytes(b"x")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError):
        save_checkpoint(tmp_path, 3, full, info)
    assert list((tmp_path / "ckpt").iterdir()) == []
