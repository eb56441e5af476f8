"""Sequence packing: the packed forward, losses and gradients equal the per-sample ones (fp32, debug MMDiT)."""

from __future__ import annotations

import pytest
import torch

from cinedit.generator.flow import flow_loss
from cinedit.generator.model import PRESETS, MMDiT
from cinedit.generator.packing import (
    PackedBatch,
    Sample,
    flow_sample,
    packed_attention,
    packed_flow_losses,
    packed_forward,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matmuls: threads only contend on a shared machine

# (latent frames, height, width) and text length: an image, a short and a longer clip, different resolutions.
SHAPES = [((1, 4, 6), 5), ((2, 4, 4), 3), ((3, 2, 6), 7), ((1, 2, 2), 4)]


def debug_model(seed: int = 0) -> MMDiT:
    torch.manual_seed(seed)
    model = MMDiT(PRESETS["debug"]())
    with torch.no_grad():  # make the zero-initialised i2v branch visible
        model.cond_in.weight.normal_(0, 0.1)
    return model


def flow_samples(model: MMDiT, with_cond: bool = False, seed: int = 1) -> tuple[list[Sample], list[torch.Tensor]]:
    cfg, g = model.config, torch.Generator().manual_seed(seed)
    samples, targets = [], []
    for i, ((t, h, w), l_txt) in enumerate(SHAPES):
        x0 = torch.randn(cfg.latent_channels, t, h, w, generator=g)
        noise = torch.randn(x0.shape, generator=g)
        txt = torch.randn(l_txt, cfg.context_in_dim, generator=g)
        vec = torch.randn(cfg.vec_in_dim, generator=g)
        cond = torch.randn(t * h * w, cfg.cond_channels, generator=g) if with_cond else None
        s, target = flow_sample(x0, txt, vec, 0.15 + 0.2 * i, noise, cfg.patch_size, cond)
        samples.append(s)
        targets.append(target)
    return samples, targets


def single(model: MMDiT, s: Sample) -> torch.Tensor:
    return model(
        s.img[None],
        s.img_ids[None],
        s.txt[None],
        s.txt_ids[None],
        s.timestep.reshape(1),
        s.vec[None],
        cond=None if s.cond is None else s.cond[None],
    )


def test_packed_batch_layout():
    model = debug_model()
    samples, _ = flow_samples(model)
    packed = PackedBatch.from_samples(samples)
    lens = [lt + t * h * w for (t, h, w), lt in SHAPES]
    assert packed.seq_lens == lens and packed.num_tokens == sum(lens)
    assert packed.cu_seqlens.tolist() == [0, *torch.tensor(lens).cumsum(0).tolist()]
    # Each sample: its text tokens (ids at 0) then its image tokens, its own positions.
    start = 0
    for s, n in zip(samples, lens):
        ids = packed.ids[0, start : start + n]
        assert torch.equal(ids, torch.cat([s.txt_ids, s.img_ids]))
        assert (packed.seg[start : start + n] == packed.seg[start]).all()
        start += n
    mask = packed.attention_mask()[0, 0]
    assert mask.sum() == sum(n * n for n in lens)
    assert torch.equal(packed.order[packed.inverse], torch.arange(packed.num_tokens))


def test_attention_modes_agree():
    g = torch.Generator().manual_seed(0)
    model = debug_model()
    packed = PackedBatch.from_samples(flow_samples(model)[0])
    q, k, v = (torch.randn(1, 4, packed.num_tokens, 16, generator=g) for _ in range(3))
    ref = packed_attention(q, k, v, packed, "mask")
    torch.testing.assert_close(packed_attention(q, k, v, packed, "split"), ref, atol=1e-6, rtol=1e-5)
    assert packed_attention(q, k, v, packed, "auto").shape == ref.shape
    with pytest.raises(ValueError, match="attention mode"):
        packed_attention(q, k, v, packed, "nope")


@pytest.mark.parametrize(("mode", "with_cond"), [("mask", False), ("split", True)])
def test_packed_forward_loss_and_grads_match_per_sample(mode, with_cond):
    model = debug_model()
    samples, targets = flow_samples(model, with_cond)
    # Per-sample reference: the model's own forward, batch 1 each.
    model.zero_grad()
    refs = [single(model, s) for s in samples]
    ref_losses = torch.stack([flow_loss(p, t) for p, t in zip(refs, targets)])
    ref_losses.sum().backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    model.zero_grad()
    outs = packed_forward(model, PackedBatch.from_samples(samples), attention=mode)
    losses = packed_flow_losses(outs, targets)
    losses.sum().backward()

    for out, ref in zip(outs, refs):
        assert out.shape == ref.shape
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(losses, ref_losses, atol=1e-6, rtol=1e-5)
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], atol=1e-5, rtol=1e-4, msg=name)


def test_packing_rejects_mixed_conditions():
    model = debug_model()
    samples, _ = flow_samples(model, with_cond=True)
    samples[0].cond = None
    with pytest.raises(ValueError, match="cond"):
        PackedBatch.from_samples(samples)
    with pytest.raises(ValueError, match="at least one"):
        PackedBatch.from_samples([])


def test_packing_bench_reports_every_strategy():
    from cinedit.eval.bench import _packing_phase, report_markdown

    mix = (((1, 2, 2), 2), ((1, 2, 3), 1))
    res = _packing_phase("debug", mix, 3, "cpu", "fp32", 1)
    assert res["samples"] == 3 and res["shapes"] == 2 and res["tokens"] == 4 + 4 + 6 + 3 * 3
    assert res["padded_tokens"] == 3 * (6 + 3)
    for name in ("packed_mask", "packed_split", "bucketed", "padded"):
        assert res[name]["tokens_per_s"] > 0
    run = {"device": "cpu", "threads": 1, "dtype": "fp32", "repeats": 1, "torch": torch.__version__}
    md = report_markdown({"packing": {**res, **run, "preset": "debug", "txt_tokens": 3, "step": "a step"}})
    assert "Sequence packing vs bucketing" in md and "| bucketed |" in md
