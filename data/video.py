"""Video and image I/O with PyAV: probe, seek-and-sample clip reading, resize-to-fill + centre crop, mp4 writing.

Tensors follow the project's pixel convention: float (C, T, H, W) in [-1, 1]; an image is T = 1.
"""

from __future__ import annotations

import math
import os
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch
from PIL import Image, ImageOps

from cinedit.runtime.files import atomic_path

VIDEO_EXTS = {".mp4", ".mov", ".mkv", ".avi", ".webm", ".m4v", ".mpg", ".mpeg", ".flv", ".wmv", ".ts", ".3gp"}
IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
TARGET_FPS = 24  # clips are sampled at stride ceil(fps / 24) so that training sees roughly 24 fps


class MediaError(RuntimeError):
    """A file that cannot be read as the video or image it claims to be."""


@dataclass
class VideoInfo:
    """What `probe` learns about a file without decoding it all."""

    path: str
    num_frames: int
    height: int
    width: int
    fps: float
    is_image: bool = False
    # Counter-clockwise degrees the file's display matrix turns its stored frames by (a phone's portrait clip: -90);
    # height and width above are the displayed ones, and every reader turns the frames the same way.
    rotation: int = 0

    @property
    def duration(self) -> float:
        return self.num_frames / self.fps if self.fps > 0 else 0.0

    @property
    def aspect_ratio(self) -> float:
        """height / width, the convention of the metadata columns."""
        return self.height / self.width


def is_image(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTS


def is_video(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in VIDEO_EXTS


def frame_stride(fps: float, target_fps: float = TARGET_FPS) -> int:
    """Default temporal stride: ceil(fps / 24), at least 1."""
    return max(1, math.ceil(fps / target_fps - 1e-6)) if fps > 0 else 1


def num_sampled_frames(num_frames: int, stride: int) -> int:
    """How many frames a clip of `num_frames` source frames gives at `stride`."""
    return 0 if num_frames <= 0 else (num_frames - 1) // stride + 1


def _open(path: str | os.PathLike) -> av.container.InputContainer:
    path = str(path)
    if not os.path.isfile(path):
        raise MediaError(f"{path}: no such file")
    if os.path.getsize(path) == 0:
        raise MediaError(f"{path}: empty file (0 bytes)")
    try:
        container = av.open(path, metadata_errors="ignore")
    except (av.error.FFmpegError, UnicodeDecodeError, ValueError) as e:
        raise MediaError(f"{path}: not a readable video ({e})") from None
    if not container.streams.video:
        container.close()
        raise MediaError(f"{path}: has no video stream")
    return container


def _stream_fps(stream) -> float:
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    return float(rate) if rate else 0.0


def probe(path: str | os.PathLike, count_frames: bool = False) -> VideoInfo:
    """Read size, frame count, fps and rotation from the container header (or the image header).

    The frame count comes from the header when it has one; `count_frames=True` (or a header without one) measures
    the file's timeline instead (`timeline_frames`: demuxing only, nothing decoded), which is the count every reader
    can deliver. The rotation needs the first frame decoded (FFmpeg attaches the display matrix to frames); height
    and width are the displayed ones, so a phone's portrait clip reads as portrait everywhere.
    """
    path = str(path)
    if is_image(path):
        if not os.path.isfile(path) or os.path.getsize(path) == 0:
            raise MediaError(f"{path}: {'empty file (0 bytes)' if os.path.isfile(path) else 'no such file'}")
        try:
            with Image.open(path) as im:
                w, h = im.size
                rotation = EXIF_TURNS.get(im.getexif().get(EXIF_ORIENTATION, 1), 0)
        except Exception as e:  # PIL raises many types for bad files
            raise MediaError(f"{path}: not a readable image ({e})") from None
        if quarter_turns(rotation) % 2:
            h, w = w, h
        return VideoInfo(path, 1, h, w, 0.0, is_image=True, rotation=rotation)
    with _open(path) as container:
        stream = container.streams.video[0]
        fps = _stream_fps(stream)
        w, h = stream.codec_context.width, stream.codec_context.height
        if not w or not h:
            raise MediaError(f"{path}: the video stream reports no frame size")
        rotation = _first_rotation(container, stream)
        n = stream.frames
        if not n or count_frames:
            container.seek(0, stream=stream)
            n = _timeline(container, stream, fps)
    if quarter_turns(rotation) % 2:
        h, w = w, h
    return VideoInfo(path, int(n), int(h), int(w), fps, rotation=rotation)


# EXIF orientation tag -> the counter-clockwise degrees `ImageOps.exif_transpose` turns the stored image by (5 and 7
# also mirror it). Only the turn matters for the displayed height and width.
EXIF_ORIENTATION = 0x0112
EXIF_TURNS = {3: 180, 5: 90, 6: -90, 7: -90, 8: 90}


def quarter_turns(rotation: float) -> int:
    """Counter-clockwise quarter turns (0-3) of a display rotation in degrees; flips are not applied."""
    return round((rotation or 0) / 90) % 4


def _frame_rotation(frame) -> int:
    # PyAV 14+ reads the display matrix of each decoded frame; older releases cannot see it.
    return int(getattr(frame, "rotation", 0) or 0)


def _first_rotation(container, stream) -> int:
    try:
        for frame in container.decode(stream):
            return _frame_rotation(frame)
    except av.error.FFmpegError:
        pass  # a first frame that does not decode is the readers' and `data index`'s to report
    return 0


def _timeline(container, stream, fps: float) -> int:
    """How many frame slots at `fps` the demuxed packets cover (`_packet_span`'s first number)."""
    return _packet_span(container, stream, fps)[0]


def _packet_span(container, stream, fps: float) -> tuple[int, int]:
    """(slots, last): round(end time x fps), where the end time is the largest packet timestamp plus its duration,
    and the slot of the last packet that carries a picture. Sparse timestamps (an AVI whose held frames have no
    packets, a variable-rate phone clip) count the time they cover, not their packets; a truncated file counts only
    what it holds. Packets without timestamps count one slot each."""
    tb = float(stream.time_base) if stream.time_base else (1.0 / fps if fps > 0 else 1.0)
    start = stream.start_time or 0
    end, counted, last = 0.0, 0, -1
    try:
        for p in container.demux(stream):
            ts = p.pts if p.pts is not None else p.dts
            if ts is None:
                counted += p.size > 0
                continue
            dur = p.duration * tb if p.duration else (1.0 / fps if fps > 0 else 0.0)
            end = max(end, (ts - start) * tb + dur)
            if p.size > 0:
                last = max(last, round((ts - start) * tb * fps))
    except av.error.FFmpegError:
        pass  # the file ends early: what demuxed so far is what it holds
    slots = max(round(end * fps) if fps > 0 else 0, counted)
    return slots, last if last >= 0 else counted - 1


def fill_size(h: int, w: int, size: tuple[int, int]) -> tuple[int, int]:
    """The (h, w) to resize to so that a centre crop of `size` fills the frame without bars."""
    th, tw = size
    scale = max(th / h, tw / w)
    return max(th, round(h * scale)), max(tw, round(w * scale))


def _center_crop(arr: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Centre-crop the last-but-one two axes of an (..., H, W, C) array."""
    th, tw = size
    h, w = arr.shape[-3], arr.shape[-2]
    top, left = (h - th) // 2, (w - tw) // 2
    return arr[..., top : top + th, left : left + tw, :]


def _to_tensor(frames: np.ndarray) -> torch.Tensor:
    """(T, H, W, C) uint8 -> (C, T, H, W) float in [-1, 1]."""
    frames = np.ascontiguousarray(frames)
    if not frames.flags.writeable:
        frames = frames.copy()
    x = torch.from_numpy(frames).permute(3, 0, 1, 2).float()
    return x.div_(127.5).sub_(1.0)


class ClipReader:
    """Decode chosen frame indices of one video, seeking to the nearest keyframe before the first.

    Index k is the frame slot at time k / fps: each decoded frame goes to the slot its timestamp rounds to (as
    FFmpeg's fps filter places them; of two in one slot, the later), and a slot between two frames shows the earlier
    one (held), so sparse and variable timestamps cover the time they claim.
    Frames are turned upright by the file's display rotation. A read never pads: an index past what the file
    decodes raises `MediaError` naming how far it gets ("truncated").

    `frames_decoded` counts decoded frames, which lets tests and benchmarks check that a short clip
    from a long file does not decode the whole file.
    """

    def __init__(self, path: str | os.PathLike, threads: int = 0):
        self.path = str(path)
        self.container = _open(self.path)
        self.stream = self.container.streams.video[0]
        # Frame-level threading adds latency without throughput for short clips; slice threads help.
        self.stream.thread_type = "AUTO"
        if threads:
            self.stream.codec_context.thread_count = threads
        self.fps = _stream_fps(self.stream)
        self.num_frames = self.stream.frames or 0
        self.frames_decoded = 0
        tb = self.stream.time_base
        self._tb = float(tb) if tb else 1.0 / max(self.fps, 1.0)
        self._start = self.stream.start_time or 0
        self._span: tuple[int, int] | None = None
        # `decode_all`: every decoded (slot, frame) of the file, and the error that ended decoding (or None).
        self._all: list[tuple[int, av.VideoFrame]] | None = None
        self._all_failure: Exception | None = None

    def close(self) -> None:
        self.container.close()

    def __enter__(self) -> ClipReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _index_of(self, frame) -> int:
        pts = frame.pts if frame.pts is not None else frame.dts
        if pts is None:
            return -1
        return round((pts - self._start) * self._tb * self.fps)

    def packet_span(self) -> tuple[int, int]:
        """(frame slots the file's packets cover, slot of the last picture packet); measured once, by demuxing."""
        if self._span is None:
            with _open(self.path) as container:
                self._span = _packet_span(container, container.streams.video[0], self.fps)
        return self._span

    def decode_all(self) -> ClipReader:
        """Decode the whole file once and keep its frames (and the packet span), then close the file: later `read`s
        pick from memory and give the same frames a seeking read decodes. For `MediaCache`; returns self."""
        if self._all is None:
            frames: list[tuple[int, av.VideoFrame]] = []
            try:
                self.packet_span()
                try:
                    for frame in self.container.decode(self.stream):
                        self.frames_decoded += 1
                        frames.append((self._index_of(frame), frame))
                except av.error.FFmpegError as e:
                    self._all_failure = e
            finally:
                self.close()  # also when something else goes wrong: the frames outlive the file
            self._all = frames
        return self

    @property
    def nbytes(self) -> int:
        """Bytes of the frames `decode_all` keeps (0 before)."""
        return sum(plane.buffer_size for _, frame in self._all or () for plane in frame.planes)

    def _decoded(self, first: int) -> Iterator[tuple[int, av.VideoFrame]]:
        """(slot, frame) from the keyframe at or before slot `first` on (from memory after `decode_all`)."""
        if self._all is not None:
            yield from self._all
            if self._all_failure is not None:
                raise self._all_failure
            return
        if first > 0 and self.fps > 0:
            target = self._start + int(first / self.fps / self._tb)
            try:
                self.container.seek(target, stream=self.stream, backward=True, any_frame=False)
            except av.error.FFmpegError:
                self.container.seek(0, stream=self.stream)
        for frame in self.container.decode(self.stream):
            self.frames_decoded += 1
            yield self._index_of(frame), frame

    def read(self, indices: list[int], size: tuple[int, int] | None = None) -> np.ndarray:
        """Decode the frames at `indices` (sorted, ascending) as (T, H, W, 3) uint8, upright.

        With `size=(H, W)` each frame is resized to fill and centre-cropped; the resize runs in
        swscale on the decoded frame, before any conversion to a tensor.
        """
        if not indices:
            raise ValueError("no frame indices to read")
        if any(b < a for a, b in zip(indices, indices[1:])):
            raise ValueError("frame indices must be ascending")
        want = list(indices)
        out: list[np.ndarray] = []
        memo: list = [None, None]  # (frame, array): a held frame is converted once however many indices show it

        def convert(frame) -> np.ndarray:
            if memo[0] is not frame:
                memo[0], memo[1] = frame, self._convert(frame, size)
            return memo[1]

        prev, last_idx, failure, pos = None, -1, None, 0
        try:
            for idx, frame in self._decoded(want[0]):
                # Slots before this frame show the last frame before it (one slot holding two frames shows the
                # later); before the first decoded frame, this one.
                while pos < len(want) and want[pos] < idx:
                    out.append(convert(prev if prev is not None else frame))
                    pos += 1
                prev, last_idx = frame, max(last_idx, idx)
                if pos == len(want):
                    break
        except av.error.FFmpegError as e:
            failure = e
        while pos < len(want) and want[pos] <= last_idx:
            out.append(convert(prev))
            pos += 1
        if pos < len(want) and failure is None and prev is not None:
            # The decoder reached the end. When it delivered the file's last picture, that frame stays on screen to
            # the end of the file's timeline (one slot of rounding allowed); pictures lost at the end (a cut file
            # whose decoder threads swallow the error) or a decoding error hold nothing.
            slots, last_packet = self.packet_span()
            end = max(slots, last_idx + 2) if last_idx >= last_packet else 0
            while pos < len(want) and want[pos] < end:
                out.append(convert(prev))
                pos += 1
        if pos < len(want):
            raise MediaError(self._shortfall(want[pos], last_idx, failure))
        return np.stack(out)

    def _shortfall(self, wanted: int, last_idx: int, failure) -> str:
        why = f": {failure}" if failure is not None else ""
        if last_idx < 0:
            return f"{self.path}: no decodable frame at or after index {wanted} (decoding failed{why})"
        header = f"the header says {self.num_frames} frames, " if self.num_frames else ""
        return (
            f"{self.path}: truncated: frame {wanted} was asked for, {header}decoding ends after frame {last_idx}"
            f"{why}; re-download or re-encode the file (or read at most {last_idx + 1} frames)"
        )

    @staticmethod
    def _convert(frame, size: tuple[int, int] | None) -> np.ndarray:
        turns = quarter_turns(_frame_rotation(frame))
        if size is None:
            arr = frame.to_ndarray(format="rgb24")
        else:
            # Fill and crop the displayed (turned) frame: a sideways-stored frame resizes with its sides swapped.
            th, tw = size if turns % 2 == 0 else size[::-1]
            h, w = fill_size(frame.height, frame.width, (th, tw))
            # AREA averages when shrinking (no aliasing); BICUBIC when enlarging.
            interp = "AREA" if h <= frame.height else "BICUBIC"
            arr = frame.reformat(width=w, height=h, format="rgb24", interpolation=interp).to_ndarray()
            arr = _center_crop(arr, (th, tw))
        return np.ascontiguousarray(np.rot90(arr, turns)) if turns else arr


def clip_indices(
    num_frames: int,
    num_samples: int | None,
    stride: int,
    start: int | None = None,
    rng: np.random.Generator | None = None,
) -> list[int]:
    """Source indices of a clip: `num_samples` frames at `stride`, starting at `start`.

    With `start=None` the clip starts at a random position drawn from `rng` (a random temporal crop),
    or at 0 without `rng`. `num_samples=None` takes every frame at the stride.
    """
    avail = num_sampled_frames(num_frames, stride)
    if num_samples is None:
        num_samples = avail
    if num_samples > avail:
        raise MediaError(
            f"clip of {num_samples} frames at stride {stride} needs {(num_samples - 1) * stride + 1} source frames, "
            f"the video has {num_frames}"
        )
    span = (num_samples - 1) * stride + 1
    slack = num_frames - span
    if start is None:
        start = int(rng.integers(0, slack + 1)) if rng is not None else 0
    if not 0 <= start <= slack:
        raise ValueError(f"start {start} out of range [0, {slack}] for {num_samples} frames at stride {stride}")
    return [start + i * stride for i in range(num_samples)]


def read_video(
    path: str | os.PathLike,
    num_frames: int | None = None,
    stride: int | None = None,
    size: tuple[int, int] | None = None,
    start: int | None = None,
    rng: np.random.Generator | None = None,
    total_frames: int | None = None,
    cache: MediaCache | None = None,
) -> torch.Tensor:
    """Read a clip as float (C, T, H, W) in [-1, 1]; images come back with T = 1.

    Args:
        num_frames: frames to return (all frames at the stride if None).
        stride: temporal stride in source frames; default ceil(fps / 24).
        size: (H, W) target; the frame is resized to fill it and centre-cropped. None keeps the size.
        start: first source frame; None draws it from `rng` (or 0 without one).
        total_frames: the file's frame count if already known (e.g. from the metadata index);
            spares the header probe.
        cache: keep the decoded file in this `MediaCache` and read from it (the same pixels).
    """
    if is_image(path):
        return read_image(path, size) if cache is None else image_tensor(cache.image(path), size)
    if cache is not None:
        return _clip(cache.clip(path), path, num_frames, stride, size, start, rng, total_frames)
    with ClipReader(path) as reader:
        return _clip(reader, path, num_frames, stride, size, start, rng, total_frames)


def _clip(reader: ClipReader, path, num_frames, stride, size, start, rng, total_frames) -> torch.Tensor:
    n = total_frames or reader.num_frames
    if not n:
        n = probe(path).num_frames
    stride = stride or frame_stride(reader.fps)
    indices = clip_indices(n, num_frames, stride, start, rng)
    return _to_tensor(reader.read(indices, size))


class MediaCache:
    """Decoded files kept in memory for `read_video`, least recently used out first, within `max_bytes`.

    A clip is decoded whole on its first read (`ClipReader.decode_all`; its frames stay in the decoder's YUV, about
    1.5 bytes a pixel) and an image is kept as its upright RGB copy (`to_rgb`), so later reads only resize and crop:
    the same pixels as an uncached read. For a training set that fits in memory and is read again and again (the
    tokenizer's few sample clips: decoding was 15% of a CPU step). A file larger than the whole budget is read but
    not kept. Each process keeps its own: a pickled cache (a DataLoader worker's copy) starts empty.
    """

    def __init__(self, max_bytes: int):
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, tuple[object, int]] = OrderedDict()
        self.nbytes, self.hits, self.misses = 0, 0, 0

    def __getstate__(self) -> dict:
        return {"max_bytes": self.max_bytes}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["max_bytes"])

    def __len__(self) -> int:
        return len(self._items)

    def _get(self, path: str | os.PathLike, load: Callable[[str], object], size_of: Callable[[object], int]):
        key = str(path)
        if key in self._items:
            self.hits += 1
            self._items.move_to_end(key)
            return self._items[key][0]
        self.misses += 1
        value = load(key)
        n = size_of(value)
        if n <= self.max_bytes:
            while self._items and self.nbytes + n > self.max_bytes:
                _, (_, gone) = self._items.popitem(last=False)
                self.nbytes -= gone
            self._items[key] = (value, n)
            self.nbytes += n
        return value

    def clip(self, path: str | os.PathLike) -> ClipReader:
        """The file's reader with every frame decoded (`ClipReader.decode_all`)."""
        return self._get(path, lambda p: ClipReader(p).decode_all(), lambda r: r.nbytes)

    def image(self, path: str | os.PathLike) -> Image.Image:
        """The upright 8-bit RGB image (`load_image`)."""
        return self._get(path, load_image, lambda im: im.width * im.height * 3)


# What transparent pixels of an image become (`to_rgb`): white, as a page or a viewer shows them.
ALPHA_BACKGROUND = (255, 255, 255)


def to_rgb(im: Image.Image) -> Image.Image:
    """An 8-bit RGB, upright copy of any PIL image: the EXIF orientation applied (a phone photo stored sideways reads
    as it is shown), 16- and 32-bit integer images scaled down (not clipped: `convert("RGB")` saturates a 16-bit grey
    image to near white), transparency composited over `ALPHA_BACKGROUND` (dropping alpha would show whatever RGB the
    transparent pixels hide)."""
    im = ImageOps.exif_transpose(im)
    if im.mode.startswith("I") or im.mode == "F":
        arr = np.asarray(im, dtype=np.float64)
        top = 65535.0 if im.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        if im.mode.startswith("I") and arr.max(initial=0) > 65535:
            top = float(2**32 - 1)
        if im.mode == "F":
            top = 1.0 if arr.max(initial=0) <= 1.0 else 255.0
        im = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*ALPHA_BACKGROUND, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")


def load_image(path: str | os.PathLike) -> Image.Image:
    """An image file as an upright 8-bit RGB PIL image (`to_rgb`); MediaError when it is missing or unreadable."""
    path = str(path)
    if not os.path.isfile(path) or os.path.getsize(path) == 0:
        raise MediaError(f"{path}: {'empty file (0 bytes)' if os.path.isfile(path) else 'no such file'}")
    try:
        with Image.open(path) as im:
            return to_rgb(im)
    except OSError as e:
        raise MediaError(f"{path}: not a readable image ({e})") from None


def image_tensor(im: Image.Image, size: tuple[int, int] | None = None) -> torch.Tensor:
    """An RGB image as float (C, 1, H, W) in [-1, 1], resized to fill `size` and centre-cropped."""
    if size is not None:
        h, w = fill_size(im.height, im.width, size)
        if (h, w) != (im.height, im.width):
            im = im.resize((w, h), Image.Resampling.BICUBIC, reducing_gap=3.0)
    arr = np.asarray(im)
    if size is not None:
        arr = _center_crop(arr, size)
    return _to_tensor(arr[None])


def read_image(path: str | os.PathLike, size: tuple[int, int] | None = None) -> torch.Tensor:
    """Read an image as float (C, 1, H, W) in [-1, 1], resized to fill `size` and centre-cropped."""
    im = load_image(path)
    try:
        return image_tensor(im, size)
    except OSError as e:  # a truncated file can fail only when its pixels are loaded
        raise MediaError(f"{path}: not a readable image ({e})") from None


def resize_crop(im: Image.Image, size: tuple[int, int]) -> np.ndarray:
    """The release's `resize_crop` of a reference image: scale (bicubic, one step) to cover `size` = (H, W), then
    crop the centre with offsets int(round((side - target) / 2)); an (H, W, 3) uint8 array."""
    th, tw = size
    im = to_rgb(im)
    w, h = im.size
    rh, rw = th / h, tw / w
    new = (round(w * rh), th) if rh > rw else (tw, round(h * rw))
    if new != (w, h):
        im = im.resize(new, Image.Resampling.BICUBIC)
    sw, sh = im.size
    top, left = int(round((sh - th) / 2)), int(round((sw - tw) / 2))
    return np.asarray(im)[top : top + th, left : left + tw]


def read_reference(path: str | os.PathLike, size: tuple[int, int]) -> torch.Tensor:
    """A reference image for image-to-video as the release reads it (`resize_crop`): float (3, 1, H, W) in [-1, 1]."""
    path = str(path)
    if not os.path.isfile(path) or os.path.getsize(path) == 0:
        raise MediaError(f"{path}: {'empty file (0 bytes)' if os.path.isfile(path) else 'no such file'}")
    try:
        with Image.open(path) as im:
            return reference_tensor(im, size)
    except OSError as e:
        raise MediaError(f"{path}: not a readable image ({e})") from None


def reference_tensor(im: Image.Image, size: tuple[int, int]) -> torch.Tensor:
    """An image as the release reads a reference (`resize_crop`): float (3, 1, H, W) in [-1, 1]."""
    return _to_tensor(resize_crop(im, size)[None])


def to_uint8(video: torch.Tensor) -> np.ndarray:
    """float (C, T, H, W) in [-1, 1] -> uint8 (T, H, W, C)."""
    if video.ndim != 4:
        raise ValueError(f"expected a (C, T, H, W) video, got shape {tuple(video.shape)}")
    x = ((video.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(1, 2, 3, 0).cpu().numpy()


def write_video(
    path: str | os.PathLike,
    video: torch.Tensor | np.ndarray,
    fps: float,
    crf: int = 18,
    preset: str = "medium",
    gop: int | None = None,
) -> Path:
    """Write an H.264 mp4 (yuv420p) atomically.

    Args:
        video: float (C, T, H, W) in [-1, 1], or uint8 (T, H, W, 3).
        crf: x264 quality (0 lossless-ish in luma, 18 visually lossless, 23 default).
        gop: keyframe interval in frames (x264's default, 250, if None); shorter makes seeking cheaper.
    """
    frames = np.ascontiguousarray(to_uint8(video) if isinstance(video, torch.Tensor) else np.asarray(video))
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected uint8 (T, H, W, 3) frames, got {frames.dtype} {frames.shape}")
    t, h, w, _ = frames.shape
    if h % 2 or w % 2:
        raise ValueError(f"H.264 (yuv420p) needs even height and width, got {h}x{w}: crop or pad by one pixel")
    if fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    path = Path(path)
    rate = Fraction(fps).limit_denominator(1001)
    with atomic_path(path) as tmp, av.open(str(tmp), mode="w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=rate)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        # One encoder thread, explicit conversion and timestamps make the output reproducible, except that the
        # first encode of a process is now and then slightly different (a few levels on some frames).
        stream.codec_context.thread_count = 1
        if gop:
            stream.codec_context.gop_size = gop
        stream.options = {"crf": str(crf), "preset": preset, "threads": "1"}
        for i, arr in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(arr, format="rgb24").reformat(format="yuv420p")
            frame.pts = i
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path
