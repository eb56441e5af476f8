"""`cinedit data index` and `cinedit data filter` on real files written into tmp_path."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from functools import partial
from pathlib import Path

import av
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cinedit.cli import group_main
from cinedit.data.filter import filter_meta, frame_scores
from cinedit.data.index import build_index, find_media, report_path
from cinedit.data.meta import COLUMNS, MetaError, read_meta
from cinedit.data.video import write_video

TEXTURE = np.random.default_rng(0).integers(0, 256, (64, 96, 3), dtype=np.uint8)

main = partial(group_main, "data")


def moving(t: int = 16, h: int = 64, w: int = 64, step: int = 3) -> np.ndarray:
    """A random texture panning `step` pixels per frame: every frame pair differs."""
    return np.stack([np.roll(TEXTURE, i * step, axis=1)[:h, :w] for i in range(t)])


def static(t: int = 16, h: int = 64, w: int = 64) -> np.ndarray:
    return np.repeat(TEXTURE[None, :h, :w], t, axis=0)


def write_faststart(path: Path, frames: np.ndarray, fps: int = 24) -> None:
    """An mp4 with its index (moov) before the data, so that a cut copy still opens and demuxes."""
    with av.open(str(path), "w", format="mp4", options={"movflags": "faststart"}) as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.codec_context.thread_count = 1  # reproducible bytes, so the cuts below land the same way
        for arr in frames:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")))
        out.mux(stream.encode())


def cut(src: Path, dst: Path, frac: float) -> None:
    data = src.read_bytes()
    dst.write_bytes(data[: int(len(data) * frac)])


def image(path: Path, w: int, h: int) -> None:
    Image.fromarray(TEXTURE[:h, :w]).save(path)


def report_of(out: Path) -> dict[str, tuple[str, str]]:
    rep = pd.read_csv(out.with_name(f"{out.stem}.report.csv"), keep_default_na=False)
    assert list(rep.columns) == ["path", "reason", "detail"]
    return {Path(p).name: (r, d) for p, r, d in zip(rep["path"], rep["reason"], rep["detail"])}


@pytest.fixture
def good_dir(tmp_path: Path) -> Path:
    """Videos and images with captions from every source: .txt, .json, CSV (relative, absolute, bare name)."""
    root = tmp_path / "media"
    (root / "sub").mkdir(parents=True)
    write_video(root / "a.mp4", moving(16), fps=24)
    (root / "a.txt").write_text("  a cat on a mat \n")
    write_video(root / "sub" / "b.mp4", moving(12, h=48, w=64), fps=30)
    (root / "sub" / "b.json").write_text(json.dumps({"caption": "a dog"}))
    write_video(root / "sub" / "c.mp4", moving(10), fps=24)
    image(root / "d.png", w=40, h=30)
    image(root / "sub" / "e.jpg", w=32, h=48)
    image(root / "f.png", w=20, h=20)  # no caption anywhere
    (root / "notes.md").write_text("not media")
    write_video(root / ".hidden.mp4", moving(4), fps=24)
    pd.DataFrame(
        {
            "path": ["c.mp4", "d.png", str((root / "sub" / "e.jpg").absolute()), "a.mp4"],
            "text": ["bare name", "relative", "absolute", "the sidecar wins"],
        }
    ).to_csv(tmp_path / "captions.csv", index=False)
    return root


# ------------------------------------------------------------------------------------------------- index


def test_index_rows_and_captions(good_dir: Path, tmp_path: Path):
    df, report = build_index(good_dir, captions=tmp_path / "captions.csv", progress=False)
    assert report == []
    assert list(df.columns) == COLUMNS
    rows = {Path(p).relative_to(good_dir).as_posix(): r for p, r in zip(df["path"], df.to_dict("records"))}
    assert list(rows) == ["a.mp4", "d.png", "f.png", "sub/b.mp4", "sub/c.mp4", "sub/e.jpg"]  # sorted, hidden skipped
    assert all(os.path.isabs(p) for p in df["path"])
    assert {k: r["text"] for k, r in rows.items()} == {
        "a.mp4": "a cat on a mat",
        "d.png": "relative",
        "f.png": "",
        "sub/b.mp4": "a dog",
        "sub/c.mp4": "bare name",
        "sub/e.jpg": "absolute",
    }
    b = rows["sub/b.mp4"]
    assert (b["num_frames"], b["height"], b["width"], b["resolution"]) == (12, 48, 64, 48 * 64)
    assert b["aspect_ratio"] == pytest.approx(0.75) and b["fps"] == pytest.approx(30.0)
    assert (rows["a.mp4"]["num_frames"], rows["a.mp4"]["fps"]) == (16, pytest.approx(24.0))
    e = rows["sub/e.jpg"]
    assert (e["num_frames"], e["height"], e["width"], e["fps"], e["aspect_ratio"]) == (1, 48, 32, 0.0, 1.5)


def test_index_cli_relative_csv_and_parquet(good_dir: Path, tmp_path: Path, capsys):
    out = tmp_path / "out" / "meta.csv"
    args = ["index", str(good_dir), "--out", str(out), "--captions", str(tmp_path / "captions.csv"), "--quiet"]
    assert main([*args, "--relative"]) == 0
    assert "indexed 6 files (1 without a caption), 0 skipped" in capsys.readouterr().out
    raw = pd.read_csv(out)
    assert list(raw.columns) == COLUMNS and raw["path"][0] == "../media/a.mp4"
    meta = read_meta(out)
    assert all(Path(p).is_file() for p in meta["path"])
    assert report_of(out) == {}

    pq = tmp_path / "out" / "meta.parquet"
    assert main(["index", str(good_dir), "--out", str(pq), "--quiet"]) == 0
    back = read_meta(pq)
    assert list(back.columns) == COLUMNS and len(back) == 6
    assert back["text"].tolist() == ["a cat on a mat", "", "", "a dog", "", ""]  # sidecars only without --captions


def test_index_reports_bad_files(tmp_path: Path, capsys):
    root = tmp_path / "media"
    root.mkdir()
    write_video(root / "good.mp4", moving(24), fps=24)
    image(root / "good.png", w=64, h=64)
    (root / "corrupt.mp4").write_bytes(np.random.default_rng(1).bytes(4096))
    (root / "empty.mp4").write_bytes(b"")
    (root / "text.mp4").write_text("this is a caption, not a video\n" * 20)
    write_video(tmp_path / "full.mp4", moving(48), fps=24)
    cut(tmp_path / "full.mp4", root / "truncated.mp4", 0.6)  # moov at the end: the cut file does not open
    write_faststart(tmp_path / "fast.mp4", moving(48))
    cut(tmp_path / "fast.mp4", root / "truncated_fast.mp4", 0.6)  # opens, but frames are missing
    write_video(root / "one_frame.mp4", moving(1), fps=24)
    image(tmp_path / "big.png", w=96, h=64)
    cut(tmp_path / "big.png", root / "truncated.png", 0.5)

    out = tmp_path / "meta.csv"
    assert main(["index", str(root), "--out", str(out), "--quiet"]) == 0
    assert [Path(p).name for p in read_meta(out)["path"]] == ["good.mp4", "good.png"]
    rep = report_of(out)
    assert {k: v[0] for k, v in rep.items() if k not in ("truncated.mp4", "truncated_fast.mp4")} == {
        "corrupt.mp4": "unreadable",
        "empty.mp4": "empty",
        "one_frame.mp4": "too_short",
        "text.mp4": "not_media",
        "truncated.png": "truncated",
    }
    assert rep["truncated.mp4"][0] in ("unreadable", "truncated")
    assert rep["truncated_fast.mp4"][0] == "truncated" and "header says 48 frames" in rep["truncated_fast.mp4"][1]
    summary = capsys.readouterr().out
    assert "indexed 2 files" in summary and "7 skipped" in summary and "meta.report.csv" in summary


def test_index_last_frame_must_decode(tmp_path: Path):
    # Losing a few bytes keeps every packet in the index, so only decoding the last frame can tell.
    write_faststart(tmp_path / "fast.mp4", moving(48))
    root = tmp_path / "media"
    root.mkdir()
    (root / "tail.mp4").write_bytes((tmp_path / "fast.mp4").read_bytes()[:-5])
    df, report = build_index(root, progress=False)
    assert df.empty and [(Path(r["path"]).name, r["reason"]) for r in report] == [("tail.mp4", "truncated")]
    assert "last frame (index 47) does not decode" in report[0]["detail"]


def test_index_errors(tmp_path: Path, good_dir: Path, capsys):
    out = tmp_path / "meta.csv"
    assert main(["index", str(tmp_path / "nope"), "--out", str(out)]) == 1
    assert "no such folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no media here")
    assert main(["index", str(tmp_path / "empty"), "--out", str(out)]) == 1
    assert "no video" in capsys.readouterr().err and not out.exists()

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "empty.mp4").write_bytes(b"")
    assert main(["index", str(bad), "--out", str(out), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "all 1 media files were skipped" in err and "meta.report.csv" in err and not out.exists()
    assert report_of(out) == {"empty.mp4": ("empty", "0 bytes")}

    out.write_text("precious\n")
    assert main(["index", str(good_dir), "--out", str(out), "--quiet"]) == 1
    assert "--overwrite" in capsys.readouterr().err and out.read_text() == "precious\n"
    assert main(["index", str(good_dir), "--out", str(out), "--quiet", "--overwrite"]) == 0
    assert len(read_meta(out)) == 6
    assert main(["index", str(good_dir), "--out", str(tmp_path / "meta.txt")]) == 1
    assert ".csv or .parquet" in capsys.readouterr().err


def test_index_subprocess_exit_codes(good_dir: Path, tmp_path: Path):
    out = tmp_path / "meta.csv"
    cmd = [sys.executable, "-m", "cinedit", "data", "index", str(good_dir), "--out", str(out), "--quiet"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert len(read_meta(out)) == 6
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert res.returncode == 1 and "already exists" in res.stderr


# ------------------------------------------------------------------------------------------------ filter


@pytest.fixture
def clips(tmp_path: Path) -> Path:
    root = tmp_path / "clips"
    root.mkdir()
    write_video(root / "moving.mp4", moving(24), fps=24)
    write_video(root / "static.mp4", static(24), fps=24)
    write_video(root / "small.mp4", moving(24, h=32, w=32), fps=24)
    write_video(root / "short.mp4", moving(6), fps=24)  # 0.25 s
    write_video(root / "fast.mp4", moving(24), fps=48)  # stride 2
    image(root / "photo.png", w=64, h=64)
    return root


def test_frame_scores(clips: Path):
    s, m = frame_scores(clips / "static.mp4")
    assert s == 1.0 and m < 0.9
    s, m = frame_scores(clips / "moving.mp4")
    assert s == 0.0 and m > 10
    # Downscaled scoring stays close to full size on a smooth pan.
    assert frame_scores(clips / "moving.mp4", max_short_side=32)[0] == 0.0
    with pytest.raises(Exception, match="scoring needs 2"):
        frame_scores(clips / "moving.mp4", sample_frames=1)


def test_filter_cli(clips: Path, tmp_path: Path, capsys):
    meta = tmp_path / "meta.csv"
    assert main(["index", str(clips), "--out", str(meta), "--quiet"]) == 0
    out = tmp_path / "filtered.parquet"
    args = ["filter", str(meta), "--out", str(out), "--min-height", "48", "--min-duration", "0.5", "--quiet"]
    assert main(args) == 0
    kept = read_meta(out)
    assert list(kept.columns) == [*COLUMNS, "static_ratio", "frame_diff"]  # never the release's motion_score
    scores = {Path(p).name: (s, m) for p, s, m in zip(kept["path"], kept["static_ratio"], kept["frame_diff"])}
    assert sorted(scores) == ["fast.mp4", "moving.mp4", "photo.png"]
    assert scores["moving.mp4"][0] == 0.0 and scores["moving.mp4"][1] > 0.9
    assert math.isnan(scores["photo.png"][0]) and math.isnan(scores["photo.png"][1])
    rep = report_of(out)
    assert {k: v[0] for k, v in rep.items()} == {
        "short.mp4": "too_short",
        "small.mp4": "too_small",
        "static.mp4": "static",
    }
    assert "static_ratio 1.000" in rep["static.mp4"][1]
    assert "kept 3 of 6 rows, dropped 3" in capsys.readouterr().out

    # Same overwrite rule as index; an unchanged file proves nothing was lost.
    before = out.read_bytes()
    assert main(["filter", str(meta), "--out", str(out), "--drop-images", "--quiet"]) == 1
    assert "already exists" in capsys.readouterr().err and out.read_bytes() == before
    assert main(["filter", str(meta), "--out", str(out), "--drop-images", "--overwrite", "--quiet"]) == 0
    assert "photo.png" not in " ".join(read_meta(out)["path"])
    assert report_of(out)["photo.png"][0] == "image"

    csv = tmp_path / "filtered.csv"
    assert main(["filter", str(meta), "--out", str(csv), "--min-frame-diff", "1000", "--keep-images", "--quiet"]) == 0
    assert [Path(p).name for p in read_meta(csv)["path"]] == ["photo.png"]
    assert report_of(csv)["moving.mp4"][0] == "low_frame_diff"
    assert (
        "frame_diff" in report_of(csv)["moving.mp4"][1] and "--min-frame-diff 1000" in report_of(csv)["moving.mp4"][1]
    )

    # --min-motion/--max-motion bound only the release's motion_score (`cinedit data score`), which META lacks.
    for flag in ("--min-motion", "--max-motion"):
        bad = tmp_path / f"motion{flag}.csv"
        assert main(["filter", str(meta), "--out", str(bad), flag, "1", "--quiet"]) == 1
        err = capsys.readouterr().err
        assert f"cinedit data score {meta} --out SCORED" in err and "--min-frame-diff" in err
        assert not bad.exists() and not report_path(bad).exists()


def test_filter_unreadable_rows(clips: Path, tmp_path: Path, capsys):
    df, _ = build_index(clips, progress=False)
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(np.random.default_rng(2).bytes(2048))
    extra = df.iloc[[0, 0, 0]].copy()
    extra["path"] = [str(broken), str(tmp_path / "gone.mp4"), str(tmp_path / "gone.png")]
    kept, report = filter_meta(pd.concat([df, extra], ignore_index=True), min_frames=12, progress=False)
    reasons = {Path(r["path"]).name: r["reason"] for r in report}
    assert reasons == {
        "broken.mp4": "unreadable",
        "gone.mp4": "missing",
        "gone.png": "missing",
        "short.mp4": "too_short",
        "static.mp4": "static",
    }
    assert sorted(Path(p).name for p in kept["path"]) == ["fast.mp4", "moving.mp4", "photo.png", "small.mp4"]

    meta = tmp_path / "all_static.csv"
    df[df["path"].str.endswith("static.mp4")].to_csv(meta, index=False)
    assert main(["filter", str(meta), "--out", str(tmp_path / "none.csv"), "--quiet"]) == 1
    assert "all 1 rows were dropped" in capsys.readouterr().err and not (tmp_path / "none.csv").exists()
    assert main(["filter", str(tmp_path / "missing.csv"), "--out", str(tmp_path / "x.csv")]) == 1
    assert "cinedit data index" in capsys.readouterr().err


def test_unusable_meta_files_name_the_file_and_the_column(tmp_path, capsys):
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(MetaError, match="empty.csv: the file is empty"):
        read_meta(empty)
    nan = tmp_path / "nan.csv"
    nan.write_text(",".join(COLUMNS) + "\na.mp4,x,10,64,64,1,4096,25\nb.mp4,y,nan,64,64,1,4096,25\n")
    with pytest.raises(MetaError, match=r"nan.csv: column 'num_frames' needs a number in every row, not in row\(s\) 2"):
        read_meta(nan)
    assert main(["filter", str(nan), "--out", str(tmp_path / "out.csv")]) == 1
    assert "column 'num_frames'" in capsys.readouterr().err and not (tmp_path / "out.csv").exists()


def test_symlinked_folders_are_followed_and_loops_walked_once(tmp_path):
    # A folder of links to the real data used to be skipped without a report line.
    outside = tmp_path / "disk" / "shots"
    outside.mkdir(parents=True)
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(outside / "a.png")
    root = tmp_path / "dataset"
    root.mkdir()
    (root / "shots").symlink_to(outside, target_is_directory=True)
    (outside / "loop").symlink_to(root, target_is_directory=True)  # a link cycle must not recurse forever
    files = find_media(root)
    assert [p.relative_to(root).as_posix() for p in files] == ["shots/a.png"]
