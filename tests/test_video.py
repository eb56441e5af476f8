"""PyAV video I/O: round trips, strides, seeking, resize-to-fill + centre crop, images, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from cinedit.data.video import (
    ClipReader,
    MediaError,
    clip_indices,
    fill_size,
    frame_stride,
    probe,
    read_image,
    read_video,
    write_video,
)


def level(i: int) -> int:
    """Grey level that identifies frame i after lossy coding."""
    return 16 + (i * 37) % 224


def numbered_video(path, n: int, fps: float = 24, size=(64, 64), gop: int | None = None):
    frames = np.stack([np.full((*size, 3), level(i), np.uint8) for i in range(n)])
    return write_video(path, frames, fps, crf=0, gop=gop)


def frame_ids(video: torch.Tensor) -> list[int]:
    """Recover each frame's grey level from a (C, T, H, W) clip in [-1, 1]."""
    return [round(float(m)) for m in ((video + 1) * 127.5).mean(dim=(0, 2, 3))]


def test_stride_and_indices():
    assert [frame_stride(f) for f in (24, 25, 30, 48, 50, 60, 120, 0)] == [1, 2, 2, 2, 3, 3, 5, 1]
    assert clip_indices(10, 4, 3) == [0, 3, 6, 9]
    assert clip_indices(20, 4, 2, start=5) == [5, 7, 9, 11]
    rng = np.random.default_rng(0)
    starts = {clip_indices(100, 8, 2, rng=rng)[0] for _ in range(50)}
    assert len(starts) > 10 and max(starts) <= 100 - 15
    with pytest.raises(MediaError, match="needs 10 source frames"):
        clip_indices(9, 4, 3)


def test_roundtrip_probe_and_values(tmp_path):
    path = numbered_video(tmp_path / "v.mp4", 12, fps=30)
    info = probe(path)
    assert (info.num_frames, info.height, info.width) == (12, 64, 64) and info.fps == pytest.approx(30)
    v = read_video(path)  # stride ceil(30/24) = 2 -> 6 frames
    assert v.shape == (3, 6, 64, 64) and v.dtype == torch.float32
    assert -1 <= v.min() and v.max() <= 1
    assert frame_ids(v) == pytest.approx([level(i) for i in range(0, 12, 2)], abs=2)


def test_seek_decodes_only_near_the_clip(tmp_path):
    path = numbered_video(tmp_path / "long.mp4", 600, gop=24)
    with ClipReader(path) as reader:
        frames = reader.read([500, 503, 506, 509])
        decoded = reader.frames_decoded
    got = [round(float(f.mean())) for f in frames]
    assert got == pytest.approx([level(i) for i in (500, 503, 506, 509)], abs=2)
    assert decoded < 40, f"decoded {decoded} frames to take 4 from a 600-frame file"
    clip = read_video(path, num_frames=4, stride=3, start=500)
    assert frame_ids(clip) == pytest.approx([level(i) for i in (500, 503, 506, 509)], abs=2)


def test_resize_to_fill_and_centre_crop(tmp_path):
    assert fill_size(100, 200, (64, 64)) == (64, 128)
    assert fill_size(200, 100, (32, 96)) == (192, 96)
    # Green bars left and right of a grey centre: a square crop must show only grey.
    frame = np.full((100, 200, 3), 128, np.uint8)
    frame[:, :50] = frame[:, 150:] = (0, 255, 0)
    frames = np.stack([frame] * 4)
    path = write_video(tmp_path / "bars.mp4", frames, 24, crf=0)
    v = read_video(path, num_frames=4, size=(64, 64))
    assert v.shape == (3, 4, 64, 64)
    rgb = (v[:, :, 2:-2, 2:-2] + 1) * 127.5
    assert (rgb - 128).abs().max() < 12
    Image.fromarray(frame).save(tmp_path / "bars.png")
    img = read_image(tmp_path / "bars.png", (64, 64))
    assert img.shape == (3, 1, 64, 64) and ((img[:, :, 2:-2, 2:-2] + 1) * 127.5 - 128).abs().max() < 12


def test_images_are_one_frame(tmp_path):
    Image.fromarray(np.full((40, 60), 200, np.uint8)).save(tmp_path / "g.png")  # greyscale -> RGB
    img = read_video(tmp_path / "g.png")
    assert img.shape == (3, 1, 40, 60)
    assert float(((img + 1) * 127.5).mean()) == pytest.approx(200, abs=1)
    assert probe(tmp_path / "g.png").is_image


def test_bad_files_raise_media_error(tmp_path):
    (tmp_path / "empty.mp4").write_bytes(b"")
    (tmp_path / "text.mp4").write_text("not a video\n" * 10)
    (tmp_path / "bad.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(MediaError, match="empty"):
        probe(tmp_path / "empty.mp4")
    with pytest.raises(MediaError, match="not a readable video"):
        read_video(tmp_path / "text.mp4")
    with pytest.raises(MediaError, match="not a readable image"):
        read_image(tmp_path / "bad.png")
    path = numbered_video(tmp_path / "short.mp4", 5)
    with pytest.raises(MediaError, match="needs 8 source frames"):
        read_video(path, num_frames=8)


def test_write_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="even height and width"):
        write_video(tmp_path / "odd.mp4", np.zeros((2, 33, 32, 3), np.uint8), 24)
    with pytest.raises(ValueError, match="uint8"):
        write_video(tmp_path / "f.mp4", np.zeros((2, 32, 32, 3), np.float32), 24)
    assert not list(tmp_path.iterdir())


def test_16_bit_and_transparent_images_read_as_they_look(tmp_path):
    # A 16-bit grey ramp read almost white (8-bit mean 123.5 -> 253); alpha was dropped, showing the hidden RGB.
    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    x = (read_image(tmp_path / "g16.png") + 1) * 127.5
    assert abs(float(x.mean()) - 127.5) < 1 and torch.equal(x[0], x[1])
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0] = 255  # red hidden under alpha 0 on the left half, shown opaque on the right
    rgba[:, 4:, 3] = 255
    Image.fromarray(rgba).save(tmp_path / "a.png")
    y = ((read_image(tmp_path / "a.png") + 1) * 127.5).round()[:, 0]  # (3, H, W)
    assert torch.all(y[:, :, :4] == 255)  # transparent: the white background
    assert torch.all(y[0, :, 4:] == 255) and torch.all(y[1:, :, 4:] == 0)  # opaque red stays red
