"""The VACE-style control adapter: a no-op at init, trains alone, learns to use the control, saves and loads."""

from __future__ import annotations

import json
import time

import pytest
import torch

from cinedit.generator.control import (
    ControlAdapter,
    ControlAdapterConfig,
    ControlledMMDiT,
    freeze_backbone,
    load_adapter,
    save_adapter,
    spread,
    with_control,
)
from cinedit.generator.math import make_ids, make_txt_ids
from cinedit.generator.model import PRESETS, MMDiT, MMDiTConfig
from cinedit.generator.parallel import apply_activation_checkpointing

pytestmark = pytest.mark.usefixtures("one_thread")


def backbone(seed: int = 0, **changes) -> MMDiT:
    torch.manual_seed(seed)
    model = MMDiT(MMDiTConfig(**{**PRESETS["debug"]().__dict__, **changes})).eval()
    with torch.no_grad():  # a nonzero i2v branch, so that cond reaches the output
        model.cond_in.weight.normal_(0, 0.1)
    return freeze_backbone(model)


def inputs(cfg: MMDiTConfig, b: int = 2, t: int = 2, h: int = 3, w: int = 4, l_txt: int = 5, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "img": torch.randn(b, t * h * w, cfg.in_channels, generator=g),
        "img_ids": make_ids(t, h, w, batch=b),
        "txt": torch.randn(b, l_txt, cfg.context_in_dim, generator=g),
        "txt_ids": make_txt_ids(b, l_txt),
        "timesteps": torch.rand(b, generator=g),
        "vec": torch.randn(b, cfg.vec_in_dim, generator=g),
        "cond": torch.randn(b, t * h * w, cfg.cond_channels, generator=g),
    }


def control_like(x: dict, kinds: int = 1, seed: int = 1) -> torch.Tensor:
    b, length, c = x["img"].shape
    return torch.randn(b, length, c * kinds, generator=torch.Generator().manual_seed(seed))


def backbone_state(model: MMDiT) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("changes", [{}, {"num_blocks": 1, "hint_blocks": [1]}, {"kinds": ["edges", "depth"]}])
def test_init_is_the_backbone_exactly(changes):
    model = backbone()
    adapter = ControlAdapter.from_backbone(model, ControlAdapterConfig(**changes))
    x = inputs(model.config)
    with torch.no_grad():
        plain = model(**x)
        for seed in (1, 2):
            with with_control(model, adapter, control_like(x, len(adapter.config.kinds), seed)):
                assert torch.equal(model(**x), plain)
    # The hooks are gone after the block.
    assert not any(b._forward_hooks or b._forward_pre_hooks for b in model.double_blocks)


def test_one_adapter_step_changes_the_output_and_not_the_backbone():
    model = backbone()
    before = backbone_state(model)
    adapter = ControlAdapter.from_backbone(model, ControlAdapterConfig(num_blocks=2))
    controlled = ControlledMMDiT(model, adapter)
    assert [n for n, p in controlled.named_parameters() if p.requires_grad] == [
        f"adapter.{n}" for n, _ in adapter.named_parameters()
    ]
    x = inputs(model.config)
    control = control_like(x)
    with torch.no_grad():
        plain = model(**x)
    opt = torch.optim.AdamW(adapter.parameters(), lr=1e-3)
    loss = (controlled(**x, control=control) - torch.randn_like(plain)).square().mean()
    loss.backward()
    assert all(p.grad is None for p in model.parameters())
    assert all(p.grad.abs().sum() > 0 for p in adapter.hint_out.parameters())  # the zero projections get gradient
    opt.step()
    with torch.no_grad():
        after = controlled(**x, control=control)
        assert not torch.equal(after, plain)
        assert torch.equal(controlled(**x), plain)  # without control it is the backbone
        assert torch.equal(controlled(**x, control=control, control_scale=0.0), plain)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_adapter_learns_to_use_the_control():
    """A unit-level check: the target is the frozen backbone's output plus a function of the control only."""
    torch.manual_seed(0)
    model = backbone()
    adapter = ControlAdapter.from_backbone(model, ControlAdapterConfig(num_blocks=2))
    x = inputs(model.config, b=8, t=1, h=4, w=4, seed=3)
    control = control_like(x, seed=4)
    mix = torch.randn(control.shape[-1], model.config.in_channels, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        target = model(**x) + 0.5 * torch.tanh(control @ mix)

    def loss_with(c: torch.Tensor) -> torch.Tensor:
        with with_control(model, adapter, c):
            return (model(**x) - target).square().mean()

    with torch.no_grad():
        start = loss_with(control).item()
        assert loss_with(torch.zeros_like(control)).item() == start  # no-op at init, whatever the control
    opt = torch.optim.AdamW(adapter.parameters(), lr=3e-3)
    begin = time.perf_counter()
    for _ in range(100):
        opt.zero_grad()
        loss = loss_with(control)
        loss.backward()
        opt.step()
    assert time.perf_counter() - begin < 30
    with torch.no_grad():
        real, zeros = loss_with(control).item(), loss_with(torch.zeros_like(control)).item()
        shuffled = loss_with(control.roll(1, dims=0)).item()
    assert real < 0.3 * start, (start, real)
    assert real < 0.5 * zeros and real < 0.5 * shuffled, (real, zeros, shuffled)


def test_sampler_batch_and_checkpointed_blocks():
    model = backbone()
    adapter = ControlAdapter.from_backbone(model, ControlAdapterConfig(hint_blocks=spread(2, 2)))
    with torch.no_grad():
        for p in adapter.hint_out.parameters():
            p.normal_(0, 0.05)
    x = inputs(model.config, b=1)
    control = control_like(x)
    with torch.no_grad(), with_control(model, adapter, control):
        one = model(**x)
        # The sampler stacks its guidance passes along the batch: a control of batch 1 serves all three.
        three = model(**{k: torch.cat([v] * 3) for k, v in x.items()})
    assert torch.allclose(three, one.repeat(3, 1, 1), atol=1e-5)
    # Checkpointed blocks recompute in backward; the hints must come out the same with and without.
    adapter.zero_grad()
    with with_control(model, adapter, control):
        model(**x).square().sum().backward()
    # The last context block's text-stream outputs feed nothing, so those weights get no gradient.
    plain_grads = [None if p.grad is None else p.grad.clone() for p in adapter.parameters()]
    assert sum(g is not None for g in plain_grads) > len(plain_grads) // 2
    apply_activation_checkpointing(model)
    adapter.zero_grad()
    with with_control(model, adapter, control):
        model(**x).square().sum().backward()
    for g, p in zip(plain_grads, adapter.parameters()):
        assert (g is None and p.grad is None) or torch.allclose(g, p.grad, atol=1e-6)


def test_reference_latent():
    model = backbone()
    adapter = ControlAdapter.from_backbone(model, ControlAdapterConfig(reference=True))
    with torch.no_grad():
        for p in adapter.hint_out.parameters():
            p.normal_(0, 0.05)
    x = inputs(model.config, t=2, h=3, w=4)
    control = control_like(x)
    ref = torch.randn(2, 12, model.config.in_channels)
    with torch.no_grad():
        with with_control(model, adapter, control, reference=ref):
            a = model(**x)
        with with_control(model, adapter, control, reference=torch.zeros_like(ref)):
            b = model(**x)
    assert not torch.allclose(a, b)
    with pytest.raises(ValueError, match="reference=True"), with_control(model, adapter, control):
        model(**x)
    with pytest.raises(ValueError, match="one latent frame"), with_control(model, adapter, control, ref[:, :5]):
        model(**x)


def test_save_and_load(tmp_path):
    model = backbone()
    cfg = ControlAdapterConfig(num_blocks=1, hint_blocks=[1], kinds=["flow", "depth"])
    adapter = ControlAdapter.from_backbone(model, cfg)
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(0.01 * torch.randn_like(p))
    out = save_adapter(adapter, tmp_path / "adapter")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert json.loads((out / "config.json").read_text())["kinds"] == ["flow", "depth"]
    loaded = load_adapter(out, model)
    assert loaded.config == cfg and loaded.hint_blocks == [1]
    for (k, v), (k2, v2) in zip(adapter.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    x = inputs(model.config)
    control = control_like(x, kinds=2)
    with torch.no_grad():
        assert torch.equal(
            ControlledMMDiT(model, adapter)(**x, control=control), ControlledMMDiT(model, loaded)(**x, control=control)
        )
    wide = backbone(hidden_size=96, num_heads=6, axes_dim=[4, 6, 6])
    with pytest.raises(ValueError, match="does not fit this backbone"):
        load_adapter(out, wide)


def test_config_errors():
    cfg = PRESETS["debug"]()  # depth 2
    for bad, match in [
        ({"num_blocks": 3}, "num_blocks"),
        ({"num_blocks": 2, "hint_blocks": [0]}, "one backbone block per context block"),
        ({"num_blocks": 2, "hint_blocks": [1, 0]}, "ascending"),
        ({"num_blocks": 1, "hint_blocks": [2]}, "in \\[0, 2\\)"),
        ({"kinds": ["edges", "edges"]}, "once"),
        ({"kinds": ["normals"]}, "unknown control kinds"),
    ]:
        with pytest.raises(ValueError, match=match):
            ControlAdapter(ControlAdapterConfig(**bad), cfg)
    assert spread(3, 19) == [0, 6, 12]
    model = backbone()
    adapter = ControlAdapter(ControlAdapterConfig(), cfg)
    x = inputs(cfg)
    with pytest.raises(ValueError, match="width"), with_control(model, adapter, control_like(x, kinds=2)):
        model(**x)
