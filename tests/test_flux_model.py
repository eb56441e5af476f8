"""Flux.1-dev text-to-image model: reference parity, guidance embedding, the fused (BFL) key layout and its loading."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import FIXTURES, needs_fixtures
from distributed import run_workers
from safetensors.torch import load_file, save_file

from cinedit.eval.parity import check_fixture
from cinedit.generator.loading import (
    fuse_qkv_state_dict,
    has_fused_qkv,
    infer_config,
    load_pretrained,
    save_pretrained,
    split_qkv_state_dict,
)
from cinedit.generator.math import make_ids, make_txt_ids
from cinedit.generator.model import MMDiT, MMDiTConfig, config_from_reference
from cinedit.generator.parallel import ContextParallel

FLUX = "flux_dev_tiny.json"


def flux_config(**changes) -> MMDiTConfig:
    """A tiny Flux.1-dev: guidance_in, no cond_in, interleaved RoPE, patch 2."""
    fields = dict(
        in_channels=64,
        patch_size=2,
        hidden_size=96,
        num_heads=2,
        depth=2,
        depth_single_blocks=3,
        mlp_ratio=2.0,
        axes_dim=[8, 20, 20],
        vec_in_dim=24,
        context_in_dim=40,
        cond_embed=False,
        rope_layout="interleaved",
        guidance_embed=True,
    )
    return MMDiTConfig(**{**fields, **changes})


def flux_model(seed: int = 0, **changes) -> MMDiT:
    torch.manual_seed(seed)
    return MMDiT(flux_config(**changes)).eval()


def inputs(cfg: MMDiTConfig, b: int = 3, t: int = 1, h: int = 3, w: int = 4, l_txt: int = 7, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "img": torch.randn(b, t * h * w, cfg.in_channels, generator=g),
        "img_ids": make_ids(t, h, w, batch=b),
        "txt": torch.randn(b, l_txt, cfg.context_in_dim, generator=g),
        "txt_ids": make_txt_ids(b, l_txt),
        "timesteps": torch.rand(b, generator=g),
        "vec": torch.randn(b, cfg.vec_in_dim, generator=g),
        "guidance": 1 + 4 * torch.rand(b, generator=g),
    }


def bfl_file(model: MMDiT, path) -> dict[str, torch.Tensor]:
    """Save `model` as BFL's single flux1-dev file (fused q/k/v, no prefix); returns what was written."""
    state = fuse_qkv_state_dict({k: v.contiguous() for k, v in model.state_dict().items()}, model.config)
    save_file(state, str(path))
    return state


# Parity with the reference.


@needs_fixtures(FLUX)
def test_flux_dev_tiny_matches_the_reference():
    report = check_fixture(FIXTURES / FLUX)
    assert report.component == "flux" and report.ok, [r for r in report.results if not r.ok]
    names = {r.name for r in report.results}
    assert {"output", "output_unpacked", "intermediate.guidance_in", "intermediate.pe_embedder"} <= names
    assert max(r.max_abs_diff for r in report.results) <= 2e-5


@needs_fixtures(FLUX)
def test_flux_dev_tiny_fused_weights_round_trip_exactly_and_guidance_matters():
    meta = json.loads((FIXTURES / FLUX).read_text())
    tensors = load_file(str(FIXTURES / meta["file"]))
    fused = {k.removeprefix("state_dict."): v for k, v in tensors.items() if k.startswith("state_dict.")}
    cfg = config_from_reference(meta["config"])
    assert (cfg.guidance_embed, cfg.cond_embed, cfg.rope_layout, cfg.patch_size) == (True, False, "interleaved", 2)
    assert has_fused_qkv(fused)
    split = split_qkv_state_dict(fused, cfg)
    assert not has_fused_qkv(split) and "single_blocks.1.v_mlp.weight" in split
    back = fuse_qkv_state_dict(split, cfg)
    assert list(back) == list(fused)  # same keys, same order
    assert all(torch.equal(back[k], fused[k]) for k in fused)

    model = MMDiT(cfg).eval()
    model.load_state_dict(split, strict=True)
    x = [tensors[n] for n in ("img", "img_ids", "txt", "txt_ids", "timesteps", "y_vec")]
    with torch.no_grad():
        more = model(*x, guidance=tensors["guidance"] + 1)
    diff = (more - tensors["output"]).abs().max().item()
    assert diff == pytest.approx(meta["checks"]["guidance_plus_1_output_max_abs_diff"], abs=1e-4)


# The fused key layout.


def test_split_and_fuse_are_inverse_and_exact():
    model = flux_model(1)
    ours = model.state_dict()
    fused = fuse_qkv_state_dict(ours, model.config)
    h, mlp = model.config.hidden_size, model.config.mlp_hidden
    assert fused["double_blocks.1.txt_attn.qkv.weight"].shape == (3 * h, h)
    assert fused["single_blocks.2.linear1.bias"].shape == (3 * h + mlp,)
    assert not any(".q_proj." in k or ".v_mlp." in k for k in fused)
    # Rows [0, h) are q, [h, 2h) k and the rest v followed by the MLP input.
    w = fused["single_blocks.0.linear1.weight"]
    assert torch.equal(w[h : 2 * h], ours["single_blocks.0.k_proj.weight"])
    assert torch.equal(w[2 * h :], ours["single_blocks.0.v_mlp.weight"])
    back = split_qkv_state_dict(fused, model.config)
    assert set(back) == set(ours) and all(torch.equal(back[k], ours[k]) for k in ours)
    # Unfused keys pass through, so splitting an unfused state dict changes nothing.
    assert split_qkv_state_dict(ours, model.config).keys() == ours.keys()


def test_split_and_fuse_refuse_a_wrong_width():
    model = flux_model()
    fused = fuse_qkv_state_dict(model.state_dict(), model.config)
    with pytest.raises(ValueError, match="linear1.weight has .* rows"):
        split_qkv_state_dict(fused, flux_config(mlp_ratio=4.0))
    with pytest.raises(ValueError, match="qkv.weight has .* rows"):
        split_qkv_state_dict(fused, flux_config(hidden_size=48, num_heads=1, axes_dim=[8, 20, 20]))
    partial = {k: v for k, v in model.state_dict().items() if k != "double_blocks.0.img_attn.v_proj.bias"}
    with pytest.raises(ValueError, match="without all of"):
        fuse_qkv_state_dict(partial, model.config)


# Loading a BFL-style single file.


def test_bfl_file_with_a_tiny_head_dim_needs_the_rope_axes(tmp_path):
    model = flux_model(2)
    path = tmp_path / "flux1-dev.safetensors"
    state = bfl_file(model, path)
    with pytest.raises(ValueError, match="head dim 48 is not the release's 128"):
        load_pretrained(path)
    assert infer_config(state, axes_dim=[8, 20, 20]) == model.config
    loaded = load_pretrained(path, config=infer_config(state, axes_dim=[8, 20, 20]))
    x = inputs(model.config)
    with torch.no_grad():
        assert torch.equal(loaded(**x), model(**x))


def test_bfl_file_at_the_release_head_dim_loads_with_an_inferred_config(tmp_path):
    # Head dim 128 like flux1-dev (one head, one block of each kind); only the widths are small.
    model = flux_model(3, hidden_size=128, num_heads=1, depth=1, depth_single_blocks=1, axes_dim=[16, 56, 56])
    path = tmp_path / "flux1-dev.safetensors"
    bfl_file(model, path)
    loaded = load_pretrained(path)
    cfg = loaded.config
    assert cfg == model.config
    assert (cfg.guidance_embed, cfg.cond_embed, cfg.rope_layout, cfg.patch_size) == (True, False, "interleaved", 2)
    x = inputs(cfg, b=2)
    with torch.no_grad():
        assert torch.equal(loaded(**x), model(**x))
    # Our own folder format keeps the split layout and the config, guidance_embed included.
    again = load_pretrained(save_pretrained(loaded, tmp_path / "ours"))
    assert again.config == cfg and "guidance_in.in_layer.weight" in again.state_dict()
    with torch.no_grad():
        assert torch.equal(again(**x), model(**x))


def test_a_release_file_still_infers_the_release_layout(tmp_path):
    torch.manual_seed(4)
    cfg = MMDiTConfig(
        hidden_size=128, num_heads=1, depth=1, depth_single_blocks=1, vec_in_dim=8, context_in_dim=16
    )  # unfused, cond_in, rotate-half: the Open-Sora release's layout
    model = MMDiT(cfg)
    path = tmp_path / "release.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    loaded = load_pretrained(path)
    assert loaded.config == cfg and not loaded.config.guidance_embed and loaded.config.rope_layout == "rotate_half"


# Guidance.


def test_guidance_changes_the_output_and_is_required():
    model = flux_model(5)
    x = inputs(model.config)
    with torch.no_grad():
        out = model(**x)
        other = model(**{**x, "guidance": x["guidance"] + 1})
    assert (out - other).abs().max() > 1e-3
    with pytest.raises(ValueError, match="guidance-distilled"):
        model(**{**x, "guidance": None})


def test_guidance_is_refused_by_a_model_without_guidance_in():
    model = flux_model(6, guidance_embed=False)
    assert model.guidance_in is None and not any(k.startswith("guidance_in") for k in model.state_dict())
    x = inputs(model.config)
    with torch.no_grad():
        model(**{**x, "guidance": None})
    with pytest.raises(ValueError, match="no guidance_in"):
        model(**x)


def test_config_from_reference_takes_flux_options():
    ref = {
        "in_channels": 64,
        "vec_in_dim": 32,
        "context_in_dim": 48,
        "hidden_size": 64,
        "mlp_ratio": 4.0,
        "num_heads": 4,
        "depth": 2,
        "depth_single_blocks": 2,
        "axes_dim": [4, 6, 6],
        "theta": 10000,
        "qkv_bias": True,
        "guidance_embed": True,
        "cond_embed": False,
    }
    cfg = config_from_reference(ref)  # the release's img_flux dict: fused_qkv and use_liger_rope take defaults
    assert (cfg.guidance_embed, cfg.rope_layout, cfg.patch_size, cfg.cond_embed) == (True, "interleaved", 2, False)
    # fused_qkv is the checkpoint's key layout, not the model's: the same model either way.
    assert all(config_from_reference({**ref, "fused_qkv": fused}) == cfg for fused in (False, True))
    assert not config_from_reference({k: v for k, v in ref.items() if k != "guidance_embed"}).guidance_embed
    with pytest.raises(ValueError, match="fused_qkv must be True or False"):
        config_from_reference({**ref, "fused_qkv": "yes"})
    with pytest.raises(ValueError, match="guidance_embed must be True or False"):
        flux_config(guidance_embed=1)


# Context parallelism.


def _cp_worker(rank: int, world: int, state: dict, x: dict) -> torch.Tensor:
    model = flux_model()
    model.load_state_dict(state)
    with torch.no_grad():
        return ContextParallel(mode="ulysses")(model, **x)


def test_context_parallel_passes_guidance_on():
    model = flux_model()
    x = inputs(model.config, b=2, h=3, w=3, l_txt=5)
    with torch.no_grad():
        want = model(**x)
    for out in run_workers(_cp_worker, 2, model.state_dict(), x):
        torch.testing.assert_close(out, want, atol=1e-5, rtol=0)
