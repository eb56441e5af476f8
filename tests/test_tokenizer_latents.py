"""The tokenizer's latent scale: the latent regulariser, and the `debug` preset's latent statistics (sample data)."""

from __future__ import annotations

import json

import pytest
import torch

from cinedit.configs import ConfigError
from cinedit.configs.tokenizer import LossConfig, debug, f32t4c128
from cinedit.runtime.logs import read_metrics
from cinedit.tokenizer import train as train_mod
from cinedit.tokenizer.losses import latent_moments, latent_regulariser, moments_std

pytestmark = pytest.mark.usefixtures("one_thread")


def test_latent_regulariser_is_zero_without_weight_and_positive_with_one():
    z = torch.randn(2, 16, 2, 2, 2, requires_grad=True)
    off = latent_regulariser(z, 0.0)
    assert off.item() == 0.0 and not off.requires_grad
    on = latent_regulariser(z, 0.01)
    assert on.item() > 0 and on.item() == pytest.approx(0.01 * z.detach().square().mean().item(), rel=1e-6)
    on.backward()
    assert torch.allclose(z.grad, 0.01 * 2 * z.detach() / z.numel())
    with pytest.raises(ConfigError, match="latent"):
        LossConfig(latent_weight=-1.0).validate()


def test_latent_moments_give_mean_and_std():
    z = torch.tensor([1.0, 2.0, 3.0, 6.0])
    a, b = latent_moments(z[:2]), latent_moments(z[2:])
    mean, std = moments_std(*[x + y for x, y in zip(a, b)])
    assert mean == pytest.approx(3.0) and std == pytest.approx(z.std(unbiased=False).item())


def test_release_recipe_keeps_the_regulariser_off():
    assert f32t4c128().loss.latent_weight == 0.0
    assert debug().loss.latent_weight > 0


# Measured (2 cores, one thread; 30 steps of the `debug` preset on the sample data, ~40 s), with the study's recipe
# (zero-initialised branches, random windows and flips, L1 + squared error, latent regulariser 1e-2) and
# channels-last CPU weights: held-out L1 0.420 -> 0.374, latent std video 0.038 -> 0.194, image 0.044 -> 0.208, ratio
# video / image 0.88 -> 0.93 (before channels-last, whose reordered sums the adversarial phase from step 5 amplifies:
# 0.346, 0.405, 0.197, 2.06; after 517 steps in the demo: std 0.30, images 0.31, videos 0.30; without the regulariser
# the std runs into the thousands). Bounds with margin: L1 down by 5%; video and image std (the generator's scaling
# factor is 1 / std), still rising this early, in [0.1, 5]; the ratio within [1/5, 5]. With every training clip read
# (`square_meta`; before it the one 16:9 clip never was) the ratio at step 30 is 3.22 (CI, 2 workers): this early the
# image latents lag; the demo's trained latents (698 steps) have a ratio of 1.08, inside the 2x.
STEPS = 30


def test_debug_preset_learns_bounded_latents(sample_data, tmp_path):
    out = tmp_path / "run"
    argv = ["debug", f"--data.meta={sample_data[1]}", f"--train.out_dir={out}", "--train.progress=false"]
    argv += [f"--train.steps={STEPS}", f"--train.eval_every={STEPS}", "--train.sample_every=0", "--train.ckpt_every=0"]
    assert train_mod.main(argv) == 0
    rows = read_metrics(out)
    val = {r["step"]: r for r in rows if "val/l1" in r}
    before, after = val[0], val[STEPS]
    print(json.dumps({"before": before, "after": after}))
    assert after["val/l1"] < 0.95 * before["val/l1"]
    for r in (before, after):
        assert {"latent/std_video", "latent/std_image", "latent/std_ratio", "latent/mean_video"} <= set(r)
    assert 0.1 <= after["latent/std_video"] <= 5.0, after["latent/std_video"]
    assert 0.1 <= after["latent/std_image"] <= 5.0, after["latent/std_image"]
    assert 1 / 5 <= after["latent/std_ratio"] <= 5.0, after["latent/std_ratio"]
    steps = [r for r in rows if "loss/l1" in r]
    assert len(steps) == STEPS and all("latent/std" in r and "loss/latent" in r for r in steps)
    assert max(r["latent/std"] for r in steps) < 10.0
