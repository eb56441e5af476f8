"""What a demo run does: its plan (step counts fitted to --minutes by a calibration, or replayed from --plan),
stages, sample settings and file names.

A plan is chosen once per run directory and written to `<out>/plan.json`; every later call (a resumed demo, or
`--plan FILE` elsewhere) replays its step counts, seed and torch threads, so the results never depend on the clock
once the plan is fixed. `derive_steps` is the pure half of the calibration: measured costs + budget -> step counts.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cinedit.generator.generate import output_size

DEFAULT_MINUTES = 10.0
DEFAULT_SEED = 42
DEVICES = ("auto", "cpu", "cuda")
TRAINED = ("tokenizer", "stage1", "stage2", "stage3")
# The share of the training steps' time (setup, evaluations, samples and checkpoints are budgeted apart) each run
# gets. The tokenizer takes four fifths: its held-out PSNR is still rising after 800 steps
# (scripts/tokenizer_study.py), while the generator stages' debug models train in a fraction of a second a step.
TIME_SHARES = {"tokenizer": 0.8, "stage1": 0.04, "stage2": 0.04, "stage3": 0.12}
# Past this count a fast machine gives the tokenizer's time to the generator stages instead.
MAX_TOKENIZER_STEPS = 1600
# The tokenizer trains as the release does, reconstruction first: the adversarial phase (`--disc.start`) is the
# last tenth of its steps. An adversarial step costs more than a plain one (discriminator forward / backward and
# the adaptive weight's gradients: 0.70 against 0.59 s in a 2-thread demo calibration, twice as much on one thread);
# on the sample data its phase does not move the held-out PSNR (500 debug steps: 16.06 dB with steps 400-500
# adversarial, 16.06 dB without), so the demo runs a short one to show it working.
ADVERSARIAL_SHARE = 0.1
# The tokenizer's calibration run: steps, its first adversarial step, and the warm-up steps left untimed. Steps 1-6
# build the kernels and read most files for the first time; a real run decodes each file once (its decode cache)
# and crops later windows from memory, so timing those first reads over-priced a step by 13% (2 threads: 0.502
# against 0.445 s run) to 58% (1 thread: 0.393 against 0.248 s). Later steps are not a long run's steps either:
# without flushing subnormal floats (`train.flush_denormal`, off: a process-wide mode) a video step slows by a
# quarter over the first 100 steps, so a calibration from steps 7-24 under-priced the run by 36% (0.170 against
# 0.232 s a step, 2 threads); MARGIN leaves room for it. Steps 7-14 time plain steps, 16-24 adversarial ones (step
# 15 builds the discriminator's kernels).
# The calibration has its own train seed and image share, so that every group holds video and image steps whatever
# the demo's --seed (`tokenizer_step_cost` mixes them by the real run's share: an image step costs under half a
# video one, and the old 9 steps held none).
TOKENIZER_CALIBRATION_STEPS, TOKENIZER_CALIBRATION_DISC, TOKENIZER_CALIBRATION_WARMUP = 24, 15, 6
TOKENIZER_CALIBRATION_SEED, TOKENIZER_CALIBRATION_IMAGE_SHARE = 42, 0.5
MIN_STEPS = {"tokenizer": 2, "stage1": 2, "stage2": 2, "stage3": 2, "sample": 2}
SAMPLE_STEPS_AT_DEFAULT = 25  # sampling steps of the samples at --minutes 10 (scaled with --minutes, floor 2)
# Plan for this share of --minutes. Runs land above their plan: the timed steps of the calibration run faster than
# the same steps of a long run, as subnormal floats build up in the tokenizer's kernels (the demo does not flush
# them: `train.flush_denormal`) and the machine's speed drifts (the 24-step tokenizer calibration: 0.170-0.178 s a
# step, the runs 0.205-0.232 s; the generator stages 5-20% over). Planned 570 s at 0.95: took 627, 630 and 637 s.
MARGIN = 0.8
PLAN_FORMAT = "cinedit-demo-plan/1"

TOKENIZER_PRESET = "debug"  # the tokenizer trainer's preset, with the model and windows below
TOKENIZER_MODEL, TOKENIZER_CROP_SCALE = "demo", 1.5
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
STATE_FILE, REPORT_FILE, PLAN_FILE = "demo.json", "report.md", "plan.json"
CALIBRATION_DIR = "calibration"  # the calibration's throwaway runs (removed when done)


@dataclass(frozen=True)
class Plan:
    """What a demo run does. `seed`, `device`, `threads` and the step counts fix its results; `minutes` (the budget
    it was fitted to), `source` and `info` (measured costs, estimates, the machine) only describe it."""

    minutes: float
    seed: int
    device: str
    tokenizer_steps: int
    stage_steps: dict[str, int]
    sample_steps: int
    threads: int = 1
    source: str = field(default="", compare=False)
    info: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def steps(self) -> dict[str, int]:
        return {"tokenizer": self.tokenizer_steps, **self.stage_steps, "sample": self.sample_steps}

    def identity(self) -> dict[str, Any]:
        """What a replay must match: seed, device, torch threads and every step count."""
        return {"seed": self.seed, "device": self.device, "threads": self.threads, "steps": self.steps}

    def to_json(self) -> dict[str, Any]:
        doc = {"format": PLAN_FORMAT, "minutes": self.minutes, **self.identity(), "source": self.source}
        return {**doc, **self.info}

    @classmethod
    def from_steps(
        cls,
        steps: dict[str, int],
        minutes: float = DEFAULT_MINUTES,
        seed: int = DEFAULT_SEED,
        device: str = "auto",
        threads: int = 1,
        source: str = "",
        info: dict[str, Any] | None = None,
    ) -> Plan:
        stages = {s: int(steps[s]) for s in STAGES}
        return cls(
            minutes, seed, device, int(steps["tokenizer"]), stages, int(steps["sample"]), threads, source, info or {}
        )

    @classmethod
    def from_json(cls, doc: Any, where: str) -> Plan:
        """A plan from a `plan.json` document; a PlanError naming `where` and the field when it is not one."""
        if not isinstance(doc, dict):
            raise PlanError(f"{where}: a plan is a JSON object, got {type(doc).__name__}")
        missing = [k for k in ("seed", "steps") if k not in doc]
        if missing:
            raise PlanError(f"{where}: missing key(s) {', '.join(missing)} (a plan holds seed, device, threads, steps)")
        steps = doc["steps"]
        if not isinstance(steps, dict):
            raise PlanError(f"{where}: steps must be an object with {', '.join(MIN_STEPS)}, got {steps!r}")
        lacking = [k for k in MIN_STEPS if k not in steps]
        if lacking:
            raise PlanError(f"{where}: steps lacks {', '.join(lacking)} (needs {', '.join(MIN_STEPS)})")
        unknown = sorted(set(steps) - set(MIN_STEPS))
        if unknown:
            raise PlanError(f"{where}: unknown step count(s) {', '.join(unknown)} (known: {', '.join(MIN_STEPS)})")
        counts = {k: _int(steps[k], f"{where}: steps.{k}", MIN_STEPS[k]) for k in MIN_STEPS}
        seed = _int(doc["seed"], f"{where}: seed", 0)
        device = doc.get("device", "auto")
        if device not in DEVICES:
            raise PlanError(f"{where}: device must be one of {', '.join(DEVICES)}, got {device!r}")
        threads = _int(doc["threads"], f"{where}: threads", 1) if "threads" in doc else torch_threads()
        minutes = doc.get("minutes", DEFAULT_MINUTES)
        if (
            isinstance(minutes, bool)
            or not isinstance(minutes, (int, float))
            or not math.isfinite(minutes)
            or minutes <= 0
        ):
            raise PlanError(f"{where}: minutes must be a positive number, got {minutes!r}")
        info = {
            k: v
            for k, v in doc.items()
            if k not in ("format", "minutes", "seed", "device", "threads", "steps", "source")
        }
        return cls.from_steps(counts, float(minutes), seed, device, threads, str(doc.get("source", "")), info)

    @classmethod
    def read(cls, path: Path) -> Plan:
        try:
            doc = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise PlanError(f"{path}: no such plan file") from None
        except (OSError, UnicodeDecodeError) as e:
            raise PlanError(f"{path}: cannot read it ({e})") from None
        except json.JSONDecodeError as e:
            raise PlanError(f"{path}: not JSON ({e})") from None
        return cls.from_json(doc, str(path))


def _int(value: Any, what: str, minimum: int) -> int:
    number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not number or value != int(value) or value < minimum:
        raise PlanError(f"{what} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def sample_steps(minutes: float) -> int:
    """Sampling steps of the three samples: 25 at the default --minutes, scaled with it (floor 2)."""
    return max(MIN_STEPS["sample"], round(SAMPLE_STEPS_AT_DEFAULT * minutes / DEFAULT_MINUTES))


def torch_threads(workers: int = 0, cores: int | None = None, load: float = 0.0) -> int:
    """Torch threads for a process with `workers` DataLoader workers (one thread each) on a machine whose other
    processes keep `load` cores busy (the load average before the demo started): threads x (1 + workers) stays
    within the cores, and within the idle ones. More threads than free cores make every parallel region wait for a
    descheduled thread: on a loaded 2-core machine one thread runs a conv3d step 2x faster than two."""
    cores = cores or os.cpu_count() or 1
    free = max(1, cores - math.floor(load + 0.5))
    return max(1, min(cores // (1 + workers), free))


# ----------------------------------------------------------------------------------------------------------------------
# the cost model: measured seconds -> step counts


def run_intervals(steps: int) -> dict[str, int]:
    """The intervals every demo training run takes (see `run.run_args`)."""
    return {"eval_every": every(steps, 10), "ckpt_every": every(steps, 8), "sample_every": every(steps, 3)}


def run_seconds(cost: dict[str, float], steps: int) -> float:
    """Estimated wall time of a training run of `steps` steps from its calibration: setup (and export), the steps,
    the evaluations (at step 0 and every eval_every), validation samples and checkpoints (and the last one)."""
    iv = run_intervals(steps)
    evals = 1 + steps // iv["eval_every"]
    samples = steps // iv["sample_every"]
    saves = steps // iv["ckpt_every"] + (steps % iv["ckpt_every"] != 0)
    return (
        cost["setup_s"]
        + steps * cost["step_s"]
        + evals * cost["eval_s"]
        + samples * cost["sample_s"]
        + saves * cost["save_s"]
    )


def derive_steps(costs: dict[str, dict[str, float]], seconds: float) -> dict[str, int]:
    """Step counts of the trained runs (`TRAINED`) whose estimated wall time (`run_seconds`) fits `seconds`.

    The time left after each run's overheads (at the step counts chosen) is split by `TIME_SHARES`; each count is
    at least `MIN_STEPS` (so a budget below the overheads gives the minimum counts) and the tokenizer's at most
    `MAX_TOKENIZER_STEPS` (its surplus goes to the generator stages). Pure: the same inputs give the same counts.
    """

    def counts(pool: float) -> dict[str, int]:
        share = dict(TIME_SHARES)
        out = {}
        tok = costs["tokenizer"]["step_s"]
        if pool * share["tokenizer"] > MAX_TOKENIZER_STEPS * tok:  # its surplus to the generator, by their shares
            extra, share["tokenizer"] = (
                share["tokenizer"] - MAX_TOKENIZER_STEPS * tok / pool,
                MAX_TOKENIZER_STEPS * tok / pool,
            )
            rest = sum(TIME_SHARES[k] for k in TRAINED if k != "tokenizer")
            for k in TRAINED[1:]:
                share[k] += extra * TIME_SHARES[k] / rest
        for k in TRAINED:
            n = math.floor(max(0.0, pool) * share[k] / max(costs[k]["step_s"], 1e-9) + 1e-9)
            out[k] = max(MIN_STEPS[k], n)
        out["tokenizer"] = min(out["tokenizer"], max(MIN_STEPS["tokenizer"], MAX_TOKENIZER_STEPS))
        return out

    def overheads(steps: dict[str, int]) -> float:
        return sum(run_seconds(costs[k], steps[k]) - steps[k] * costs[k]["step_s"] for k in TRAINED)

    def total(steps: dict[str, int]) -> float:
        return sum(run_seconds(costs[k], steps[k]) for k in TRAINED)

    # The overheads depend (a little) on the counts, through the intervals: a few rounds settle them, then shrink
    # the pool until the total fits (or every count is at its floor).
    pool = seconds - overheads({k: 10**6 for k in TRAINED})
    for _ in range(4):
        pool = seconds - overheads(counts(pool))
    steps = counts(pool)
    while total(steps) > seconds and any(steps[k] > MIN_STEPS[k] for k in TRAINED):
        pool -= max(1e-3, 0.05 * abs(pool), total(steps) - seconds)
        steps = counts(pool)
    return steps


def tokenizer_step_cost(
    intervals: list[float],
    images: list[bool],
    disc_start: int,
    image_share: float,
    warmup: int = TOKENIZER_CALIBRATION_WARMUP,
    share: float = ADVERSARIAL_SHARE,
) -> dict[str, float]:
    """A demo tokenizer step's expected cost from a calibration run's step intervals (`intervals[i]`: the time of
    step i + 2; `images[i]`: whether that step took an image batch) whose adversarial phase began at `disc_start`.

    Steps up to `warmup` (first reads, kernel builds) and the first adversarial step (its one-off setup) are left
    out. In each phase the median video step and the median image step are mixed by `image_share` (the real run's
    share of image steps); the plain and adversarial costs are then mixed by `share`, the adversarial share of a
    demo run's steps."""
    if len(images) != len(intervals):
        raise ValueError(f"{len(intervals)} step intervals but {len(images)} image flags")
    kinds = [(False, 1 - image_share), (True, image_share)]
    out: dict[str, float] = {}
    for phase, timed in (("plain", lambda n: warmup < n < disc_start), ("adversarial", lambda n: n > disc_start)):
        cost = 0.0
        for image, weight in kinds:
            if weight == 0:
                continue
            times = [t for i, (t, im) in enumerate(zip(intervals, images)) if timed(i + 2) and im == image]
            if not times:
                kind = "image" if image else "video"
                raise ValueError(
                    f"no timed {phase} {kind} step among the intervals {intervals} (image steps {images}, warm-up "
                    f"{warmup}, disc.start {disc_start}): the calibration needs both kinds in both phases"
                )
            median = statistics.median(times)
            out[f"{phase}_{'image' if image else 'video'}_step_s"] = median
            cost += weight * median
        out[f"{phase}_step_s"] = cost
    out["step_s"] = (1 - share) * out["plain_step_s"] + share * out["adversarial_step_s"]
    return out


def adversarial_start(steps: int) -> int:
    """The first adversarial step of a `steps`-step tokenizer run: the last `ADVERSARIAL_SHARE` of its steps (none
    when that is under one step)."""
    return max(1, steps - math.floor(ADVERSARIAL_SHARE * steps) + 1)


def tokenizer_schedule(steps: int) -> list[str]:
    """The schedule overrides of a `steps`-step demo tokenizer run: the adversarial tail, and (the demo knows its
    length) a short warm-up and a cosine decay (+0.15 dB held-out at 400 steps in the study)."""
    warmup = f"--optim.warmup_steps={min(20, steps // 20)}"
    return [f"--disc.start={adversarial_start(steps)}", warmup, "--optim.decay=cosine", "--optim.min_lr_ratio=0.05"]


def every(steps: int, times: int) -> int:
    """An interval that fires about `times` times in `steps` steps."""
    return max(1, steps // times)


def header(msg: str) -> None:
    print(f"\n== {msg}", flush=True)


class DemoError(RuntimeError):
    """A run directory the demo cannot use as asked; the message says what to do."""


class PlanError(DemoError):
    """A --plan file that is not a usable plan; the message names the file and the field."""


def command_line(prog: str, argv: list[str]) -> str:
    return shlex.join(["cinedit", *prog.split(), *argv])


def sample_size() -> tuple[int, int]:
    return output_size(SAMPLE_RESOLUTION, SAMPLE_ASPECT)
