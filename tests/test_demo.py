"""`cinedit demo` runs the whole pipeline end to end, resumes what was interrupted, and never silently redoes a run."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path
from typing import Any

import av
import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from cinedit.cli import main
from cinedit.configs.data import BucketConfig
from cinedit.data.sampler import BucketBatchSampler, build_dataloader
from cinedit.demo import run as demo_run
from cinedit.demo.plan import (
    MAX_TOKENIZER_STEPS,
    MIN_STEPS,
    TOKENIZER_CALIBRATION_DISC,
    TOKENIZER_CALIBRATION_IMAGE_SHARE,
    TOKENIZER_CALIBRATION_SEED,
    TOKENIZER_CALIBRATION_STEPS,
    TOKENIZER_CALIBRATION_WARMUP,
    TRAINED,
    Plan,
    adversarial_start,
    derive_steps,
    every,
    run_seconds,
    tokenizer_step_cost,
    torch_threads,
)
from cinedit.demo.report import _image_note
from cinedit.tokenizer.train import image_step

# A 3-second budget: the calibration alone overruns it, so every run gets its minimum steps (the test measures the
# plumbing, calibration included, not the learning).
TINY = ["--minutes", "0.05", "--device", "cpu"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "run"
    assert main(["demo", "--out", str(out), *TINY]) == 0
    return out


# Calibrated costs of the shape a 2-core CPU measures (seconds).
COSTS = {
    "tokenizer": {"setup_s": 4.0, "step_s": 0.6, "eval_s": 2.0, "sample_s": 1.5, "save_s": 0.2},
    "stage1": {"setup_s": 5.0, "step_s": 0.03, "eval_s": 0.3, "sample_s": 1.0, "save_s": 0.3},
    "stage2": {"setup_s": 5.0, "step_s": 0.03, "eval_s": 0.3, "sample_s": 1.0, "save_s": 0.3},
    "stage3": {"setup_s": 6.0, "step_s": 0.05, "eval_s": 0.4, "sample_s": 1.2, "save_s": 0.3},
}


def test_smaller_budget_gives_fewer_steps_that_fit():
    assert every(5, 10) == 1 and every(1000, 10) == 100
    plans = {s: derive_steps(COSTS, s) for s in (30.0, 150.0, 400.0, 2000.0)}
    assert plans[400.0] == derive_steps(COSTS, 400.0)  # pure: no clock, no state
    assert set(plans[30.0]) == set(TRAINED)
    for small, big in ((30.0, 150.0), (150.0, 400.0), (400.0, 2000.0)):
        assert all(plans[small][k] <= plans[big][k] for k in TRAINED), (plans[small], plans[big])
        assert sum(plans[small].values()) < sum(plans[big].values())
    for seconds in (150.0, 400.0, 2000.0):
        assert sum(run_seconds(COSTS[k], plans[seconds][k]) for k in TRAINED) <= seconds
    # Below the overheads: the minimum counts; far above: the tokenizer stops at its cap, the generator gets the rest.
    assert plans[30.0] == {k: MIN_STEPS[k] for k in TRAINED} == derive_steps(COSTS, -5.0)
    assert derive_steps(COSTS, 1e5)["tokenizer"] == MAX_TOKENIZER_STEPS
    # The tokenizer keeps its share of the step time: about 80% at 400 s.
    step_time = {k: plans[400.0][k] * COSTS[k]["step_s"] for k in TRAINED}
    assert 0.74 < step_time["tokenizer"] / sum(step_time.values()) < 0.85


def test_tokenizer_adversarial_phase_is_its_last_tenth():
    # a run under 10 steps has no adversarial step (a tenth of it is under one step)
    assert [adversarial_start(n) for n in (2, 5, 10, 74, 400)] == [3, 6, 10, 68, 361]


def test_tokenizer_step_cost_mixes_kinds_and_phases_after_the_warm_up():
    # Steps 2..11 of a calibration: warm-up to step 3 (first reads: 2.0, 1.5, left out), plain steps 4-6, the
    # adversarial phase from step 7 (its setup: 3.0 s, left out), adversarial steps 8-11. Image steps are cheaper.
    intervals = [2.0, 1.5, 0.5, 0.2, 0.6, 3.0, 1.0, 0.3, 1.2, 0.9]
    images = [False, True, False, True, False, False, False, True, False, False]
    cost = tokenizer_step_cost(intervals, images, 7, image_share=0.25, warmup=3, share=0.1)
    assert cost["plain_video_step_s"] == pytest.approx(0.55) and cost["plain_image_step_s"] == 0.2
    assert cost["adversarial_video_step_s"] == 1.0 and cost["adversarial_image_step_s"] == 0.3
    plain, adversarial = 0.75 * 0.55 + 0.25 * 0.2, 0.75 * 1.0 + 0.25 * 0.3
    assert cost["plain_step_s"] == pytest.approx(plain) and cost["adversarial_step_s"] == pytest.approx(adversarial)
    assert cost["step_s"] == pytest.approx(0.9 * plain + 0.1 * adversarial)
    # No image steps in the real run: the image groups are not needed.
    assert tokenizer_step_cost(intervals, [False] * 10, 7, image_share=0.0, warmup=3)["plain_step_s"] == 0.5
    with pytest.raises(ValueError, match="no timed plain image step"):
        tokenizer_step_cost(intervals, [False] * 10, 7, image_share=0.2, warmup=3)
    with pytest.raises(ValueError, match="no timed adversarial video step"):
        tokenizer_step_cost(intervals[:6], images[:6], 7, image_share=0.2, warmup=3)


def test_tokenizer_calibration_times_both_kinds_in_both_phases():
    # The calibration's own seed and share put video and image steps in both timed groups (the trainer's draw).
    steps = range(2, TOKENIZER_CALIBRATION_STEPS + 1)
    images = [image_step(TOKENIZER_CALIBRATION_SEED, n, TOKENIZER_CALIBRATION_IMAGE_SHARE) for n in steps]
    for lo, hi in ((TOKENIZER_CALIBRATION_WARMUP, TOKENIZER_CALIBRATION_DISC), (TOKENIZER_CALIBRATION_DISC, 10**6)):
        kinds = [im for n, im in zip(steps, images) if lo < n < hi]
        assert 2 <= sum(kinds) <= len(kinds) - 2
    tokenizer_step_cost([1.0] * len(images), images, TOKENIZER_CALIBRATION_DISC, 0.2)  # raises if a group is empty


def test_plan_json_is_written_and_read_back(finished):
    out = finished
    doc = json.loads((out / "plan.json").read_text())
    plan = Plan.read(out / "plan.json")
    assert plan.steps == doc["steps"] and plan.seed == 42 and plan.device == "cpu" and plan.minutes == 0.05
    assert json.loads((out / "demo.json").read_text())["plan"] == plan.identity()
    assert Plan.from_json(json.loads(json.dumps(plan.to_json())), "again") == plan
    # The calibration: every trained run timed, the machine, the budget and what was estimated for it.
    runs = doc["calibration"]["runs"]
    assert set(runs) == set(TRAINED) and all(r["step_s"] > 0 for r in runs.values())
    assert doc["machine"]["cores"] >= 1 and doc["threads"] == doc["machine"]["torch_threads"] >= 1
    assert doc["machine"]["torch_threads"] * (1 + doc["machine"]["data_workers"]) <= max(1, doc["machine"]["cores"])
    assert doc["budget_s"] == 3.0 and doc["estimate_s"]["total"] > 0
    # 3 seconds fit no calibration: every count is its minimum.
    assert doc["steps"] == {**{k: MIN_STEPS[k] for k in TRAINED}, "sample": MIN_STEPS["sample"]}
    report = (out / "report.md").read_text()
    assert "calibrated on this machine" in report and "planned (s)" in report and "calibrated s / step" in report
    assert not (out / "calibration").exists()


def test_plan_file_replays_its_steps_without_calibrating(finished, tmp_path, monkeypatch):
    plan = Plan.read(finished / "plan.json")
    changed = {**plan.to_json(), "steps": {**plan.steps, "stage3": 7, "tokenizer": 5}, "seed": 3, "threads": 1}
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(changed))
    seen = {}

    def fake_run_demo(out, request, given, started, load):
        seen.update(request=request, plan=given)
        return out / "report.md"

    monkeypatch.setattr(demo_run, "run_demo", fake_run_demo)
    monkeypatch.setattr(demo_run, "calibrate_plan", lambda *a: pytest.fail("calibrated despite --plan"))
    assert main(["demo", "--out", str(tmp_path / "run"), "--plan", str(path)]) == 0
    given = seen["plan"]
    assert given.steps == {**plan.steps, "stage3": 7, "tokenizer": 5} and given.seed == 3 and given.threads == 1
    assert seen["request"]["seed"] == 3 and given.source.startswith(f"replayed from {path}")
    # The plan fixes the seed (and device); a contradicting flag is an error, not a silent override.
    assert main(["demo", "--out", str(tmp_path / "run2"), "--plan", str(path), "--seed", "4"]) == 2


def plan_doc(steps=None, **fields) -> str:
    counts = {"tokenizer": 2, "stage1": 2, "stage2": 2, "stage3": 2, "sample": 2, **(steps or {})}
    return json.dumps({"seed": 1, "steps": counts, **fields})


BAD_PLANS = [
    ("{not json", "not JSON"),
    ("[1, 2]", "a plan is a JSON object"),
    ('{"seed": 1}', "missing key(s) steps"),
    ('{"seed": 1, "steps": {"tokenizer": 5}}', "steps lacks stage1, stage2, stage3, sample"),
    (plan_doc({"stage1": "ten"}), "steps.stage1 must be an integer >= 2, got 'ten'"),
    (plan_doc({"tokenizer": 1.5}), "steps.tokenizer must be an integer >= 2, got 1.5"),
    (plan_doc({"stage3": 0}), "steps.stage3 must be an integer >= 2, got 0"),
    (plan_doc({"stage4": 2}), "unknown step count(s) stage4"),
    (plan_doc({"sample": float("nan")}), "steps.sample must be an integer >= 2, got nan"),
    (plan_doc(seed=-1), "seed must be an integer >= 0"),
    (plan_doc(threads=0), "threads must be an integer >= 1"),
    (plan_doc(device="tpu"), "device must be one of auto, cpu, cuda"),
    (plan_doc(minutes="ten"), "minutes must be a positive number"),
]


@pytest.mark.parametrize("content, message", BAD_PLANS, ids=[m.split(" ")[0] for _, m in BAD_PLANS])
def test_bad_plan_file_is_a_clear_error(tmp_path, capsys, content, message):
    path = tmp_path / "plan.json"
    path.write_text(content)
    out = tmp_path / "run"
    assert main(["demo", "--out", str(out), "--plan", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"cinedit demo: error: {path}") and message in err, err
    assert not out.exists()


def test_missing_plan_file_is_a_clear_error(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "run"), "--plan", str(tmp_path / "none.json")]) == 2
    assert "no such plan file" in capsys.readouterr().err


class ThreadsSeen(torch.utils.data.Dataset):
    def __init__(self, meta):
        self.meta = meta

    def __len__(self):
        return len(self.meta)

    def __getitem__(self, item):
        return {"threads": torch.get_num_threads()}


def test_torch_threads_leave_cores_to_workers_and_neighbours():
    assert torch_threads(0, cores=2) == 2 and torch_threads(1, cores=2) == 1 and torch_threads(3, cores=16) == 4
    assert torch_threads(0, cores=2, load=1.7) == 1 and torch_threads(0, cores=8, load=3.2) == 5
    assert torch_threads(0, cores=2, load=9.0) == 1 and torch_threads(0, cores=1) == 1


def test_loader_workers_run_one_torch_thread():
    meta = pd.DataFrame({"path": ["a.png"] * 4, "num_frames": [1] * 4, "height": [64] * 4, "width": [64] * 4})
    meta["fps"] = 0.0
    sampler = BucketBatchSampler(meta, BucketConfig(table={"64px": {1: (1.0, 2)}}))
    loader = build_dataloader(ThreadsSeen(meta), sampler, num_workers=1, collate_fn=lambda items: items)
    assert [item["threads"] for batch in loader for item in batch] == [1, 1, 1, 1]


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
    # The tokenizer trainer's `debug` preset with the demo's model and windows.
    tok = json.loads((out / "tokenizer" / "config.json").read_text())
    assert tok["_preset"] == "debug" and tok["model"]["preset"] == "demo" and tok["data"]["crop_scale"] == 1.5
    assert json.loads((out / "tokenizer_scaled" / "config.json").read_text())["encoder_width_list"][:2] == [4, 8]
    scale = json.loads((out / "tokenizer_scaled" / "config.json").read_text())["scaling_factor"]
    assert scale == pytest.approx(json.loads((out / "tokenizer_scaled" / "latent_stats.json").read_text())["std"])
    recon = json.loads((out / "eval" / "compare.json").read_text())
    assert recon["arithmetic"]["baseline_values"] <= recon["arithmetic"]["latent_values"]


def test_report_states_image_and_video_latent_scales():
    def stats(images, videos):
        return {"images": {"std": images}, "videos": {"std": videos}}

    assert _image_note(stats(0.269, 0.261)) == (
        " Images get latents of std 0.269 and videos 0.261 (ratio 0.97): one scale serves both."
    )
    assert "31x smaller std than videos (804 vs 2.51e+04): one scale cannot fit both" in _image_note(stats(804, 25100))
    assert _image_note({"std": 1.0}) == ""


def test_finished_demo_asks_for_overwrite(finished, capsys):
    assert main(["demo", "--out", str(finished), *TINY]) == 0
    assert "pass --overwrite" in capsys.readouterr().out


def test_interrupted_demo_resumes(finished, capsys):
    out = finished
    before = (out / "samples" / "inpaint").glob("0000_*.mp4").__next__().read_bytes()
    # The last stage killed after its next-to-last checkpoint: no final model yet, nothing after it made.
    last = out / "generator_stage3"
    steps = Plan.read(out / "plan.json").stage_steps["stage3"]
    *_, previous, final = sorted(p.name for p in (last / "ckpt").glob("step-*"))
    assert final == f"step-{steps:06d}"
    model = model_files(last / "model")
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
    assert "calibration:" not in log and "plan: " in log  # the run's own plan.json, never re-calibrated
    assert "reusing the trained generator" in log and f"reusing the cache in {out / 'cache' / 'stage3'}" in log
    assert f"from its checkpoint at step {int(previous[5:])} of {steps}" in log
    assert "reusing " + str(out / "samples" / "t2v") in log
    rows = [json.loads(r) for r in (last / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, steps + 1))
    # Resumed training gives the very same model, and sampling it the same video. Compared as decoded frames: now
    # and then (2 of 5 runs under load after tests/test_mmdit.py, with the very same model files) the mp4 differs
    # by a few levels on some pixels (mean 0.72, max 19 of 255), like write_video's first-encode quirk.
    again = model_files(last / "model")
    assert again.keys() == model.keys()
    for name, value in model.items():
        assert torch.equal(value, again[name]) if isinstance(value, torch.Tensor) else value == again[name], name
    after = frames(next((out / "samples" / "inpaint").glob("0000_*.mp4")))
    first = frames(io.BytesIO(before))
    assert after.shape == first.shape and np.abs(after.astype(int) - first).mean() < 2.0
    assert (out / "report.md").is_file()


def model_files(folder: Path) -> dict[str, Any]:
    """Every tensor of a model folder's safetensors files (by file and name) and the bytes of its other files."""
    out: dict[str, Any] = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = str(path.relative_to(folder))
        if path.suffix == ".safetensors":
            out |= {f"{rel}:{k}": v for k, v in load_file(path).items()}
        else:
            out[rel] = path.read_bytes()
    return out


def frames(source) -> np.ndarray:
    """The decoded RGB frames of an mp4 (a path or a file object), (T, H, W, 3) uint8."""
    with av.open(source) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


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
