"""What a demo run does: its step counts (from --minutes alone), stages, sample settings and file names."""

from __future__ import annotations

import shlex
from dataclasses import dataclass

from cinedit.generator.generate import output_size

DEFAULT_MINUTES = 10.0
# Step counts for about 10 minutes on an idle 2-core CPU. Measured at load 2 (demo.json of a default run): ~30 s of
# fixed work, the tokenizer 0.23 s a step, the generator stages 0.016 / 0.017 / 0.024 s a step. The tokenizer's
# held-out PSNR flattens after a few hundred steps, so much of the time goes to the generator. --minutes scales
# every count linearly (with a floor); the counts never depend on the clock.
STEPS_AT_DEFAULT = {"tokenizer": 1600, "stage1": 2000, "stage2": 2000, "stage3": 6000, "sample": 25}
MIN_STEPS = {"tokenizer": 2, "stage1": 2, "stage2": 2, "stage3": 2, "sample": 2}

TOKENIZER_PRESET = "debug"
# The generator chain: stage -> (preset, demo-only overrides); each stage starts from the previous one's final model.
# These are the CPU twins of the three GPU stages (64px t2v -> 64px t/i2v -> 128px t/i2v). The demo runs every stage
# in this one process, so the last one drops context parallelism; it also trains inpainting there (the stage
# presets do not), which the inpainting sample needs.
STAGES: dict[str, tuple[str, list[str]]] = {
    "stage1": ("debug_stage1", []),
    "stage2": ("debug_stage2", []),
    "stage3": ("debug_stage3", ["--parallel.cp_size=1", "--flow.inpaint_share=0.2"]),
}
STAGE_TITLES = {
    "stage1": "64px text-to-video",
    "stage2": "64px text/image-to-video",
    "stage3": "128px text/image-to-video + inpainting",
}
TEXT_ENCODER = "debug"  # MiniLM, as the `debug` generator preset's text section
FPS = 12.5  # the sample clips are 25 fps, read at stride ceil(25 / 24) = 2

# Samples: the last stage's 128px 16:9 bucket (96x160) and its 8-frame clips (two latent frames).
SAMPLE_FRAMES, SAMPLE_RESOLUTION, SAMPLE_ASPECT = 8, "128px", "16:9"
T2V_CLIP, I2V_PHOTO, INPAINT_CLIP = "bunny_wakes", "coffee", "fence_bicycles"
INPAINT_MASK = "frames:4-7"  # keep the first latent frame, regenerate the second

TOKENIZER_DIR, CACHE_DIR, SAMPLES_DIR, EVAL_DIR = "tokenizer", "cache", "samples", "eval"
SCALED_TOKENIZER = "tokenizer_scaled"  # the trained tokenizer with its measured latent scale: what the generator uses
STATE_FILE, REPORT_FILE = "demo.json", "report.md"


@dataclass(frozen=True)
class Plan:
    """What a demo run does: step counts from --minutes, the seed and the device."""

    minutes: float
    seed: int
    device: str
    tokenizer_steps: int
    stage_steps: dict[str, int]
    sample_steps: int

    @classmethod
    def make(cls, minutes: float = DEFAULT_MINUTES, seed: int = 42, device: str = "auto") -> Plan:
        def n(key: str) -> int:
            return max(MIN_STEPS[key], round(STEPS_AT_DEFAULT[key] * minutes / DEFAULT_MINUTES))

        return cls(minutes, seed, device, n("tokenizer"), {s: n(s) for s in STAGES}, n("sample"))


def every(steps: int, times: int) -> int:
    """An interval that fires about `times` times in `steps` steps."""
    return max(1, steps // times)


def header(msg: str) -> None:
    print(f"\n== {msg}", flush=True)


class DemoError(RuntimeError):
    """A run directory the demo cannot use as asked; the message says what to do."""


def _settings(plan: dict) -> str:
    return f"--minutes {plan.get('minutes')} --seed {plan.get('seed')} --device {plan.get('device')}"


def command_line(prog: str, argv: list[str]) -> str:
    return shlex.join(["cinedit", *prog.split(), *argv])


def sample_size() -> tuple[int, int]:

    return output_size(SAMPLE_RESOLUTION, SAMPLE_ASPECT)
