"""Rectified flow, conditions and the sampler: unit tests on a stand-in velocity model, and parity with the
reference's sampling fixtures through `cinedit eval parity`."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import FIXTURES, needs_fixtures
from safetensors.torch import save_file

from cinedit.cli import main
from cinedit.generator.conditions import (
    STAGE1_I2V_WEIGHTS,
    ConditionMix,
    build_condition,
    frame_mask,
    i2v_condition,
    inpaint_mask,
    random_inpaint_mask,
    reference_latent,
)
from cinedit.generator.flow import (
    caption_dropout,
    flow_loss,
    get_schedule,
    interpolate,
    sample_timesteps,
    shift_alpha,
    time_shift,
    velocity_target,
)
from cinedit.generator.math import pack
from cinedit.generator.sampler import SamplerConfig, denoise, guidance_scales, sample

TABLES = FIXTURES / "sampling_tables.json"
I2V = FIXTURES / "sampling_i2v_tiny.json"


def _model_importable() -> bool:
    try:
        from cinedit.generator.model import MMDiT, config_from_reference  # noqa: F401
    except ImportError:
        return False
    return True


needs_model = pytest.mark.skipif(not _model_importable(), reason="cinedit.generator.model (MMDiT) not importable")


# --- parity ---------------------------------------------------------------------------------------------------


@needs_fixtures(TABLES.name)
def test_sampling_tables_parity(capsys):
    assert main(["eval", "parity", str(TABLES)]) == 0
    out = capsys.readouterr().out
    assert "FAIL" not in out and out.count("max abs diff") >= 20
    assert "guidance.osci_temporal.image_gs" in out and "train_t.t" in out and "euler.trajectory" in out


@needs_fixtures(I2V.name)
@needs_model
def test_sampling_i2v_parity(capsys):
    assert main(["eval", "parity", str(I2V)]) == 0
    out = capsys.readouterr().out
    for name in ("timesteps", "masks", "masked_ref", "model_outputs", "trajectory", "output"):
        assert f"  {name} " in out
    assert "FAIL" not in out


@needs_fixtures(I2V.name)
@needs_model
def test_i2v_settings_are_read_from_the_fixture(tmp_path, capsys):
    meta = json.loads(I2V.read_text())
    meta["call"] = meta["call"].replace("guidance=7.5", "guidance=6.0")
    (tmp_path / I2V.name).write_text(json.dumps(meta))
    for name in (meta["file"], meta["weights_file"]):
        shutil.copy(FIXTURES / name, tmp_path)
    assert main(["eval", "parity", str(tmp_path / I2V.name)]) == 1
    out = capsys.readouterr().out
    assert "model_outputs" in out and "FAIL" in out


def _guidance_by_rule(steps: int, frames: int, g_txt: float, g_img: float, osci: bool, temporal: bool):
    """The README's rules, written out independently of the sampler."""
    text, image = [], []
    for i in range(steps):
        off = osci and i >= 10 and i % 2 == 1
        t, g = (1.0, 1.0) if off else (g_txt, g_img)
        if temporal and g > 1:
            upper = torch.linspace(g, 1.0, steps + 1)[i].item()
            image.append(torch.linspace(1.0, upper, frames).double())
        else:
            image.append(torch.full((frames,), g, dtype=torch.float64))
        text.append(t)
    return torch.tensor(text, dtype=torch.float64), torch.stack(image)


@needs_fixtures(TABLES.name)
def test_tables_with_other_settings(tmp_path, capsys):
    """A tables fixture of the same format with other steps, frames and scales replays from its JSON."""
    meta = json.loads(TABLES.read_text())
    steps, frames, g_txt, g_img = 23, 5, 4.0, 2.5
    meta["entries"] = {"guidance": {"settings": {"num_steps": steps, "T": frames, "g_txt": g_txt, "g_img": g_img}}}
    meta["entries"]["guidance"]["combos"] = {
        "both": {"text_osci": True, "image_osci": True, "scale_temporal_osci": True},
        "none": {"text_osci": False, "image_osci": False, "scale_temporal_osci": False},
    }
    tensors = {}
    for combo, osci, temporal in (("both", True, True), ("none", False, False)):
        text, image = _guidance_by_rule(steps, frames, g_txt, g_img, osci, temporal)
        tensors[f"guidance.{combo}.text_gs"], tensors[f"guidance.{combo}.image_gs"] = text, image
    save_file(tensors, tmp_path / meta["file"])
    (tmp_path / "sampling_tables.json").write_text(json.dumps(meta))
    assert main(["eval", "parity", str(tmp_path / "sampling_tables.json")]) == 0
    assert capsys.readouterr().out.count("max abs diff") == 4


# --- flow -----------------------------------------------------------------------------------------------------


def test_interpolation_ends_and_velocity():
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 6, 8, generator=g, dtype=torch.float64), torch.randn(3, 6, 8, generator=g).double()
    assert torch.equal(interpolate(x0, noise, torch.ones(3)), noise)  # t = 1: pure noise
    torch.testing.assert_close(interpolate(x0, noise, torch.zeros(3)), x0, atol=1e-4, rtol=0)  # t = 0: data
    # The target is the time derivative of the path.
    t, h = torch.tensor([0.2, 0.5, 0.9], dtype=torch.float64), 1e-4
    deriv = (interpolate(x0, noise, t + h) - interpolate(x0, noise, t - h)) / (2 * h)
    torch.testing.assert_close(deriv, velocity_target(x0, noise), atol=1e-8, rtol=0)
    torch.testing.assert_close(velocity_target(x0, noise), (1 - 1e-5) * noise - x0)


def test_shift_and_schedule():
    assert shift_alpha(256, 1) == 1.0 and shift_alpha(4096, 1) == 3.0 and shift_alpha(256, 4) == 2.0
    t = torch.linspace(0, 1, 11)
    assert torch.equal(time_shift(1.0, t), t)
    assert (time_shift(3.0, t)[1:-1] > t[1:-1]).all()  # alpha > 1 stays closer to noise
    s = get_schedule(10, 1024, 8)
    assert s.shape == (11,) and s[0] == 1 and s[-1] == 0 and (s.diff() < 0).all()
    assert torch.equal(get_schedule(10, 1024, 8, shift=False), torch.linspace(1, 0, 11))
    assert torch.equal(get_schedule(10, 1, 1, shift_alpha=5.0), time_shift(5.0, torch.linspace(1, 0, 11)))


def test_sample_timesteps_are_shifted_sigmoid_normal():
    t = sample_timesteps(20000, 1024, 8, torch.Generator().manual_seed(0))
    assert t.shape == (20000,) and (t > 0).all() and (t < 1).all()
    median = time_shift(shift_alpha(1024, 8), torch.tensor(0.5))
    assert abs(t.median() - median) < 0.01
    assert torch.equal(t, sample_timesteps(20000, 1024, 8, torch.Generator().manual_seed(0)))


def test_masked_loss_counts_only_the_mask():
    target = torch.zeros(2, 4, 3, 2, 2)
    mask = torch.zeros(2, 1, 3, 2, 2)
    mask[:, :, 1:] = 1
    pred = torch.zeros_like(target)
    pred[:, :, 0] = 100.0  # outside the mask
    assert flow_loss(pred, target, mask) == 0
    pred[:, :, 1:] = 2.0
    assert flow_loss(pred, target, mask) == 4.0
    assert flow_loss(pred, target) == pytest.approx((100.0**2 + 2 * 4.0) / 3)


def test_caption_dropout_rate_and_independence():
    n = 20000
    txt, vec = torch.ones(n, 2, 3), torch.ones(n, 4)
    new_txt, new_y = caption_dropout(
        txt, vec, torch.zeros(2, 3), torch.zeros(4), generator=torch.Generator().manual_seed(0)
    )
    drop_t = (new_txt == 0).all(-1).all(-1)
    drop_y = (new_y == 0).all(-1)
    assert ((new_txt == 0) | (new_txt == 1)).all() and (drop_t | (new_txt == 1).all(-1).all(-1)).all()
    assert abs(drop_t.float().mean() - 0.316) < 0.012 and abs(drop_y.float().mean() - 0.316) < 0.012
    assert abs((drop_t & drop_y).float().mean() - 0.316**2) < 0.008  # independent draws


# --- conditions -----------------------------------------------------------------------------------------------


def test_frame_masks():
    expect = {"t2v": [0, 0, 0, 0], "i2v_head": [1, 0, 0, 0], "i2v_tail": [0, 0, 0, 1], "i2v_loop": [1, 0, 0, 1]}
    for cond_type, mask in expect.items():
        assert frame_mask(cond_type, 4).tolist() == mask
        assert frame_mask(cond_type, 1).tolist() == [0]  # an image is never its own condition
    with pytest.raises(ValueError, match="unknown"):
        frame_mask("v2v", 4)


def test_i2v_condition_tokens_write_back_and_loss_mask():
    head, tail = torch.randn(2, 4, 1, 4, 4), torch.randn(2, 4, 1, 4, 4)
    ref = reference_latent((2, 4, 3, 4, 4), head=head, tail=tail)
    cond = i2v_condition("i2v_loop", ref)
    assert cond.mask[:, 0, :, 0, 0].tolist() == [[1, 0, 1]] * 2
    assert torch.equal(cond.masked_ref[:, :, :1], head) and torch.equal(cond.masked_ref[:, :, 2:], tail)
    assert (cond.masked_ref[:, :, 1] == 0).all()
    tokens = cond.tokens(2)  # mask features (p*p) first, then the latent channels, like the image tokens
    assert tokens.shape == (2, 3 * 2 * 2, (1 + 4) * 4)
    assert torch.equal(tokens[..., :4], pack(cond.mask, 2)) and torch.equal(tokens[..., 4:], pack(cond.masked_ref, 2))
    x = torch.randn(2, 4, 3, 4, 4)
    out = cond.write_back(x)
    assert torch.equal(out[:, :, 1], x[:, :, 1]) and torch.equal(out[:, :, 0], head[:, :, 0])
    assert torch.equal(cond.loss_mask(), 1 - cond.mask)
    packed = cond.loss_mask(2)  # per token feature, for flow_loss on packed tokens
    assert packed.shape == tokens[..., 4:].shape and torch.equal(packed, pack((1 - cond.mask).expand(2, 4, 3, 4, 4), 2))
    assert (packed[:, :4] == 0).all() and (packed[:, 4:8] == 1).all()  # tokens of frame 0 are given
    assert not i2v_condition("t2v", ref).has_given and cond.has_given


def test_inpaint_masks():
    mask = inpaint_mask(4, 6, 6, frames=[1, 2], box=(1, 3, 2, 5))
    assert mask.shape == (1, 1, 4, 6, 6)
    assert (mask[:, :, [0, 3]] == 1).all()
    assert (mask[:, :, 1:3, 1:3, 2:5] == 0).all() and mask[:, :, 1:3].sum() == 2 * (36 - 6)
    x0 = torch.randn(2, 3, 4, 6, 6)
    cond = build_condition(x0, mask)
    assert cond.mask.shape == (2, 1, 4, 6, 6)
    assert torch.equal(cond.masked_ref, x0 * mask)
    for seed in range(20):
        m = random_inpaint_mask(4, 6, 6, torch.Generator().manual_seed(seed))
        assert 0 < m.mean() < 1 and ((m == 0) | (m == 1)).all()


def test_condition_mix_frequencies():
    mix = ConditionMix(STAGE1_I2V_WEIGHTS)
    types = mix.sample(40000, torch.Generator().manual_seed(0))
    total = sum(STAGE1_I2V_WEIGHTS.values())
    for name, weight in STAGE1_I2V_WEIGHTS.items():
        assert abs(types.count(name) / len(types) - weight / total) < 0.01
    assert mix.sample(50, torch.Generator().manual_seed(3)) == mix.sample(50, torch.Generator().manual_seed(3))
    x0 = torch.randn(64, 2, 3, 2, 2)
    cond, types = ConditionMix({"i2v_tail": 1, "inpaint": 1}).condition(x0, torch.Generator().manual_seed(0))
    assert torch.equal(cond.masked_ref, x0 * cond.mask)
    tails = [i for i, name in enumerate(types) if name == "i2v_tail"]
    assert tails and cond.mask[tails, 0, :, 0, 0].tolist() == [[0, 0, 1]] * len(tails)
    with pytest.raises(ValueError, match="unknown"):
        ConditionMix({"i2v_middle": 1})


# --- sampler --------------------------------------------------------------------------------------------------


def linear_model(in_ch: int = 16, cond_ch: int = 20, txt_dim: int = 8, vec_dim: int = 6):
    """A fixed linear velocity field in the MMDiT call signature, counting the rows it is called with."""
    g = torch.Generator().manual_seed(7)
    w_img, w_cond = torch.randn(in_ch, in_ch, generator=g) * 0.1, torch.randn(cond_ch, in_ch, generator=g)
    w_txt, w_vec = torch.randn(txt_dim, in_ch, generator=g), torch.randn(vec_dim, in_ch, generator=g)
    calls = []

    def model(img, img_ids, txt, txt_ids, timesteps, vec, cond=None):
        calls.append(img.shape[0])
        out = img @ w_img + (txt.mean(1) @ w_txt + vec @ w_vec)[:, None] + timesteps[:, None, None]
        return out if cond is None else out + cond @ w_cond

    model.calls = calls
    return model


def _prompts(batch: int = 1):
    g = torch.Generator().manual_seed(1)
    return (
        torch.randn(batch, 5, 8, generator=g),
        torch.randn(batch, 6, generator=g),
        torch.zeros(1, 5, 8),
        torch.zeros(1, 6),
    )


def test_guidance_scales_oscillate_and_ramp():
    cfg = SamplerConfig(num_steps=20)
    for step in range(20):
        text, image = guidance_scales(step, 20, 4, cfg)
        off = step >= 10 and step % 2 == 1
        assert text == (1.0 if off else 7.5)
        assert image[0] == 1.0 and image.dtype == torch.float32
        assert (image == 1).all() if off else image[-1] == pytest.approx(3.0 - 2.0 * step / 20)
    text, image = guidance_scales(11, 20, 4, SamplerConfig(text_osci=False, image_osci=False, temporal_osci=False))
    assert text == 7.5 and (image == 3.0).all()


def test_sampler_is_seeded_and_writes_back_the_reference():
    model = linear_model()
    txt, vec, neg_txt, neg_y = _prompts(2)
    shape = (2, 4, 3, 4, 4)
    ref = reference_latent(shape, head=torch.randn(2, 4, 1, 4, 4))
    cond = i2v_condition("i2v_head", ref)
    cfg = SamplerConfig(num_steps=12, seed=3)
    a = sample(model, cfg, shape, 2, txt, vec, neg_txt, neg_y, condition=cond)
    assert set(model.calls) == {6}  # three passes batched
    b = sample(model, cfg, shape, 2, txt, vec, neg_txt, neg_y, condition=cond)
    c = sample(model, SamplerConfig(num_steps=12, seed=4), shape, 2, txt, vec, neg_txt, neg_y, condition=cond)
    assert torch.equal(a, b) and not torch.allclose(a, c)
    assert torch.equal(a[:, :, :1], ref[:, :, :1]) and not torch.equal(a[:, :, 1:], c[:, :, 1:])
    model.calls.clear()
    t2v = sample(model, cfg, shape, 2, txt, vec, neg_txt, neg_y, condition=i2v_condition("t2v", ref))
    assert set(model.calls) == {4} and torch.isfinite(t2v).all()  # plain CFG: two passes


def test_one_step_combines_the_three_passes():
    model = linear_model()
    txt, vec, neg_txt, neg_y = _prompts()
    img, ids = torch.randn(1, 12, 16), torch.zeros(1, 12, 3)
    ids[0, :, 0] = torch.arange(3).repeat_interleave(4)
    cond = torch.randn(1, 12, 20)
    cfg = SamplerConfig(num_steps=1, guidance=5.0, guidance_img=2.0, temporal_osci=False)
    rows = []
    txt_ids = torch.zeros(1, 5, 3)
    record = lambda _step, _img, raw: rows.append(raw)
    out = denoise(model, img, ids, txt, txt_ids, vec, neg_txt, neg_y, [1.0, 0.25], cfg, cond=cond, on_step=record)
    v1, v2, v3 = rows[0].chunk(3)
    t = torch.ones(1)
    torch.testing.assert_close(v3, model(img, ids, neg_txt, txt_ids, t, neg_y, cond=torch.zeros_like(cond)))
    torch.testing.assert_close(out, img - 0.75 * (v3 + 2.0 * (v2 - v3) + 5.0 * (v1 - v2)))
