"""`cinedit demo` runs the whole pipeline end to end, resumes what was interrupted, and never silently redoes a run."""

from __future__ import annotations

import json
import shutil

import pytest

from cinedit.cli import main
from cinedit.demo.plan import STAGES, Plan, every

# The smallest --minutes: every stage runs 2-5 steps, so the test measures the plumbing, not the learning.
TINY = ["--minutes", "0.05", "--device", "cpu"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "run"
    assert main(["demo", "--out", str(out), *TINY]) == 0
    return out


def test_plan_follows_minutes_alone():
    a, b = Plan.make(0.05), Plan.make(0.05)
    assert a == b and a.tokenizer_steps >= 2 and min(a.stage_steps.values()) >= 2
    full = Plan.make()
    assert full.tokenizer_steps > 20 * a.tokenizer_steps and set(full.stage_steps) == set(STAGES)
    assert every(5, 10) == 1 and every(1000, 10) == 100


def test_demo_writes_the_report(finished):
    out = finished
    report = (out / "report.md").read_text()
    for text in ("untrained (step 0)", "baseline", "Equal size", "stage1", "stage3", "temporal flickering", "s / step"):
        assert text in report, text
    for png in ("batches.png", "tokenizer_curves.png", "recon_strips.png", "generator_curves.png", "samples.png"):
        assert (out / png).stat().st_size > 10_000, png
        assert f"]({png})" in report
    videos = sorted((out / "samples").glob("*/0000_*.mp4"))
    assert [p.parent.name for p in videos] == ["i2v", "inpaint", "t2v"]
    assert all(f"]({p.relative_to(out)})" in report for p in videos)
    # The same commands the GPU stages use, resolved from presets and overrides, with the chain's hand-over.
    last = json.loads((out / "generator_stage3" / "config.json").read_text())
    assert last["_preset"] == "debug_stage3" and last["model"]["init_from"] == str(out / "generator_stage2" / "model")
    assert last["flow"]["conditions"]["i2v_head"] == 5.0 and last["data"]["use_cache"] is True
    assert last["tokenizer"]["path"] == str(out / "tokenizer_scaled")
    # Stages 1 and 2 share their buckets, so stage 2 reads stage 1's cache.
    stage2 = json.loads((out / "generator_stage2" / "config.json").read_text())
    assert stage2["data"]["cache_dir"] == str(out / "cache" / "stage1")
    scale = json.loads((out / "tokenizer_scaled" / "config.json").read_text())["scaling_factor"]
    assert scale == pytest.approx(json.loads((out / "tokenizer_scaled" / "latent_stats.json").read_text())["std"])
    recon = json.loads((out / "eval" / "compare.json").read_text())
    assert recon["arithmetic"]["baseline_values"] <= recon["arithmetic"]["latent_values"]


def test_finished_demo_asks_for_overwrite(finished, capsys):
    assert main(["demo", "--out", str(finished), *TINY]) == 0
    assert "pass --overwrite" in capsys.readouterr().out


def test_interrupted_demo_resumes(finished, capsys):
    out = finished
    before = (out / "samples" / "inpaint").glob("0000_*.mp4").__next__().read_bytes()
    # The last stage killed after its next-to-last checkpoint: no final model yet, nothing after it made.
    last = out / "generator_stage3"
    steps = Plan.make(0.05).stage_steps["stage3"]
    *_, previous, final = sorted(p.name for p in (last / "ckpt").glob("step-*"))
    assert final == f"step-{steps:06d}"
    shutil.rmtree(last / "model")
    shutil.rmtree(last / "ckpt" / final)
    (last / "ckpt" / "latest").write_text(previous + "\n")
    shutil.rmtree(out / "samples" / "inpaint")
    (out / "eval" / "flicker.json").unlink()
    (out / "report.md").unlink()
    capsys.readouterr()

    assert main(["demo", "--out", str(out), *TINY]) == 0
    log = capsys.readouterr().out
    assert "reusing the sample data" in log and "reusing the trained tokenizer" in log
    assert "reusing the trained generator" in log and f"reusing the cache in {out / 'cache' / 'stage3'}" in log
    assert f"from its checkpoint at step {int(previous[5:])} of {steps}" in log
    assert "reusing " + str(out / "samples" / "t2v") in log
    rows = [json.loads(r) for r in (last / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, steps + 1))
    # Resumed training and sampling give the very same video.
    assert (out / "samples" / "inpaint").glob("0000_*.mp4").__next__().read_bytes() == before
    assert (out / "report.md").is_file()


def test_demo_refuses_other_settings_and_foreign_folders(finished, tmp_path, capsys):
    (finished / "report.md").rename(finished / "report.md.bak")
    try:
        assert main(["demo", "--out", str(finished), "--minutes", "0.1", "--device", "cpu"]) == 2
        assert "other settings" in capsys.readouterr().err
    finally:
        (finished / "report.md.bak").rename(finished / "report.md")
    (tmp_path / "mine.txt").write_text("keep me")
    assert main(["demo", "--out", str(tmp_path), "--overwrite", *TINY]) == 2
    assert "holds no demo run" in capsys.readouterr().err and (tmp_path / "mine.txt").is_file()
