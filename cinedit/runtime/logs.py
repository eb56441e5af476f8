"""Metrics logging (metrics.jsonl + TensorBoard) and the progress bar."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from cinedit.runtime.files import json_ready, write_text

METRICS_FILE = "metrics.jsonl"


class MetricsLogger:
    """Scalars to `<run_dir>/metrics.jsonl` (always) and TensorBoard (when installed); images to TensorBoard.

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
