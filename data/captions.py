"""Caption suffixes the Open-Sora 2.0 release trains and samples with.

The release's inference script turns a prompt "p" into "p. 24 FPS." (the frame rate it saves at) and, with its
default motion score 4, into "p. 24 FPS. 4 motion score."; training captions carried the same motion-score
suffix (the clip's VMAF motion score, rounded). The exact strings are in the pipeline fixtures.
"""

from __future__ import annotations

import re

RELEASE_FPS = 24
RELEASE_MOTION_SCORE = 4
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


__all__ = ["RELEASE_FPS", "RELEASE_MOTION_SCORE", "motion_score_text", "release_prompt", "with_fps", "with_motion_score"]
