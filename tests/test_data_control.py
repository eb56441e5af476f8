"""`cinedit data control`: control videos of the right length and size, flow that points the right way, the model
interface for depth / pose, folder and meta inputs with their report, and the errors."""

from __future__ import annotations

import os
from functools import partial

import numpy as np
import pandas as pd
import pytest
import torch
from skimage.color import rgb2hsv

from cinedit.cli import group_main
from cinedit.data.control import flow_field, flow_to_rgb, luma
from cinedit.data.meta import read_meta
from cinedit.data.video import probe, read_video, to_uint8, write_video

data_main = partial(group_main, "data")
H, W, T, FPS = 64, 96, 6, 12.0


def square_clip(dx: int = 0, dy: int = 0, t: int = T, seed: int = 0) -> np.ndarray:
    """A colour-textured 24 px square moving by (dx, dy) pixels per frame on black: uint8 (T, H, W, 3)."""
    rng = np.random.default_rng(seed)
    texture = rng.integers(60, 255, (24, 24, 3)).astype(np.uint8)
    frames = np.zeros((t, H, W, 3), np.uint8)
    for i in range(t):
        y, x = 20 + i * dy, 36 + i * dx
        frames[i, y : y + 24, x : x + 24] = texture
    return frames


def write_clip(path, frames, fps: float = FPS):
    return write_video(path, frames, fps, crf=8)


def frames_of(path) -> np.ndarray:
    return to_uint8(read_video(path, stride=1, start=0))


@pytest.mark.parametrize("kind", ["edges", "flow", "grey", "scribble", "mask"])
def test_kinds_write_playable_videos_of_the_input_shape(kind, tmp_path):
    src = write_clip(tmp_path / "clip.mp4", square_clip(dx=3))
    out = tmp_path / f"{kind}.mp4"
    assert data_main(["control", str(src), "--kind", kind, "--out", str(out)]) == 0
    info = probe(out, count_frames=True)
    assert (info.num_frames, info.height, info.width, info.fps) == (T, H, W, FPS)
    frames = frames_of(out)
    assert frames.shape == (T, H, W, 3) and frames.std() > 10  # not blank
    if kind in ("edges", "grey", "scribble", "mask"):  # grey signals: the three channels agree (up to yuv420)
        bright = frames.max(axis=-1) > 40
        assert np.abs(frames.astype(int) - frames[..., :1])[bright].mean() < 3
    if kind == "grey":
        assert np.abs(frames[..., 1] - luma(frames_of(src)) * 255).mean() < 2
    if kind in ("edges", "scribble", "mask"):  # black and white
        assert np.isin(frames, range(0, 30)).mean() + np.isin(frames, range(225, 256)).mean() > 0.95
    resized = tmp_path / f"{kind}_small.mp4"
    assert data_main(["control", str(src), "--kind", kind, "--out", str(resized), "--size", "32", "40"]) == 0
    assert probe(resized).height == 32 and probe(resized).width == 40


def dominant_hue(frames: np.ndarray) -> tuple[float, float]:
    """(hue in degrees of the most saturated tenth of the pixels, their mean saturation) over all frames."""
    hsv = rgb2hsv(frames.reshape(-1, 1, 3)).reshape(-1, 3)
    top = hsv[hsv[:, 1] >= np.quantile(hsv[:, 1], 0.9)]
    angle = np.angle(np.exp(2j * np.pi * top[:, 0]).mean(), deg=True) % 360
    return float(angle), float(top[:, 1].mean())


@pytest.mark.parametrize(("dx", "dy", "hue"), [(3, 0, 0), (-3, 0, 180), (0, 3, 270), (0, -3, 90)])
def test_flow_hue_is_the_direction(dx, dy, hue, tmp_path):
    src = write_clip(tmp_path / "moving.mp4", square_clip(dx=dx, dy=dy))
    out = tmp_path / "flow.mp4"
    assert data_main(["control", str(src), "--kind", "flow", "--out", str(out)]) == 0
    angle, saturation = dominant_hue(frames_of(out))
    assert min(abs(angle - hue), 360 - abs(angle - hue)) < 30, (angle, hue)
    assert saturation > 0.5
    # The field itself: the square's pixels move by (dx, dy).
    field = flow_field(square_clip(dx=dx, dy=dy), flow_size=64)
    inside = field[2, 32:40, 48:56].reshape(-1, 2).mean(axis=0)
    assert np.allclose(inside, (dx, dy), atol=1.0), inside
    assert np.array_equal(field[0], field[1])  # frame 0 repeats frame 1's flow


def test_flow_of_a_static_clip_is_white(tmp_path):
    src = write_clip(tmp_path / "still.mp4", square_clip())
    out = tmp_path / "flow.mp4"
    assert data_main(["control", str(src), "--kind", "flow", "--out", str(out)]) == 0
    frames = frames_of(out)
    assert frames.min() > 235, frames.min()  # no motion is white: saturation ~0 everywhere
    assert np.abs(flow_field(square_clip())).max() < 0.05
    assert flow_to_rgb(np.zeros((2, 4, 4, 2), np.float32)).min() == 255


# A tiny random "depth model" for the callable interface: frames uint8 (T, H, W, 3) -> float (T, H/2, W/2) in [0, 1].
torch.manual_seed(0)
TINY = torch.nn.Sequential(torch.nn.Conv2d(3, 1, 3, stride=2, padding=1), torch.nn.Sigmoid()).eval()


def tiny_depth(frames: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        return TINY(x)[:, 0]


def bad_depth(frames: np.ndarray) -> np.ndarray:
    return np.full((len(frames), 8, 8), 2.0)  # outside [0, 1]


def test_depth_takes_a_user_model(tmp_path):
    src = write_clip(tmp_path / "clip.mp4", square_clip(dx=2))
    out = tmp_path / "depth.mp4"
    model = f"{__file__}:tiny_depth"
    assert data_main(["control", str(src), "--kind", "depth", "--model", model, "--out", str(out), "--chunk", "4"]) == 0
    info = probe(out, count_frames=True)
    assert (info.num_frames, info.height, info.width) == (T, H, W)
    want = tiny_depth(frames_of(src)).numpy()  # (T, H/2, W/2), upsampled by the command
    got = frames_of(out)[:, ::2, ::2, 0] / 255
    assert np.abs(got - want).mean() < 0.03
    assert np.abs(got - want[::-1]).mean() > np.abs(got - want).mean()  # it is the model's output, frame by frame
    res = tmp_path / "bad.mp4"
    assert (
        data_main(["control", str(src), "--kind", "pose", "--model", f"{__file__}:bad_depth", "--out", str(res)]) == 1
    )
    assert not res.exists()


def test_folder_and_meta_inputs(tmp_path, capsys):
    root = tmp_path / "videos"
    write_clip(root / "a" / "right.mp4", square_clip(dx=3))
    write_clip(root / "b" / "right.mp4", square_clip(dy=3))
    (root / "b" / "broken.mp4").write_text("not a video")
    out = tmp_path / "edges"
    assert data_main(["control", str(root), "--kind", "edges", "--out", str(out), "--quiet"]) == 0
    assert probe(out / "a" / "right.mp4").num_frames == T and probe(out / "b" / "right.mp4").num_frames == T
    report = pd.read_csv(tmp_path / "edges.report.csv")
    assert list(report.path) == [str(root / "b" / "broken.mp4")]
    # A second run keeps what is there.
    assert data_main(["control", str(root), "--kind", "edges", "--out", str(out), "--quiet"]) == 1
    assert "--overwrite" in capsys.readouterr().err

    assert data_main(["index", str(root), "--out", str(tmp_path / "meta.csv"), "--quiet"]) == 0
    controls = tmp_path / "flow"
    assert data_main(["control", str(tmp_path / "meta.csv"), "--kind", "flow", "--out", str(controls), "--quiet"]) == 0
    meta = read_meta(controls / "meta.csv")
    assert [os.path.isfile(p) for p in meta["control_flow"]] == [True, True]
    check = ["control", str(controls / "meta.csv"), "--kind", "flow", "--check", "--quiet"]
    assert data_main(check) == 0
    write_clip(meta["control_flow"][0], square_clip(t=T - 2))  # a control video that lost two frames
    assert data_main(check) == 1
    report = pd.read_csv(controls / "meta.control_flow.report.csv")
    assert list(report.reason) == ["mismatch"] and f"{T - 2} frames" in report.detail[0]


def test_errors(tmp_path, capsys):
    src = write_clip(tmp_path / "clip.mp4", square_clip(dx=2))
    out = tmp_path / "out.mp4"

    def fails(*args: str, match: str) -> None:
        assert data_main(["control", *args]) == 1
        assert match in capsys.readouterr().err

    fails(str(tmp_path / "missing.mp4"), "--kind", "edges", "--out", str(out), match="no such file")
    (tmp_path / "text.mp4").write_text("hello")
    fails(str(tmp_path / "text.mp4"), "--kind", "edges", "--out", str(out), match="not a readable video")
    fails(str(src), "--kind", "depth", "--out", str(out), match="needs --model")
    fails(str(src), "--kind", "edges", "--model", "x:y", "--out", str(out), match="--model is for")
    fails(str(src), "--kind", "depth", "--model", "no_such_module_xyz:f", "--out", str(out), match="cannot import")
    fails(str(src), "--kind", "edges", "--out", str(tmp_path / "out.png"), match="written as .mp4")
    fails(str(src), "--kind", "edges", "--out", str(out), "--size", "33", "40", match="even sides")
    one = write_clip(tmp_path / "one.mp4", square_clip(t=1))
    fails(str(one), "--kind", "flow", "--out", str(out), match="at least 2")
    assert not out.exists()
    with pytest.raises(SystemExit) as e:
        data_main(["control", str(src), "--kind", "normals", "--out", str(out)])
    assert e.value.code == 2
    # An existing output is kept without --overwrite.
    out.write_bytes(b"precious")
    fails(str(src), "--kind", "edges", "--out", str(out), match="--overwrite")
    assert out.read_bytes() == b"precious"
    assert data_main(["control", str(src), "--kind", "edges", "--out", str(out), "--overwrite"]) == 0
    assert probe(out).num_frames == T


def test_help(capsys):
    with pytest.raises(SystemExit) as e:
        data_main(["control", "--help"])
    assert e.value.code == 0 and "module:function" in capsys.readouterr().out
