"""One set of media rules for every reader: sparse and variable timestamps cover the time they claim, rotated clips and
photos read upright, a cut file is never padded (the frames that decode, or a clear `truncated` error), and
`cinedit data index` keeps every valid file and reports each broken one."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from cinedit.cli import main
from cinedit.configs import DataConfig
from cinedit.data.dataset import VideoDataset
from cinedit.data.index import build_index
from cinedit.data.meta import read_meta
from cinedit.data.video import ClipReader, MediaError, probe, read_image, read_video, write_video

SPARSE_PTS = [0, 1, 2, 6, 7, 12, 13, 14, 20, 24]  # a 25-slot AVI at 25 fps whose held frames have no packets


def level(i: int) -> int:
    return 20 + 20 * i


def write_sparse_avi(path: Path) -> Path:
    """The AVI FFmpeg writes from a variable-rate source: a 25 fps header over 25 slots, pictures only where the
    picture changes (the header counts 25 frames, 10 packets demux)."""
    with av.open(str(path), "w") as out:
        s = out.add_stream("mpeg4", rate=25)
        s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
        s.codec_context.qmin = s.codec_context.qmax = 2  # near-lossless grey levels
        for i, pts in enumerate(SPARSE_PTS):
            f = av.VideoFrame.from_ndarray(np.full((48, 64, 3), level(i), np.uint8), format="rgb24")
            f.pts, f.time_base = pts, Fraction(1, 25)
            out.mux(s.encode(f))
        out.mux(s.encode())
    return path


def write_rotated_mp4(path: Path, rotation: int = -90, n: int = 12) -> Path:
    """A phone-style clip: stored 64 wide x 32 high with a white left strip, and a display matrix of `rotation`
    degrees (counter-clockwise; a phone held upright writes -90)."""
    with av.open(str(path), "w") as out:
        s = out.add_stream("libx264", rate=24)
        s.width, s.height, s.pix_fmt = 64, 32, "yuv420p"
        s.set_display_rotation(rotation)
        for _ in range(n):
            a = np.zeros((32, 64, 3), np.uint8)
            a[:, :16] = 255
            out.mux(s.encode(av.VideoFrame.from_ndarray(a, format="rgb24")))
        out.mux(s.encode())
    return path


def write_vfr_mp4(path: Path) -> tuple[Path, list[float]]:
    """A variable-rate mp4 (a millisecond time base, frames 40 ms apart with one 400 ms hold)."""
    times = [0.04 * i for i in range(10)] + [0.76 + 0.04 * i for i in range(10)]
    with av.open(str(path), "w", format="mp4") as out:
        s = out.add_stream("libx264", rate=25)
        s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
        s.time_base = Fraction(1, 1000)
        s.codec_context.time_base = Fraction(1, 1000)
        s.options = {"crf": "0", "bf": "0"}
        for i, t in enumerate(times):
            f = av.VideoFrame.from_ndarray(np.full((48, 64, 3), level(i % 12), np.uint8), format="rgb24")
            f.pts, f.time_base = round(t * 1000), Fraction(1, 1000)
            out.mux(s.encode(f))
        out.mux(s.encode())
    return path, times


def write_faststart(path: Path, n: int = 40) -> Path:
    rng = np.random.default_rng(0)
    with av.open(str(path), "w", format="mp4", options={"movflags": "faststart"}) as out:
        s = out.add_stream("libx264", rate=24)
        s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
        s.codec_context.thread_count = 1
        for _ in range(n):
            out.mux(s.encode(av.VideoFrame.from_ndarray(rng.integers(0, 255, (48, 64, 3), np.uint8), format="rgb24")))
        out.mux(s.encode())
    return path


def write_truncated(path: Path, src: Path) -> Path:
    """The first half of a fast-start mp4: it opens, its header promises every frame, only about half decode."""
    data = src.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def grey_levels(video: torch.Tensor) -> list[int]:
    return [round(float(m)) for m in ((video + 1) * 127.5).mean(dim=(0, 2, 3))]


def test_sparse_timestamps_cover_the_time_they_claim(tmp_path):
    path = write_sparse_avi(tmp_path / "sparse.avi")
    assert probe(path).num_frames == 25 and probe(path, count_frames=True).num_frames == 25
    v = read_video(path, stride=1)
    assert v.shape[1] == 25
    # Slot k shows the last picture at or before k: held frames repeat the picture before them.
    shown = [max(i for i, p in enumerate(SPARSE_PTS) if p <= k) for k in range(25)]
    assert grey_levels(v) == pytest.approx([level(i) for i in shown], abs=3)
    # A seek into a held stretch still shows the held picture.
    with ClipReader(path) as r:
        assert [round(float(a.mean())) for a in r.read([4, 10, 23])] == pytest.approx(
            [level(2), level(4), level(8)], abs=3
        )


def test_variable_frame_rate_is_read_by_time(tmp_path):
    path, times = write_vfr_mp4(tmp_path / "vfr.mp4")
    info = probe(path, count_frames=True)
    v = read_video(path, stride=1, total_frames=info.num_frames)
    # Slot k shows the last frame whose time rounds to k or before (FFmpeg's fps filter rounds the same way), so the
    # 400 ms hold is eight held slots, not a jump.
    got = grey_levels(v)
    slots = [round(t * info.fps) for t in times]
    for k, g in enumerate(got):
        on_screen = max(i for i, s in enumerate(slots) if s <= k)
        assert g == pytest.approx(level(on_screen % 12), abs=3), k
    assert got.count(got[slots[9]]) >= 5
    assert info.num_frames / info.fps == pytest.approx(times[-1] + 0.04, abs=1.5 / info.fps)


def test_rotated_clips_read_upright_everywhere(tmp_path):
    path = write_rotated_mp4(tmp_path / "phone.mp4")
    info = probe(path)
    assert (info.height, info.width, info.rotation) == (64, 32, -90)
    v = read_video(path)
    assert v.shape[2:] == (64, 32)
    white = (v[0, 0] > 0).float()
    # Turned clockwise: the stored left strip is now the top 16 rows.
    assert white[:16].mean() == 1 and white[16:].mean() == 0
    sized = read_video(path, size=(48, 24))
    assert sized.shape[2:] == (48, 24) and (sized[0, 0, :10] > 0).all() and (sized[0, 0, 14:] < 0).all()
    upside_down = read_video(write_rotated_mp4(tmp_path / "flipped.mp4", rotation=180))
    assert upside_down.shape[2:] == (32, 64) and (upside_down[0, 0, :, 48:] > 0).all()


def test_exif_orientation_photos_read_upright(tmp_path):
    a = np.zeros((32, 64, 3), np.uint8)
    a[:, :16] = 255
    im = Image.fromarray(a)
    exif = im.getexif()
    exif[0x0112] = 6  # stored sideways: turn 90 degrees clockwise to show
    im.save(tmp_path / "phone.jpg", exif=exif, quality=95)
    info = probe(tmp_path / "phone.jpg")
    assert (info.height, info.width) == (64, 32)
    x = read_image(tmp_path / "phone.jpg")
    assert x.shape[2:] == (64, 32) and (x[0, 0, :12] > 0).all() and (x[0, 0, 20:] < 0).all()


def test_a_cut_file_is_never_padded(tmp_path):
    full = write_faststart(tmp_path / "full.mp4")
    cut = write_truncated(tmp_path / "cut.mp4", full)
    assert probe(cut).num_frames == 40  # the header still promises every frame
    with pytest.raises(MediaError, match="truncated: frame .* the header says 40 frames, decoding ends after frame"):
        read_video(cut, stride=1)
    # The frames that decode are read as they are.
    head = read_video(cut, num_frames=12, stride=1)
    assert torch.equal(head, read_video(full, num_frames=12, stride=1))
    # A dataset row indexed before the file was cut asks for frames that are gone: an error to report, not a pad.
    meta = tmp_path / "meta.csv"
    row = {"path": str(cut), "text": "x", "num_frames": 40, "height": 48, "width": 64, "fps": 24.0}
    pd.DataFrame([{**row, "aspect_ratio": 0.75, "resolution": 48 * 64}]).to_csv(meta, index=False)
    ds = VideoDataset(meta, DataConfig(frame_stride=1))
    with pytest.raises(MediaError, match="truncated"):
        ds[(0, 36, 32, 32, 0)]  # (row, frames, height, width, seed)


def test_reconstruct_of_a_cut_file_writes_nothing_and_says_why(tmp_path, capsys):
    from cinedit.tokenizer.loading import save_pretrained
    from cinedit.tokenizer.model import PRESETS, VideoDCAE

    torch.manual_seed(0)
    ckpt = save_pretrained(VideoDCAE(PRESETS["debug"]()), tmp_path / "tok")
    cut = write_truncated(tmp_path / "cut.mp4", write_faststart(tmp_path / "full.mp4"))
    out = tmp_path / "rec.mp4"
    code = main(["tokenizer", "reconstruct", str(cut), "--out", str(out), "--ckpt", str(ckpt), "--size", "32", "32"])
    err = capsys.readouterr().err
    assert code != 0 and "truncated" in err and "decoding ends after frame" in err and not out.exists()
    # Asking for the frames that decode works.
    assert main(["tokenizer", "reconstruct", str(cut), "--out", str(out), "--ckpt", str(ckpt), "--size", "32", "32",
                 "--max-frames", "12"]) == 0  # fmt: skip
    assert probe(out).num_frames == 12


def test_index_keeps_every_valid_file_and_reports_each_broken_one(tmp_path, capsys):
    root = tmp_path / "media"
    root.mkdir()
    write_sparse_avi(root / "sparse.avi")
    write_rotated_mp4(root / "phone.mp4")
    write_vfr_mp4(root / "vfr.mp4")
    write_video(root / "plain.mp4", np.zeros((10, 32, 48, 3), np.uint8), fps=24)
    write_truncated(root / "cut.mp4", write_faststart(tmp_path / "full.mp4"))
    (root / "empty.mp4").write_bytes(b"")
    (root / "noise.avi").write_bytes(np.random.default_rng(0).bytes(3000))
    out = tmp_path / "meta.csv"
    assert main(["data", "index", str(root), "--out", str(out), "--quiet"]) == 0
    df = read_meta(out).set_index(read_meta(out)["path"].map(lambda p: Path(p).name))
    assert sorted(df.index) == ["phone.mp4", "plain.mp4", "sparse.avi", "vfr.mp4"]
    assert (df.loc["phone.mp4", "height"], df.loc["phone.mp4", "width"]) == (64, 32)  # upright
    assert df.loc["sparse.avi", "num_frames"] == 25
    report = pd.read_csv(tmp_path / "meta.report.csv").set_index("path")
    reasons = {Path(p).name: r for p, r in report["reason"].items()}
    assert reasons == {"cut.mp4": "truncated", "empty.mp4": "empty", "noise.avi": "unreadable"}
    assert "header says 40 frames" in report["detail"][report.index.str.endswith("cut.mp4")].iloc[0]
    df2, rep2 = build_index(root, progress=False)
    assert len(df2) == 4 and len(rep2) == 3
