"""The sample dataset: built from packaged real clips and photographs, indexed, filtered, loaded."""

from __future__ import annotations

from functools import partial

import numpy as np
import pandas as pd
import pytest

from cinedit.cli import group_main
from cinedit.configs import DataConfig
from cinedit.data.dataset import VideoDataset
from cinedit.data.meta import COLUMNS, read_meta
from cinedit.data.sample import CLIPS, PHOTOS, build_sample_data
from cinedit.data.sampler import build_dataloader, build_sampler
from cinedit.data.video import read_video

data_main = partial(group_main, "data")


def test_sample_data_is_indexed(sample_data):
    root, meta = sample_data
    df = read_meta(meta)
    assert list(df.columns[: len(COLUMNS)]) == COLUMNS
    assert len(df) == len(CLIPS) + len(PHOTOS)
    assert (df["text"].str.len() > 20).all(), "every sample has a caption"
    videos = df[df.num_frames > 1]
    assert len(videos) == len(CLIPS)
    for clip in CLIPS:
        row = videos[videos.path.str.endswith(f"{clip.name}.mp4")].iloc[0]
        assert row.num_frames == clip.stop - clip.start
        assert max(row.height, row.width) <= 640 and row.height % 2 == 0
    # Paths are relative in the file, so the folder can move.
    assert not pd.read_csv(meta)["path"].str.startswith("/").any()


def test_build_refuses_to_overwrite(sample_data):
    root, _ = sample_data
    with pytest.raises(FileExistsError, match="--overwrite"):
        build_sample_data(root)


def test_index_and_filter_commands_on_sample_data(sample_data, tmp_path):
    root, _ = sample_data
    out = tmp_path / "meta.parquet"
    assert data_main(["index", str(root), "--out", str(out), "--quiet"]) == 0
    assert len(read_meta(out)) == len(CLIPS) + len(PHOTOS)
    filtered = tmp_path / "filtered.csv"
    assert data_main(["filter", str(out), "--out", str(filtered), "--min-height", "200", "--quiet"]) == 0
    df = read_meta(filtered)
    assert (
        (df.height >= 200).all()
        and {"static_ratio", "frame_diff"} <= set(df.columns)
        and "motion_score" not in df.columns
    )
    vids = df[df.num_frames > 1]
    assert len(vids) >= 5 and (vids.frame_diff > 1).all() and (vids.static_ratio <= 0.3).all()
    dropped = pd.read_csv(tmp_path / "filtered.report.csv")
    assert set(dropped.reason) == {"too_small"}  # the 176x144 carphone clips
    assert len(dropped) == 2


def test_sample_batches_load(sample_data):
    _, meta = sample_data
    cfg = DataConfig(meta=str(meta), seed=3)
    dataset = VideoDataset(meta, cfg)
    loader = build_dataloader(dataset, build_sampler(dataset, cfg))
    batch = next(iter(loader))
    video = batch["video"]
    assert video.ndim == 5 and video.shape[1] == 3 and -1 <= video.min() and video.max() <= 1
    assert video.std() > 0.1, "real frames, not blank"
    assert np.all([len(t) > 0 for t in batch["text"]])


def test_rebuild_is_reproducible_and_keeps_other_files(sample_data, tmp_path):
    root, _ = sample_data
    out = tmp_path / "data"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    build_sample_data(out, overwrite=True, progress=False)
    assert (out / "notes.txt").read_text() == "mine"
    assert (out / "meta.csv").read_text() == (root / "meta.csv").read_text()
    for clip in CLIPS[:3]:
        # x264 output is usually byte-identical, but not always for the first encode of a process.
        a, b = (read_video(d / f"videos/{clip.name}.mp4", num_frames=8) for d in (out, root))
        assert (a - b).abs().mean() * 127.5 < 1.0
