"""Checkpoint checksums: every checkpoint folder lists its files' SHA-256 in `checksums.json`, and a file whose bytes
changed in place (a flipped bit, its size and header intact) makes the checkpoint damaged: `--train.resume=auto`
falls back to the previous one, an explicit `--train.resume=PATH` is refused. Folders written before the manifest
existed still resume."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from conftest import train_generator_debug as train
from safetensors import safe_open

from cinedit.configs.core import ConfigError
from cinedit.runtime.checkpoint import CHECKSUMS, checkpoint_problem, resume_checkpoint, verify_checkpoint
from cinedit.runtime.logs import read_metrics

SHARD = "model/model-00000-of-00001.safetensors"


@pytest.fixture
def run(debug_generator_run, tmp_path) -> Path:
    """A copy of the session's 4-step run (checkpoints at steps 2 and 4), for this test to damage."""
    out = tmp_path / "run"
    shutil.copytree(debug_generator_run, out)
    return out


def steps_logged(out: Path) -> list[int]:
    return [r["step"] for r in read_metrics(out) if "loss" in r]


def flip_a_byte(path: Path) -> None:
    """Invert one byte in the middle of a file (inside its tensor data): size and header stay intact."""
    with open(path, "r+b") as f:
        f.seek(path.stat().st_size // 2)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0xFF]))


def test_the_manifest_lists_every_file_of_the_checkpoint_with_its_hash(run):
    for ckpt in sorted((run / "ckpt").glob("step-*")):
        doc = json.loads((ckpt / CHECKSUMS).read_text())
        files = {p.relative_to(ckpt).as_posix(): p for p in ckpt.rglob("*") if p.is_file() and p.name != CHECKSUMS}
        assert sorted(doc) == sorted(files)
        assert {SHARD, "state.json", "model/model.index.json", "model/optimizer.index.json"} <= set(doc)
        assert any(f.startswith("model/optimizer-") for f in doc) and any(f.startswith("rng/rank-") for f in doc)
        for name, path in files.items():
            assert doc[name] == {"sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "bytes": path.stat().st_size}
        assert checkpoint_problem(ckpt) is None


def test_a_flipped_byte_in_the_latest_checkpoint_falls_back_to_the_previous_one(run, sample_data, capsys):
    shard = run / "ckpt" / "step-000004" / SHARD
    flip_a_byte(shard)
    with safe_open(str(shard), framework="pt") as f:  # the header still reads: only the checksum tells
        assert list(f.keys())
    problem = checkpoint_problem(shard.parents[1])
    assert problem == f"{SHARD}: checksum mismatch (the file changed after it was written)"
    capsys.readouterr()
    assert train(run, sample_data[1], 6, "--train.resume=auto") == 0
    err = capsys.readouterr().err
    assert f"step-000004 is damaged ({problem}); resuming from step-000002 instead" in err
    assert steps_logged(run) == [1, 2, 3, 4, 5, 6]  # steps 3, 4 trained again, once each in the log
    assert checkpoint_problem(run / "ckpt" / "step-000004") is None  # saved again, whole


def test_an_explicit_resume_of_a_corrupted_checkpoint_is_refused(run, sample_data, capsys):
    ckpt = run / "ckpt" / "step-000004"
    flip_a_byte(ckpt / SHARD)
    capsys.readouterr()
    assert train(run, sample_data[1], 6, f"--train.resume={ckpt}") == 2
    err = capsys.readouterr().err
    assert f"{ckpt} is damaged: {SHARD}: checksum mismatch" in err and "Traceback" not in err
    assert steps_logged(run) == [1, 2, 3, 4]
    # Loading it directly (what the trainers' `load` runs) is refused too, pointing at the previous checkpoint.
    with pytest.raises(ConfigError, match=f"{SHARD}: checksum mismatch.*previous checkpoint .*step-000002"):
        verify_checkpoint(ckpt)


def test_a_changed_size_or_a_missing_listed_file_is_damage(run):
    ckpt = run / "ckpt" / "step-000004"
    state = ckpt / "state.json"
    state.write_text(state.read_text() + "\n")  # still valid JSON
    assert checkpoint_problem(ckpt).startswith("state.json: size mismatch")
    ckpt = run / "ckpt" / "step-000002"
    doc = json.loads((ckpt / CHECKSUMS).read_text())
    (ckpt / CHECKSUMS).write_text(json.dumps({**doc, "notes.txt": {"sha256": "0" * 64, "bytes": 1}}))
    assert checkpoint_problem(ckpt) == f"notes.txt: missing ({CHECKSUMS} lists it)"
    (ckpt / CHECKSUMS).write_text("{")
    assert checkpoint_problem(ckpt).startswith(f"{CHECKSUMS} is unreadable")


def test_a_checkpoint_written_before_the_manifest_still_resumes(run, sample_data, capsys):
    for ckpt in (run / "ckpt").glob("step-*"):
        (ckpt / CHECKSUMS).unlink()  # it was there: written by every save
    assert resume_checkpoint(run) == (run / "ckpt" / "step-000004", [])
    capsys.readouterr()
    assert train(run, sample_data[1], 6, "--train.resume=auto") == 0
    assert "damaged" not in capsys.readouterr().err
    assert steps_logged(run) == [1, 2, 3, 4, 5, 6]
    assert (run / "ckpt" / "step-000006" / CHECKSUMS).is_file()
