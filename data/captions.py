"""Caption suffixes the Open-Sora 2.0 release trains and samples with.

The release's inference script turns a prompt "p" into "p. 24 FPS." (the frame rate it saves at) and, with its
default motion score 4, into "p. 24 FPS. 4 motion score."; training captions carried the same motion-score
suffix (the clip's VMAF motion score, rounded). The exact strings are in the pipeline fixtures.
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Mapping
from typing import Any

from cinedit.configs.core import ConfigError

RELEASE_FPS = 24
RELEASE_MOTION_SCORE = 4
MOTION_SCORE_COLUMN = "motion_score"  # meta column written by `cinedit data score` (the release's VMAF motion)
_FPS_SUFFIX = re.compile(r"\d+ FPS\.$")


def with_fps(text: str, fps: int | float = RELEASE_FPS) -> str:
    """`text` stripped, ending in a period, then " {fps} FPS." (unless it already ends with "N FPS.")."""
    text = text.strip()
    if _FPS_SUFFIX.search(text):
        return text
    if not text.endswith("."):
        text += "."
    return f"{text} {fps:g} FPS."


def motion_score_text(score: int | float | str) -> str:
    """The motion-score suffix, e.g. "4 motion score." (whole scores without a decimal point)."""
    if isinstance(score, str):
        value = score.strip()
        if not value:
            raise ValueError("motion score is empty: pass a number such as 4")
        float(value)  # a clear ValueError for text that is not a number
    else:
        value = f"{int(round(score))}" if float(score).is_integer() else f"{score:g}"
    return f"{value} motion score."


def with_motion_score(text: str, score: int | float | str) -> str:
    """`text` + " {score} motion score." (the release's rule: no punctuation added before it)."""
    return f"{text} {motion_score_text(score)}"


def release_prompt(text: str, fps: int | float = RELEASE_FPS, motion_score: int | float | str | None = None) -> str:
    """The text the release's inference feeds its text encoders: the fps suffix, then the motion score, if any."""
    text = with_fps(text, fps)
    return text if motion_score is None else with_motion_score(text, motion_score)


def check_motion_scores(columns: Collection[str], source: str = "the metadata") -> None:
    """Raise `ConfigError` when a meta table that should give motion-score captions has no motion score column."""
    if MOTION_SCORE_COLUMN not in columns:
        raise ConfigError(
            f"data.motion_score_suffix=true needs a {MOTION_SCORE_COLUMN!r} column, and {source} has none: add it "
            f"with `cinedit data score META --out META_SCORED` and train on META_SCORED (or set "
            f"--data.motion_score_suffix=false)"
        )


def training_caption(text: str, row: Mapping[str, Any], suffix: bool) -> str:
    """The caption a sample trains with: `text`, plus " {round(score)} motion score." when `suffix` is on and the
    row has a motion score (a row whose file `cinedit data score` could not read has none and keeps `text`)."""
    if not suffix:
        return text
    score = row.get(MOTION_SCORE_COLUMN)
    try:
        score = float(score)
    except (TypeError, ValueError):
        return text
    if not math.isfinite(score):
        return text
    return with_motion_score(text, round(score))


__all__ = [
    "MOTION_SCORE_COLUMN",
    "RELEASE_FPS",
    "RELEASE_MOTION_SCORE",
    "check_motion_scores",
    "motion_score_text",
    "release_prompt",
    "training_caption",
    "with_fps",
    "with_motion_score",
]
