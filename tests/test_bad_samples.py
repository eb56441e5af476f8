"""A file that goes bad after indexing (deleted, truncated) is reported once, skipped and replaced by the next sample
that fills the same bucket, deterministically; too many bad files stop the run with a clear message."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from cinedit.cli import main
from cinedit.configs import ConfigError, DataConfig
from cinedit.data.dataset import VideoDataset
from cinedit.data.meta import read_meta
from cinedit.data.video import MediaError
from cinedit.runtime.logs import read_metrics


@pytest.fixture
def meta(sample_data, tmp_path):
    """A copy of the sample data whose first video is deleted after indexing."""
    root = tmp_path / "data"
    shutil.copytree(sample_data[0], root)
    rows = read_meta(root / "meta.csv")
    videos = rows.index[rows["num_frames"] > 1]
    gone = rows.loc[videos[0], "path"]
    Path(gone).unlink()  # read_meta resolves paths against the meta file's folder
    return root / "meta.csv", gone, int(videos[0])


def test_an_unreadable_sample_is_replaced_by_the_next_that_fits(meta, capsys):
    path, gone, index = meta
    ds = VideoDataset(read_meta(path), DataConfig(meta=str(path)), replace_bad=True)
    item = ds[(index, 8, 64, 64, 7)]
    assert item["index"] != index and item["video"].shape == (3, 8, 64, 64)
    assert ds[(index, 8, 64, 64, 7)]["index"] == item["index"]  # the same replacement every time
    err = capsys.readouterr().err
    assert err.count("skipped an unreadable sample") == 1 and gone in err  # reported once, with its path
    with pytest.raises(MediaError, match="no such file"):  # outside training (caching, eval) the caller reports it
        VideoDataset(read_meta(path), DataConfig(meta=str(path)))[(index, 8, 64, 64, 7)]


def test_too_many_bad_samples_stop_with_a_clear_message(meta):
    path, _, _ = meta
    rows = read_meta(path)
    for p in rows.loc[rows["num_frames"] > 1, "path"][1:3]:
        Path(p).unlink()
    ds = VideoDataset(
        rows, DataConfig(meta=str(path), max_bad_fraction=0.0), replace_bad=True
    )  # at least one is always tolerated
    with pytest.raises(ConfigError, match="samples are unreadable.*max_bad_fraction"):
        for i in rows.index[rows["num_frames"] > 1]:
            ds[(int(i), 8, 64, 64, 0)]


def test_training_with_a_deleted_file_finishes_and_names_it(meta, tmp_path, capsys):
    path, gone, _ = meta
    argv = ["generator", "train", "debug", f"--data.meta={path}", f"--train.out_dir={tmp_path / 'run'}"]
    assert main([*argv, "--train.steps=12", "--train.eval_every=0", "--train.progress=false"]) == 0
    assert gone in capsys.readouterr().err
    assert [r["step"] for r in read_metrics(tmp_path / "run") if "loss" in r] == list(range(1, 13))
