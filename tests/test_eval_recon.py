"""`cinedit eval recon` on real sample clips with a tiny random tokenizer: the JSON / table / PNG report, bad files
skipped, LPIPS wired through a local weight file (random weights) or reported as unavailable, and its refusals."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cinedit.cli import main
from cinedit.data.meta import read_meta, write_meta
from cinedit.data.video import probe, to_uint8
from cinedit.eval import lpips, psnr, recon, ssim
from cinedit.tokenizer import PRESETS, VideoDCAE, save_pretrained
from cinedit.tokenizer.commands import find_inputs, load_tokenizer, read_clip, reconstruct
from cinedit.tokenizer.lpips import LPIPS, alexnet_features
from cinedit.tokenizer.tiling import TilingConfig

CLIPS = ("videos/bunny_wakes.mp4", "videos/door_panel.mp4", "images/horse.png")


# Debug-size models: intra-op threads cost more than they save, badly so on a loaded 2-core runner.
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def no_hub_cache(tmp_path, monkeypatch):
    """LPIPS looks for its backbone in the torch hub cache; make sure this machine's cache plays no part."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> str:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tok") / "debug"
    save_pretrained(VideoDCAE(PRESETS["debug"]()), path)
    return str(path)


@pytest.fixture(scope="module")
def folder(sample_data, tmp_path_factory) -> Path:
    """Two sample clips, one photograph and a file that only claims to be a video."""
    root, _ = sample_data
    d = tmp_path_factory.mktemp("clips")
    for rel in CLIPS:
        shutil.copy(root / rel, d / Path(rel).name)
    (d / "broken.mp4").write_bytes(b"not a video")
    return d


def run(*argv: str) -> int:
    return main(["eval", "recon", *argv, "--quiet"])


def direct(ckpt: str, path: Path, size: tuple[int, int], frames: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(reconstruction, reference) of one clip, computed here without the command."""
    model = load_tokenizer(ckpt, torch.device("cpu"))
    with torch.no_grad():
        return reconstruct(model, read_clip(path, frames, size=size), TilingConfig(progress=False))


def test_report_on_sample_clips(ckpt, folder, tmp_path, capsys):
    out = tmp_path / "report"
    assert run(str(folder), "--ckpt", ckpt, "--out", str(out), "--size", "64", "64", "--num-frames", "8") == 1
    captured = capsys.readouterr()
    assert "skipped" in captured.err and "broken.mp4" in captured.err and "LPIPS unavailable" in captured.err
    report = json.loads((out / "recon.json").read_text())
    clips = {Path(c["path"]).name: c for c in report["clips"]}
    assert sorted(clips) == ["bunny_wakes.mp4", "door_panel.mp4", "horse.png"]
    assert [Path(f["path"]).name for f in report["failed"]] == ["broken.mp4"]
    assert clips["bunny_wakes.mp4"]["frames"] == 8 and clips["horse.png"]["frames"] == 1
    rec, ref = direct(ckpt, folder / "bunny_wakes.mp4", (64, 64), 8)
    assert clips["bunny_wakes.mp4"]["psnr"] == pytest.approx(psnr(rec, ref).item(), abs=1e-4)
    assert clips["bunny_wakes.mp4"]["ssim"] == pytest.approx(ssim(rec, ref).item(), abs=1e-4)
    mean = report["mean"]
    assert mean["psnr"] == pytest.approx(sum(c["psnr"] for c in clips.values()) / 3)
    assert mean["frames"] == 17 and mean["frames_per_s"] > 0 and mean["model_seconds"] > 0
    assert mean["lpips"] is None and "cannot be downloaded" in report["lpips_unavailable"]
    md = (out / "recon.md").read_text()
    assert "| clip | frames | size | PSNR (dB) | SSIM | LPIPS | time (s) |" in md
    assert f"| **mean** | 17 | | **{mean['psnr']:.2f}** |" in md and "LPIPS: unavailable" in md and "broken.mp4" in md
    worst = min(clips.values(), key=lambda c: c["psnr"])
    with Image.open(out / "recon.png") as im:
        # Two panels (worst, best) of a title line and three 160 px rows (original, reconstruction, error).
        assert im.height == 2 * (24 + 3 * 164) + 12
        cell = np.asarray(im.convert("RGB").crop((130, 24, 290, 184)))
    # The first cell is the worst clip's first frame, enlarged 2.5x pixel for pixel.
    first = to_uint8(read_clip(Path(worst["path"]), 8, size=(64, 64)).video[0])[0]
    assert np.array_equal(cell, np.asarray(Image.fromarray(first).resize((160, 160), Image.Resampling.NEAREST)))
    before = {n: (out / n).stat().st_mtime_ns for n in recon.OUTPUTS}
    assert run(str(folder), "--ckpt", ckpt, "--out", str(out), "--size", "64", "64") == 2
    assert "pass --overwrite" in capsys.readouterr().err
    assert before == {n: (out / n).stat().st_mtime_ns for n in recon.OUTPUTS}


def test_lpips_from_a_local_weight_file(ckpt, folder, tmp_path):
    torch.manual_seed(3)
    backbone = tmp_path / "alexnet.pth"
    torch.save({f"features.{k}": v for k, v in alexnet_features().state_dict().items()}, backbone)
    out = tmp_path / "report"
    argv = [str(folder / "door_panel.mp4"), "--ckpt", ckpt, "--out", str(out), "--size", "64", "64"]
    assert run(*argv, "--num-frames", "4", "--lpips.backbone", str(backbone)) == 0
    report = json.loads((out / "recon.json").read_text())
    rec, ref = direct(ckpt, folder / "door_panel.mp4", (64, 64), 4)
    expected = lpips(rec, ref, LPIPS("alex", backbone)).item()
    assert expected > 0 and report["clips"][0]["lpips"] == pytest.approx(expected, rel=1e-4)
    assert report["mean"]["lpips"] == report["clips"][0]["lpips"] and report["lpips_unavailable"] is None
    assert "LPIPS: unavailable" not in (out / "recon.md").read_text()


def test_meta_file_own_size_and_refusals(ckpt, sample_data, tmp_path, capsys):
    _, meta = sample_data
    out = tmp_path / "report"
    horse = next(p for p in find_inputs(meta)[0] if p.name == "horse.png")
    size = (probe(horse).height, probe(horse).width)
    assert size == (328, 400)  # not multiples of 32
    assert run(str(horse), "--ckpt", ckpt, "--out", str(out)) == 2
    err = capsys.readouterr().err
    assert "not a multiple of 32" in err and "--size H W" in err and "none of the 1 input(s)" in err
    assert not out.exists()
    assert run(str(horse), "--ckpt", ckpt, "--out", str(out), "--pad") == 0
    clip = json.loads((out / "recon.json").read_text())["clips"][0]
    assert (clip["height"], clip["width"]) == size  # scored on the original area, not the padded one
    two = tmp_path / "two.csv"
    write_meta(read_meta(meta).iloc[:2], two)
    assert (
        run(str(two), "--ckpt", ckpt, "--out", str(out), "--size", "32", "32", "--num-frames", "4", "--overwrite") == 0
    )
    assert json.loads((out / "recon.json").read_text())["mean"]["clips"] == 2
    assert run(str(meta), "--ckpt", ckpt, "--out", str(out), "--tile-size", "33", "--overwrite") == 2
    assert "spatial_tile must be a positive multiple of 32" in capsys.readouterr().err
    assert run(str(tmp_path / "nothing"), "--ckpt", ckpt, "--out", str(out), "--overwrite") == 2
    assert "no such file or folder" in capsys.readouterr().err


def test_sample_keyword_uses_the_sample_dataset(sample_data):
    root, meta = sample_data
    args = argparse.Namespace(input="sample", sample_dir=str(root), quiet=True)
    assert recon._inputs(args) == find_inputs(meta)[0]  # built already: reused, not rebuilt


def test_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["eval", "recon", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "usage: cinedit eval recon" in text and "--lpips.backbone" in text and "recon.png" in text
