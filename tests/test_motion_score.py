"""The release's motion score: `cinedit data score` (ffmpeg's vmafmotion through PyAV), `data filter
--min-motion/--max-motion` on it, and the training-caption suffix (`--data.motion_score_suffix`)."""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path

import av
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cinedit.cli import group_main
from cinedit.configs.core import ConfigError, apply_overrides
from cinedit.configs.data import DataConfig
from cinedit.configs.generator import GeneratorTrainConfig
from cinedit.data import score as score_mod
from cinedit.data.captions import MOTION_SCORE_COLUMN, training_caption
from cinedit.data.dataset import VideoDataset
from cinedit.data.filter import filter_meta
from cinedit.data.index import build_index
from cinedit.data.meta import read_meta
from cinedit.data.score import SCORE_KEY, MotionScoreError, motion_score, score_meta
from cinedit.data.video import write_video

main = partial(group_main, "data")
TEXTURE = np.random.default_rng(0).integers(0, 256, (64, 128, 3), dtype=np.uint8)
# The 5-tap Gaussian of the VMAF motion feature (libvmaf's FILTER_5).
BLUR = np.array([0.054488685, 0.244201342, 0.402619947, 0.244201342, 0.054488685])


def pan(t: int = 16, step: int = 2) -> np.ndarray:
    return np.stack([np.roll(TEXTURE, i * step, axis=1)[:, :64] for i in range(t)])


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("motion")
    write_video(root / "static.mp4", np.repeat(TEXTURE[None, :, :64], 16, axis=0), fps=24)
    write_video(root / "moving.mp4", pan(), fps=24)
    (root / "moving.txt").write_text("a pan over noise")
    Image.fromarray(TEXTURE).save(root / "photo.png")
    (root / "photo.txt").write_text("noise")
    return root


def luma(path: Path) -> list[np.ndarray]:
    """The decoded Y planes of a video, as the filter sees them (yuv420p input needs no conversion)."""
    with av.open(str(path)) as c:
        out = []
        for f in c.decode(video=0):
            assert f.format.name == "yuv420p"
            plane = f.planes[0]
            rows = np.frombuffer(plane, np.uint8).reshape(plane.height, plane.line_size)
            out.append(rows[:, : plane.width].astype(np.float64))
    return out


def reference_motion(frames: list[np.ndarray]) -> float:
    """VMAF motion written out: blur each luma frame, mean |difference| to the previous one (0 for the first), then
    the mean over all frames."""

    def blur(x: np.ndarray) -> np.ndarray:
        for axis in (0, 1):
            padded = np.pad(x, [(2, 2) if a == axis else (0, 0) for a in range(2)], mode="reflect")
            n = x.shape[axis]
            x = sum(w * np.take(padded, range(k, k + n), axis=axis) for k, w in enumerate(BLUR))
        return x

    b = [blur(f) for f in frames]
    return float(np.mean([0.0] + [np.abs(y - x).mean() for x, y in zip(b, b[1:])]))


def test_static_scores_zero_and_motion_matches_vmaf(clips: Path):
    assert motion_score(clips / "static.mp4") < 0.05
    moving = motion_score(clips / "moving.mp4")
    assert moving > 5
    # VMAF motion averaged over every frame, the first counting 0 (leaving it out would be 1/15 higher here).
    assert moving == pytest.approx(reference_motion(luma(clips / "moving.mp4")), rel=0.01)  # fixed point vs float
    assert motion_score(clips / "photo.png") == 0.0


def test_frames_and_stride(clips: Path):
    full = motion_score(clips / "moving.mp4")
    assert motion_score(clips / "moving.mp4", max_frames=1) == 0.0  # the first frame has nothing to differ from
    # Two frames: (0 + the first difference) / 2.
    first = reference_motion(luma(clips / "moving.mp4")[:2])
    assert motion_score(clips / "moving.mp4", max_frames=2) == pytest.approx(first, rel=0.02)
    assert motion_score(clips / "moving.mp4", stride=2) > full  # twice the pan per scored step
    with pytest.raises(ValueError, match="stride"):
        motion_score(clips / "moving.mp4", stride=0)


def test_score_key_is_what_the_filter_writes():
    g = av.filter.Graph()
    src = g.add_buffer(width=32, height=32, format="gray", time_base=1)
    vm, sink = g.add("vmafmotion"), g.add("buffersink")
    src.link_to(vm)
    vm.link_to(sink)
    g.configure()
    frame = av.VideoFrame.from_ndarray(np.zeros((32, 32), np.uint8), format="gray")
    frame.pts = 0
    g.vpush(frame)
    g.vpush(None)
    assert SCORE_KEY in g.vpull().metadata


def test_score_command(clips: Path, tmp_path: Path, capsys):
    meta = tmp_path / "meta.csv"
    df, _ = build_index(clips, progress=False)
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(np.random.default_rng(1).bytes(4096))
    extra = df[df["path"].str.endswith("moving.mp4")].copy()
    extra["path"] = [str(broken)]
    pd.concat([df, extra], ignore_index=True).to_csv(meta, index=False)

    out = tmp_path / "scored.parquet"
    assert main(["score", str(meta), "--out", str(out), "--quiet"]) == 0
    msg = capsys.readouterr().out
    assert "scored 2 videos" in msg and "1 images (score 0)" in msg and "1 unreadable" in msg
    scored = {Path(p).name: s for p, s in zip(*read_meta(out)[["path", MOTION_SCORE_COLUMN]].T.values)}
    assert scored["photo.png"] == 0.0 and scored["static.mp4"] < 0.05 and scored["moving.mp4"] > 5
    assert math.isnan(scored["broken.mp4"])
    rep = pd.read_csv(tmp_path / "scored.report.csv")
    assert list(rep["path"].map(lambda p: Path(p).name)) == ["broken.mp4"] and rep["reason"][0] == "unreadable"

    before = out.read_bytes()
    assert main(["score", str(meta), "--out", str(out), "--quiet"]) == 1
    assert "--overwrite" in capsys.readouterr().err and out.read_bytes() == before
    assert main(["score", str(meta), "--out", str(out), "--frames", "1", "--overwrite", "--quiet"]) == 0
    assert (read_meta(out)[MOTION_SCORE_COLUMN].dropna() == 0).all()


def test_missing_filter_is_a_clear_error(clips: Path, tmp_path: Path, monkeypatch, capsys):
    monkeypatch.setattr(av.filter, "filters_available", set())
    with pytest.raises(MotionScoreError, match="vmafmotion"):
        motion_score(clips / "moving.mp4")
    meta = tmp_path / "meta.csv"
    build_index(clips, progress=False)[0].to_csv(meta, index=False)
    assert main(["score", str(meta), "--out", str(tmp_path / "x.csv"), "--quiet"]) == 1
    assert "has no `vmafmotion` filter" in capsys.readouterr().err
    assert score_mod.FILTER == "vmafmotion"


def test_filter_by_motion(clips: Path, tmp_path: Path, capsys):
    df, _ = score_meta(build_index(clips, progress=False)[0], progress=False)
    # static.mp4 fails the static-ratio test before any motion bound; lift that to see the bounds alone.
    loose = partial(filter_meta, max_static_ratio=1.0, progress=False)
    kept, report = loose(df, min_motion=1.0)
    assert sorted(Path(p).name for p in kept["path"]) == ["moving.mp4", "photo.png"]  # images are not bounded
    assert {Path(r["path"]).name: r["reason"] for r in report} == {"static.mp4": "low_motion"}
    # The release's score is kept as it was; the filter's luma difference goes to its own column.
    given = dict(zip(df["path"], df[MOTION_SCORE_COLUMN]))
    assert dict(zip(kept["path"], kept[MOTION_SCORE_COLUMN])) == {p: given[p] for p in kept["path"]}
    assert "frame_diff" in kept.columns and (kept["frame_diff"] != kept[MOTION_SCORE_COLUMN]).any()
    kept, report = loose(df, max_motion=1.0)
    assert {Path(r["path"]).name: r["reason"] for r in report} == {"moving.mp4": "high_motion"}

    df.loc[df["path"].str.endswith("moving.mp4"), MOTION_SCORE_COLUMN] = math.nan
    kept, report = loose(df, min_motion=0.0)
    assert [(Path(r["path"]).name, r["reason"]) for r in report] == [("moving.mp4", "no_motion_score")]
    assert "cinedit data score" in report[0]["detail"]
    assert len(loose(df)[1]) == 0  # without a bound, a missing score drops nothing

    meta, out = tmp_path / "scored.csv", tmp_path / "kept.csv"
    score_meta(build_index(clips, progress=False)[0], progress=False)[0].to_csv(meta, index=False)
    assert main(["filter", str(meta), "--out", str(out), "--min-motion", "1", "--max-motion", "100", "--quiet"]) == 0
    assert "kept 2 of 3 rows" in capsys.readouterr().out


def test_motion_bounds_need_the_release_score(clips: Path, tmp_path: Path, capsys):
    """Without `cinedit data score`, --min-motion/--max-motion are an error, never a bound on the luma difference."""
    df, _ = build_index(clips, progress=False)
    for bound in ({"min_motion": 1.0}, {"max_motion": 100.0}):
        with pytest.raises(ValueError, match="cinedit data score META --out SCORED"):
            filter_meta(df, progress=False, **bound)
    kept, _ = filter_meta(df, max_static_ratio=1.0, progress=False)  # no bound: no score needed, none written
    assert MOTION_SCORE_COLUMN not in kept.columns and "frame_diff" in kept.columns

    meta, out = tmp_path / "meta.csv", tmp_path / "kept.csv"
    df.to_csv(meta, index=False)
    assert main(["filter", str(meta), "--out", str(out), "--min-motion", "1", "--quiet"]) == 1
    assert f"run `cinedit data score {meta} --out SCORED` first" in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "kept.report.csv").exists()


def test_caption_suffix(clips: Path):
    row = {"text": "a cat", MOTION_SCORE_COLUMN: 4.49}
    assert training_caption("a cat", row, suffix=True) == "a cat 4 motion score."
    assert training_caption("a cat", row, suffix=False) == "a cat"
    assert training_caption("a cat", {MOTION_SCORE_COLUMN: math.nan}, suffix=True) == "a cat"  # unreadable when scored

    df, _ = score_meta(build_index(clips, progress=False)[0], progress=False)
    moving = int(np.flatnonzero(df["path"].str.endswith("moving.mp4"))[0])
    want = f"a pan over noise {round(df.at[moving, MOTION_SCORE_COLUMN])} motion score."
    item = (moving, 8, 64, 64)
    assert VideoDataset(df, DataConfig(motion_score_suffix=True))[item]["text"] == want
    assert VideoDataset(df, DataConfig())[item]["text"] == "a pan over noise"


def test_suffix_needs_the_column(clips: Path):
    df, _ = build_index(clips, progress=False)
    with pytest.raises(ConfigError, match="cinedit data score"):
        VideoDataset(df, DataConfig(motion_score_suffix=True))
    VideoDataset(df, DataConfig())  # off: no column needed
    cfg = apply_overrides(GeneratorTrainConfig(), ["--data.motion_score_suffix=true"])
    assert cfg.data.motion_score_suffix is True
    with pytest.raises(ConfigError, match="true or false"):
        DataConfig(motion_score_suffix="yes").validate()
