"""`cinedit eval vbench`: the official aggregation against published leaderboard numbers, temporal flickering,
`score` across a real subprocess boundary (a stand-in `vbench` package), `generate` naming and resuming, `report`."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cinedit.cli import main
from cinedit.data.video import ClipReader, write_video
from cinedit.eval import vbench
from cinedit.eval.vbench_constants import DIM_WEIGHT, NORMALIZE, QUALITY, SEMANTIC

STANDIN = Path(__file__).parent / "data" / "vbench_standin"

# Published VBench(-Long) leaderboard numbers, in %: Total, Quality, Semantic, then the 16 dimensions in this order.
# Transcribed from FlashVideo (arXiv:2502.05179), Table 1, which lists the leaderboard entries of these models.
COLUMNS = (
    "subject_consistency background_consistency temporal_flickering motion_smoothness dynamic_degree "
    "aesthetic_quality imaging_quality object_class multiple_objects human_action color spatial_relationship scene "
    "appearance_style temporal_style overall_consistency"
).split()
PUBLISHED = {
    "CogVideoX-5B": "81.61 82.75 77.04 96.23 96.52 98.66 96.92 70.97 61.98 62.90 85.23 62.11 99.40 82.81 66.35 53.20 "
    "24.91 25.38 27.59",
    "CogVideoX-2B": "81.57 82.51 77.79 96.42 96.53 98.45 97.76 58.33 61.47 65.60 87.81 69.35 97.00 86.87 54.64 57.51 "
    "24.93 25.56 28.01",
    "CogVideoX-1.5": "82.17 82.78 79.76 96.87 97.35 98.88 98.31 50.93 62.79 65.02 87.47 69.65 97.20 87.55 80.25 52.91 "
    "24.89 25.19 27.30",
    "Mochi-1": "80.13 82.64 70.08 96.99 97.28 99.40 99.02 61.85 56.94 60.64 86.51 50.47 94.60 79.73 69.24 36.99 20.33 "
    "23.65 25.15",
    "Vchitect-2.0": "82.24 83.54 77.06 96.83 96.66 98.57 98.98 63.89 60.41 65.35 86.61 68.84 97.20 87.04 57.55 56.57 "
    "23.73 25.01 27.57",
}
# The dimension scores are published to 2 decimals of a percent, so recomputed totals can differ in the last digit.
ROUNDING = 0.015


# Debug-size models: intra-op threads cost more than they save, badly so on a loaded 2-core runner.
pytestmark = pytest.mark.usefixtures("one_thread")


def published(model: str) -> tuple[tuple[float, float, float], dict[str, float]]:
    """((total, quality, semantic) in %, {dimension: fraction})."""
    values = [float(v) for v in PUBLISHED[model].split()]
    return tuple(values[:3]), {d: v / 100 for d, v in zip(COLUMNS, values[3:])}


def test_constants_are_vbenchs():
    assert (
        len(NORMALIZE) == 16 and len(QUALITY) == 7 and len(SEMANTIC) == 9 and set(QUALITY + SEMANTIC) == set(NORMALIZE)
    )
    assert DIM_WEIGHT["dynamic_degree"] == 0.5 and sum(DIM_WEIGHT.values()) == 15.5
    assert NORMALIZE["temporal_flickering"] == (0.6293, 1.0) and NORMALIZE["appearance_style"] == (0.0009, 0.2855)


@pytest.mark.parametrize("model", sorted(PUBLISHED))
def test_aggregation_reproduces_published_totals(model):
    (total, quality, semantic), scores = published(model)
    agg = vbench.aggregate(scores)
    assert 100 * agg["total"] == pytest.approx(total, abs=ROUNDING)
    assert 100 * agg["quality"] == pytest.approx(quality, abs=ROUNDING)
    assert 100 * agg["semantic"] == pytest.approx(semantic, abs=ROUNDING)
    assert agg["missing"] == []


def test_aggregation_accepts_vbench_spellings_and_refuses_unknown_or_percent():
    _, scores = published("CogVideoX-5B")
    spaced = {d.replace("_", " ").title(): s for d, s in scores.items()}
    assert vbench.aggregate(spaced)["total"] == vbench.aggregate(scores)["total"]
    with pytest.raises(vbench.VBenchError, match=r"unknown VBench dimension 'motion_smoothnes'.*motion_smoothness"):
        vbench.aggregate({**scores, "motion_smoothnes": 0.9})
    with pytest.raises(vbench.VBenchError, match="looks like a percentage"):
        vbench.aggregate({"scene": 53.2})
    partial = vbench.aggregate({d: scores[d] for d in QUALITY})
    assert partial["quality"] == pytest.approx(vbench.aggregate(scores)["quality"])
    assert partial["semantic"] is None and partial["total"] is None and partial["missing"] == list(SEMANTIC)


def test_report_writes_table_and_chart(tmp_path, capsys):
    (total, quality, semantic), scores = published("CogVideoX-2B")  # its totals also round to the published ones
    src = tmp_path / "scores.json"
    src.write_text(json.dumps(scores))
    out = tmp_path / "report"
    assert main(["eval", "vbench", "report", str(src), "--out", str(out)]) == 0
    md = (out / "vbench.md").read_text()
    assert f"| **Total** | **{total:.2f}%** |" in md and f"| **Quality** | **{quality:.2f}%** |" in md
    assert "| dynamic degree | quality | 58.33% | 58.33% | 0.5 |" in md
    assert json.loads((out / "vbench.json").read_text())["total"] == pytest.approx(total / 100, abs=ROUNDING / 100)
    from PIL import Image

    with Image.open(out / "vbench.png") as im:
        assert im.width > 600 and im.height > 400
    assert main(["eval", "vbench", "report", str(src), "--out", str(out)]) == 2  # kept without --overwrite
    src.write_text(json.dumps({**scores, "colour": 0.5}))
    assert main(["eval", "vbench", "report", str(src), "--out", str(out), "--overwrite"]) == 2
    assert "unknown VBench dimension 'colour'" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ temporal flickering


def test_flicker_score_is_vbenchs_definition(tmp_path):
    grey = np.full((6, 32, 32, 3), 100, np.uint8)
    grey[1::2] = 0  # alternate grey 100 and black: every consecutive pair differs by 100
    write_video(tmp_path / "alternating.mp4", grey, fps=8, crf=0)
    write_video(tmp_path / "static.mp4", np.full((6, 32, 32, 3), 77, np.uint8), fps=8)
    assert vbench.flicker_score(tmp_path / "static.mp4") == pytest.approx(1.0, abs=1e-6)
    assert vbench.flicker_score(tmp_path / "alternating.mp4") == pytest.approx((255 - 100) / 255, abs=2 / 255)
    # The exact value is the mean over pairs of the mean absolute difference of the decoded uint8 frames.
    with ClipReader(tmp_path / "alternating.mp4") as r:
        f = r.read(list(range(6))).astype(np.float64)
    expected = (255 - np.mean([np.abs(f[i + 1] - f[i]).mean() for i in range(5)])) / 255
    assert vbench.flicker_score(tmp_path / "alternating.mp4") == pytest.approx(expected, abs=1e-6)


def test_score_in_process_writes_vbench_layout(tmp_path, capsys):
    videos = tmp_path / "videos"
    write_video(videos / "a cat-0.mp4", np.full((4, 32, 32, 3), 50, np.uint8), fps=8)
    write_video(videos / "a cat-1.mp4", np.full((4, 32, 32, 3), 200, np.uint8), fps=8)
    out = tmp_path / "results"
    argv = ["eval", "vbench", "score", str(videos), "--out", str(out), "--in-process", "--quiet"]
    assert main([*argv, "--dimensions", "temporal_flickering"]) == 0
    doc = json.loads((out / "temporal_flickering_eval_results.json").read_text())
    score, per_video = doc["temporal_flickering"]
    assert score == pytest.approx(1.0) and len(per_video) == 2 and per_video[0]["video_path"].endswith("a cat-0.mp4")
    assert vbench.read_scores([out]) == {"temporal_flickering": pytest.approx(1.0)}
    assert main([*argv, "--dimensions", "scene"]) == 2  # needs VBench's models
    assert "need VBench's models" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ score (subprocess)


@pytest.fixture
def videos(tmp_path) -> Path:
    d = tmp_path / "videos"
    for i in range(2):
        write_video(d / f"a red car-{i}.mp4", np.full((4, 32, 32, 3), 60 * i, np.uint8), fps=8)
    return d


def test_score_runs_the_evaluator_in_another_process(tmp_path, videos, monkeypatch, capsys):
    (total, quality, semantic), scores = published("Mochi-1")
    table = tmp_path / "standin_scores.json"
    table.write_text(json.dumps(scores))
    monkeypatch.setenv("PYTHONPATH", str(STANDIN))
    monkeypatch.setenv("VBENCH_STANDIN_SCORES", str(table))
    out = tmp_path / "results"
    argv = ["eval", "vbench", "score", str(videos), "--out", str(out), "--vbench-python", sys.executable]
    assert main(argv) == 2  # the stand-in, unlike the pip package, ships no prompt-suite file
    assert "ships no VBench_full_info.json" in capsys.readouterr().err
    info = tmp_path / "VBench_full_info.json"
    info.write_text(json.dumps([{"prompt_en": "a red car", "dimension": list(scores)}]))
    argv += ["--full-info", str(info)]
    assert main([*argv, "--device", "cpu", "--quiet"]) == 0
    assert "vbench 0.0-standin" in capsys.readouterr().out
    assert len(list(out.glob("*_eval_results.json"))) == 16
    per_video = json.loads((out / "scene_eval_results.json").read_text())["scene"][1]
    assert [Path(v["video_path"]).name for v in per_video] == ["a red car-0.mp4", "a red car-1.mp4"]
    assert json.loads((out / "scores.json").read_text()) == pytest.approx(scores)
    assert main(["eval", "vbench", "report", str(out), "--out", str(tmp_path / "report")]) == 0
    agg = json.loads((tmp_path / "report" / "vbench.json").read_text())
    assert 100 * agg["total"] == pytest.approx(total, abs=ROUNDING)
    assert 100 * agg["semantic"] == pytest.approx(semantic, abs=ROUNDING)
    # Resumable: existing result files are kept, not re-run.
    table.write_text(json.dumps({d: 0.5 for d in scores}))
    assert main([*argv, "--dimensions", "scene,color", "--quiet"]) == 0
    assert "exists, kept" in capsys.readouterr().out
    assert vbench.read_scores([out])["scene"] == pytest.approx(scores["scene"])


def test_score_fails_clearly_without_vbench(tmp_path, videos, monkeypatch, capsys):
    monkeypatch.delenv("PYTHONPATH", raising=False)
    argv = ["eval", "vbench", "score", str(videos), "--out", str(tmp_path / "r")]
    assert main([*argv, "--vbench-python", sys.executable]) == 2
    err = capsys.readouterr().err
    assert "has no `vbench` package" in err and "pip install vbench" in err and "--vbench-python" in err
    assert main([*argv, "--vbench-python", str(tmp_path / "no" / "python")]) == 2
    assert "no such executable" in capsys.readouterr().err
    assert main(argv) == 2
    assert "--vbench-python PYTHON is required" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_evaluator_failure_is_reported_with_its_log(tmp_path, videos, monkeypatch, capsys):
    monkeypatch.setenv("PYTHONPATH", str(STANDIN))
    monkeypatch.setenv("VBENCH_STANDIN_SCORES", str(tmp_path / "missing.json"))  # the stand-in crashes
    argv = ["eval", "vbench", "score", str(videos), "--out", str(tmp_path / "r"), "--dimensions", "color"]
    assert main([*argv, "--vbench-python", sys.executable, "--mode", "custom_input"]) == 1
    err = capsys.readouterr().err
    assert "VBench failed on color" in err and "FileNotFoundError" in err and "color.log" in err


def test_runner_needs_no_cinedit():
    """The runner runs in VBench's environment, where cinedit is not installed: it may not import it."""
    assert not re.search(r"^\s*(from|import)\s+cinedit", vbench.RUNNER.read_text(), flags=re.M)
    proc = subprocess.run([sys.executable, "-I", str(vbench.RUNNER), "--check"], capture_output=True, text=True)
    assert proc.returncode == vbench.NO_VBENCH and "no `vbench` package" in proc.stderr


# ------------------------------------------------------------------------------------------ generate


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> str:
    from cinedit.generator.model import PRESETS as GENERATORS
    from cinedit.generator.model import MMDiT
    from cinedit.generator.pipeline import save_pipeline
    from cinedit.generator.sampler import SamplerConfig
    from cinedit.generator.text import PRESETS as TEXT
    from cinedit.tokenizer.model import PRESETS as TOKENIZERS
    from cinedit.tokenizer.model import VideoDCAE

    torch.manual_seed(0)
    cfg = dataclasses.replace(GENERATORS["debug"](), context_in_dim=384, vec_in_dim=384)
    path = tmp_path_factory.mktemp("pipe") / "model"
    save_pipeline(path, MMDiT(cfg), VideoDCAE(TOKENIZERS["debug"]()), TEXT["debug"], SamplerConfig(num_steps=1), fps=8)
    return str(path)


def test_generate_names_samples_as_vbench_and_resumes(tmp_path, pipeline, capsys):
    prompts = tmp_path / "suite.txt"
    prompts.write_text("a red car, driving\n\nan owl at night\na red car, driving\n")  # duplicate dropped
    out = tmp_path / "samples"
    argv = ["eval", "vbench", "generate", "--prompts", str(prompts), "--ckpt", pipeline, "--out", str(out)]
    argv += ["--samples", "2", "--num-frames", "4", "--size", "64", "64", "--device", "cpu", "--quiet"]
    assert main(argv) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == [
        "a red car, driving-0.mp4",
        "a red car, driving-1.mp4",
        "an owl at night-0.mp4",
        "an owl at night-1.mp4",
    ]
    with ClipReader(out / names[0]) as a, ClipReader(out / names[1]) as b:
        first, second = a.read([0, 1, 2, 3]), b.read([0, 1, 2, 3])
    assert first.shape == (4, 64, 64, 3) and not np.array_equal(first, second)  # sample i uses seed + i
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    (out / names[3]).unlink()
    assert main(argv) == 0
    assert "3 of 4 samples exist (kept); generating 1" in capsys.readouterr().out
    assert all(stamps[n] == (out / n).stat().st_mtime_ns for n in names[:3]) and (out / names[3]).is_file()
    assert main(argv) == 0
    assert "nothing to do" in capsys.readouterr().out


def test_generate_standard_suite_and_bad_prompts(tmp_path, pipeline, capsys):
    checkout = tmp_path / "VBench"
    (checkout / "prompts").mkdir(parents=True)
    (checkout / "prompts" / "all_dimension.txt").write_text("a dog\na cat\n")
    out = tmp_path / "samples"
    argv = ["eval", "vbench", "generate", "--ckpt", pipeline, "--out", str(out), "--num-frames", "4"]
    argv += ["--size", "64", "64", "--device", "cpu", "--quiet"]
    assert main([*argv, "--vbench-dir", str(checkout), "--limit", "1", "--samples", "1"]) == 0
    assert [p.name for p in out.iterdir()] == ["a dog-0.mp4"]
    assert "2 prompts; the standard suite has 946" in capsys.readouterr().err
    assert main([*argv, "--vbench-dir", str(tmp_path)]) == 2
    assert "no prompts/all_dimension.txt" in capsys.readouterr().err
    bad = tmp_path / "bad.txt"
    bad.write_text("cats/dogs\n")
    assert main([*argv, "--prompts", str(bad)]) == 2
    assert "has a '/'" in capsys.readouterr().err
    assert main(argv) == 2  # neither --prompts nor --vbench-dir
    assert "--prompts FILE" in capsys.readouterr().err


def test_prompt_suite_json_format(tmp_path):
    info = tmp_path / "VBench_full_info.json"
    info.write_text(
        json.dumps([{"prompt_en": "a dog", "dimension": ["scene"]}, {"prompt_en": "a cat", "dimension": []}])
    )
    assert vbench.read_prompt_suite(info) == ["a dog", "a cat"]
    videos = tmp_path / "v"
    for name in ("a dog-0.mp4", "a dog-1.mp4", "a cat-0.mp4"):
        write_video(videos / name, np.zeros((2, 16, 16, 3), np.uint8), fps=8)
    assert [p.name for p in vbench.videos_for(videos, "scene", info)] == ["a dog-0.mp4", "a dog-1.mp4"]
    assert len(vbench.videos_for(videos, "scene", None)) == 3


@pytest.mark.parametrize(
    "argv", [["vbench"], ["vbench", "generate"], ["vbench", "score"], ["vbench", "report"]], ids=lambda a: a[-1]
)
def test_help(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(["eval", *argv, "--help"])
    assert e.value.code == 0
    assert "usage: cinedit eval vbench" in capsys.readouterr().out
