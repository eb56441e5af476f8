"""Metrics logging (metrics.jsonl + TensorBoard) and the progress bar."""

from __future__ import annotations

import io
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tqdm import tqdm

from cinedit.runtime.files import json_ready, write_text

METRICS_FILE = "metrics.jsonl"


class MetricsLogger:
    """Scalars to `<run_dir>/metrics.jsonl` (always) and TensorBoard (when installed); images and videos to
    TensorBoard.

    Only the main rank writes. `truncate_after(step)` drops rows past a resumed checkpoint's step, so a run
    killed after its last checkpoint and resumed leaves one row per step.
    """

    def __init__(self, run_dir: str | os.PathLike, enabled: bool = True, tensorboard: bool = True):
        self.path = Path(run_dir) / METRICS_FILE
        self.enabled = enabled
        self.writer = None
        if enabled and tensorboard:
            try:  # optional dependency: without tensorboard, metrics.jsonl only
                from torch.utils.tensorboard import SummaryWriter  # optional, and slow to import
            except ImportError:
                SummaryWriter = None
            if SummaryWriter is not None:
                self.writer = SummaryWriter(str(Path(run_dir) / "tb"))

    def truncate_after(self, step: int) -> None:
        if not self.enabled or not self.path.is_file():
            return
        rows = [line for line in self.path.read_text().splitlines() if line.strip()]
        kept = [r for r in rows if json.loads(r).get("step", 0) <= step]
        write_text(self.path, "".join(r + "\n" for r in kept))

    def reset(self) -> None:
        if self.enabled and self.path.exists():
            self.path.unlink()

    def log(self, step: int, scalars: dict[str, float]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(json_ready({"step": step, **{k: float(v) for k, v in scalars.items()}})) + "\n")
        if self.writer is not None:
            for k, v in scalars.items():
                self.writer.add_scalar(k, v, step)

    def image(self, tag: str, img: torch.Tensor, step: int) -> None:
        """A (3, H, W) image in [0, 1]."""
        if self.enabled and self.writer is not None:
            self.writer.add_image(tag, img.clamp(0, 1).cpu(), step)

    def video(self, tag: str, video: torch.Tensor, step: int, fps: float) -> None:
        """A (T, 3, H, W) video in [0, 1], as the animated GIF `SummaryWriter.add_video` writes (TensorBoard's
        Images tab plays it); one frame is logged as an image."""
        if not (self.enabled and self.writer is not None):
            return
        if video.shape[0] == 1:
            self.image(tag, video[0], step)
            return
        # add_video needs moviepy < 2 (2.x has no `moviepy.editor`) and logs nothing without it; PIL writes the
        # same GIF into the same Summary.Image record.
        from tensorboard.compat.proto.summary_pb2 import Summary  # present whenever the SummaryWriter is

        frames = video.clamp(0, 1).mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        images = [Image.fromarray(f) for f in frames]
        buf = io.BytesIO()
        images[0].save(buf, format="GIF", save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0)
        h, w = frames.shape[1:3]
        img = Summary.Image(height=h, width=w, colorspace=3, encoded_image_string=buf.getvalue())
        self.writer._get_file_writer().add_summary(Summary(value=[Summary.Value(tag=tag, image=img)]), step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, float]]:
    """The rows of a run's metrics.jsonl."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def progress_bar(total: int, initial: int = 0, enabled: bool = True, desc: str = "train") -> Any:
    """A tqdm bar over steps (silent when disabled or not on the main rank)."""
    return tqdm(total=total, initial=initial, disable=not enabled, desc=desc, dynamic_ncols=True, file=sys.stderr)
