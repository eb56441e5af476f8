"""`--train.resume=auto` on a damaged run: a truncated or missing checkpoint file, or a garbled `latest` pointer, falls
back to the newest complete checkpoint with a line saying what is damaged, never silently to step 0."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import train_generator_debug as train

from cinedit.cli import main
from cinedit.runtime.checkpoint import checkpoint_problem, resume_checkpoint
from cinedit.runtime.logs import read_metrics


@pytest.fixture
def run(debug_generator_run, tmp_path) -> Path:
    """A copy of the session's 4-step run (checkpoints at steps 2 and 4), for this test to damage."""
    out = tmp_path / "run"
    shutil.copytree(debug_generator_run, out)
    assert checkpoint_problem(out / "ckpt" / "step-000004") is None
    return out


def steps_logged(out: Path) -> list[int]:
    return [r["step"] for r in read_metrics(out) if "loss" in r]


def test_truncated_latest_checkpoint_falls_back_to_the_previous_one(run, sample_data, capsys):
    shard = run / "ckpt" / "step-000004" / "model" / "model-00000-of-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    assert "model/model-00000-of-00001.safetensors is unreadable" in checkpoint_problem(shard.parents[1])
    capsys.readouterr()
    assert train(run, sample_data[1], 6, "--train.resume=auto") == 0
    err = capsys.readouterr().err
    assert "step-000004 is damaged" in err and "resuming from step-000002" in err
    assert steps_logged(run) == [1, 2, 3, 4, 5, 6]  # steps 3, 4 trained again, once each in the log


def test_garbled_latest_pointer_resumes_from_the_newest_complete_checkpoint(run, sample_data, capsys):
    (run / "ckpt" / "latest").write_text("step-9x9\n")
    assert resume_checkpoint(run)[0] == run / "ckpt" / "step-000004"
    capsys.readouterr()
    assert train(run, sample_data[1], 5, "--train.resume=auto") == 0
    assert "does not name a checkpoint folder" in capsys.readouterr().err
    assert steps_logged(run) == [1, 2, 3, 4, 5]  # not a restart at step 0 over the old log


def test_no_complete_checkpoint_is_an_error_that_deletes_nothing(run, sample_data, capsys):
    for step in ("step-000002", "step-000004"):
        (run / "ckpt" / step / "state.json").write_text("")
    assert train(run, sample_data[1], 6, "--train.resume=auto") == 2
    err = capsys.readouterr().err
    assert "no complete checkpoint" in err and "state.json is missing or unreadable" in err
    assert sorted(p.name for p in (run / "ckpt").glob("step-*")) == ["step-000002", "step-000004"]
    assert steps_logged(run) == [1, 2, 3, 4]


def test_a_copied_run_folder_resumes_into_itself(run, sample_data, tmp_path):
    # Re-launching a copy trained into the original folder (its config.json names it).
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    before = (run / "metrics.jsonl").read_text()
    assert main(["generator", "train", str(copy), "--train.steps=6", "--train.resume=auto"]) == 0
    assert (run / "metrics.jsonl").read_text() == before  # the original is untouched
    assert [r["step"] for r in read_metrics(copy) if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert resume_checkpoint(copy)[0] == copy / "ckpt" / "step-000006"


def test_a_second_run_on_the_same_out_dir_is_refused_and_a_stale_lock_taken_over(run, sample_data, capsys):
    # Two runs on one out_dir both proceeded and interleaved metrics.jsonl.
    lock = run / "run.lock"
    assert not lock.exists()  # released when the run ended
    lock.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": "now"}))
    helper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])  # a live process: the owner
    try:
        lock.write_text(json.dumps({"pid": helper.pid, "host": socket.gethostname(), "started": "now"}))
        assert train(run, sample_data[1], 6, "--train.resume=auto") == 2
        assert f"in use by pid {helper.pid}" in capsys.readouterr().err
        assert steps_logged(run) == [1, 2, 3, 4]
    finally:
        helper.kill()
        helper.wait()
    assert train(run, sample_data[1], 5, "--train.resume=auto") == 0  # its owner is gone: taken over
    assert f"taking over {lock} of pid {helper.pid}" in capsys.readouterr().err
    assert steps_logged(run) == [1, 2, 3, 4, 5] and not lock.exists()
