"""Golden losses: the `debug` presets of both trainers still train as they did before the layering refactor.

tests/golden/{tokenizer,generator}_debug.json hold the first 20 training losses of

    cinedit tokenizer train debug --train.out_dir=OUT --train.progress=false
    cinedit generator train debug --train.out_dir=OUT --train.progress=false

recorded with the code before the refactor (see each file's note). Both runs read one sample dataset, built once
per session by `build_sample_data` (conftest's `sample_data`) and passed as `--data.meta`: the preset alone would
build the same dataset into OUT/sample_data, and the losses are bit-identical either way (checked when the golden
files were written).

Tolerance (both runs use 2 intra-op threads, as when recorded; on that machine they reproduce bit for bit):

- generator, all 20 steps: rtol 1e-4, atol 1e-6 (atol for step 12, whose loss is 0: every latent was given).
  Another CPU or BLAS may sum in another order; measured with 1 thread instead of 2: at most 1.1e-7 relative.
- tokenizer, steps 1..5: the same rtol 1e-4, atol 1e-6 (measured with 1 thread: at most 1.8e-7 relative).
- tokenizer, steps 6..20: rtol 5e-2. From `disc.start` (5) on, the PatchGAN's adaptive weight (a ratio of
  gradient norms) amplifies a reordering's 1e-7 about tenfold per step: measured with 1 thread instead of 2, up to
  1.8e-2 relative by step 16. A wrong loss term, schedule or data order still fails: it moves the tightly checked
  steps 1..5 already (the adversarial term alone is 2e-3 of the loss at step 5).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cinedit.cli import main
from cinedit.runtime.logs import read_metrics

GOLDEN = Path(__file__).resolve().parent / "golden"
ATOL = 1e-6
# trainer -> (first step, rtol) for the steps from there on (the tokenizer's GAN phase, see above)
RTOL = {"generator": [(1, 1e-4)], "tokenizer": [(1, 1e-4), (6, 5e-2)]}
THREADS = 2  # as when the golden losses were recorded


@pytest.fixture
def recorded_threads():
    n = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(n)


def rtol(trainer: str, step: int) -> float:
    return [tol for first, tol in RTOL[trainer] if step >= first][-1]


@pytest.mark.slow
@pytest.mark.parametrize("trainer", ["tokenizer", "generator"])
def test_debug_preset_reproduces_the_golden_losses(trainer, sample_data, tmp_path, recorded_threads):
    golden = json.loads((GOLDEN / f"{trainer}_debug.json").read_text())
    want, key = golden["losses"], golden["key"]
    assert len(want) == 20 and golden["first_step"] == 1
    argv = [trainer, "train", "debug", f"--train.out_dir={tmp_path}", "--train.progress=false"]
    assert main([*argv, f"--data.meta={sample_data[1]}"]) == 0
    logged = {r["step"]: r[key] for r in read_metrics(tmp_path) if key in r}
    got = [logged[s] for s in range(1, 21)]
    off = [
        f"step {s}: {g!r} (golden {w!r}, diff {abs(g - w):.2g}, rtol {rtol(trainer, s)})"
        for s, (g, w) in enumerate(zip(got, want), 1)
        if abs(g - w) > ATOL + rtol(trainer, s) * abs(w)
    ]
    assert not off, f"{trainer} debug preset, {key!r}, beyond tolerance (atol {ATOL}):\n  " + "\n  ".join(off)
