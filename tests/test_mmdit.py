"""MMDiT generator: reference parity, release schemas, the debug preset, checkpointing, loading, packing."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import FIXTURES, needs_fixtures
from safetensors.torch import load_file, save_file

from cinedit.cli import main
from cinedit.eval.parity import fixture_inputs
from cinedit.generator import math as gmath
from cinedit.generator.loading import infer_config, load_pretrained, save_pretrained
from cinedit.generator.math import make_ids, make_txt_ids, pack, unpack
from cinedit.generator.model import PRESETS, MMDiT, MMDiTConfig, config_from_reference
from cinedit.generator.parallel import apply_activation_checkpointing

MMDIT = sorted(FIXTURES.glob("mmdit_*.json"))


def fixture(name: str) -> tuple[dict, dict[str, torch.Tensor]]:
    meta = json.loads((FIXTURES / f"{name}.json").read_text())
    return meta, fixture_inputs(load_file(FIXTURES / meta["file"]))  # the reference's input names -> ours


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


def debug_model(seed: int = 0, **changes) -> MMDiT:
    torch.manual_seed(seed)
    model = MMDiT(MMDiTConfig(**{**PRESETS["debug"]().__dict__, **changes})).eval()
    with torch.no_grad():  # make the zero-initialised i2v branch visible in the outputs
        model.cond_in.weight.normal_(0, 0.1)
    return model


# Parity with the reference fixtures.


@needs_fixtures("mmdit_*.json")
def test_every_shared_mmdit_fixture_passes(capsys):
    assert main(["eval", "parity", *map(str, MMDIT)]) == 0
    out = capsys.readouterr().out
    assert out.count("max abs diff") >= 16 * len(MMDIT)  # output, output_unpacked, >= 14 intermediates each
    assert "FAIL" not in out and "output_unpacked" in out


@needs_fixtures("mmdit_tiny_p2_liger.json")
def test_tampered_weights_fail(tmp_path, capsys):
    name = "mmdit_tiny_p2_liger"
    meta, tensors = fixture(name)
    tensors["state_dict.single_blocks.1.norm.key_norm.scale"] += 0.05
    save_file(tensors, tmp_path / meta["file"])
    shutil.copy(FIXTURES / f"{name}.json", tmp_path)
    assert main(["eval", "parity", str(tmp_path / f"{name}.json")]) == 1
    out = capsys.readouterr()
    assert "FAIL" in out.out and "1 of 1 fixture(s) failed" in out.err


@needs_fixtures("mmdit_tiny_p2_liger.json", "mmdit_tiny_p2_flux.json")
def test_rope_layouts_differ_with_the_same_weights():
    meta, tensors = fixture("mmdit_tiny_p2_liger")
    _, flux = fixture("mmdit_tiny_p2_flux")
    state = {k.removeprefix("state_dict."): v for k, v in tensors.items() if k.startswith("state_dict.")}
    cfg = config_from_reference({**meta["config"], "use_liger_rope": False})
    assert cfg.rope_layout == "interleaved"
    model = MMDiT(cfg).eval()
    model.load_state_dict(state, strict=True)
    names = ("img", "img_ids", "txt", "txt_ids", "timesteps", "vec")
    with torch.no_grad():
        out = model(*(tensors[n] for n in names), cond=tensors["cond"])
    torch.testing.assert_close(out, flux["output"], atol=2e-5, rtol=0)
    diff = (out - tensors["output"]).abs().max().item()
    assert 0.01 < diff < 0.1
    assert diff == pytest.approx(meta["other_rope_layout_same_weights_max_abs_diff"], abs=1e-5)


def reference_config(cfg: MMDiTConfig) -> dict:
    """Our config in the reference's names (as a fixture records it)."""
    ref = {k: v for k, v in cfg.__dict__.items() if k != "rope_layout"}
    extra = {"use_liger_rope": cfg.rope_layout == "rotate_half", "guidance_embed": False, "fused_qkv": False}
    return {**ref, **extra, "from_pretrained": None, "cache_dir": None}


@pytest.mark.parametrize(
    "changes",
    [
        dict(
            hidden_size=96, num_heads=2, axes_dim=[8, 20, 20], depth=1, depth_single_blocks=3, rope_layout="interleaved"
        ),
        dict(in_channels=64, patch_size=2, mlp_ratio=2.0, qkv_bias=False, depth=3, depth_single_blocks=0),
    ],
)
def test_parity_command_on_other_configs_and_call_shapes(tmp_path, capsys, changes):
    model = debug_model(3, **changes)
    cfg = model.config
    x = inputs(cfg, b=3, t=2, h=2, w=3, l_txt=7)
    with torch.no_grad():
        out = model(**x)
    tensors = {f"state_dict.{k}": v.contiguous() for k, v in model.state_dict().items()}
    save_file({**tensors, **x, "output": out}, tmp_path / "mmdit_other.safetensors")
    meta = {"component": "MMDiT, another config", "file": "mmdit_other.safetensors", "config": reference_config(cfg)}
    (tmp_path / "mmdit_other.json").write_text(json.dumps(meta))
    assert main(["eval", "parity", str(tmp_path / "mmdit_other.json")]) == 0
    assert "output" in capsys.readouterr().out


def test_config_from_reference_rejects_what_is_not_built():
    ref = reference_config(PRESETS["debug"]())
    # The fused q/k/v layout is a checkpoint format (split on loading), not another model.
    assert config_from_reference({**ref, "fused_qkv": True}) == PRESETS["debug"]()
    with pytest.raises(ValueError, match="fused_qkv"):
        config_from_reference({**ref, "fused_qkv": "yes"})
    with pytest.raises(ValueError, match="depth_single_blocks"):
        config_from_reference({k: v for k, v in ref.items() if k != "depth_single_blocks"})
    # The reference's defaults: patch 2, no cond_in, Flux RoPE.
    bare = {k: v for k, v in ref.items() if k not in ("patch_size", "cond_embed", "use_liger_rope")}
    cfg = config_from_reference(bare)
    assert (cfg.patch_size, cfg.cond_embed, cfg.rope_layout) == (2, False, "interleaved")
    assert config_from_reference({**ref, "use_liger_rope": None, "rope_layout": "liger"}).rope_layout == "rotate_half"
    assert config_from_reference({**ref, "grad_ckpt_settings": [1, 2], "model_type": "MMDiT"}) == PRESETS["debug"]()


def test_qkv_bias_concerns_double_blocks_only():
    model = MMDiT(MMDiTConfig(**{**PRESETS["debug"]().__dict__, "qkv_bias": False}))
    keys = set(model.state_dict())
    assert "double_blocks.0.img_attn.q_proj.bias" not in keys and "double_blocks.1.txt_attn.v_proj.bias" not in keys
    assert {"single_blocks.0.q_proj.bias", "single_blocks.0.k_proj.bias", "single_blocks.0.v_mlp.bias"} <= keys


# Full-size presets against the release's schemas.


@needs_fixtures("schema_mmdit_11b_hunyuanvae.json", "schema_mmdit_11b_dcae_high_compression.json")
@pytest.mark.parametrize(
    "preset, schema, params",
    [("11b", "hunyuanvae", 11_891_390_528), ("11b-dcae", "dcae_high_compression", 11_891_971_200)],
)
def test_release_presets_match_the_schema(preset, schema, params):
    doc = json.loads((FIXTURES / f"schema_mmdit_11b_{schema}.json").read_text())
    with torch.device("meta"):
        model = MMDiT(PRESETS[preset]())
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    theirs = {k: v["shape"] for k, v in doc["keys"].items()}
    assert sorted(set(ours) ^ set(theirs)) == []
    assert {k: s for k, s in ours.items() if theirs[k] != s} == {}
    assert len(ours) == doc["num_tensors"] == 1082
    assert model.num_params() == doc["total_parameters"] == params
    assert model.config == config_from_reference(doc["config"])


def test_2b_preset_size():
    with torch.device("meta"):
        model = MMDiT(PRESETS["2b"]())
    assert model.config.head_dim == 128 and model.num_params() == 2_143_102_592


# The debug preset.


def test_debug_forward_shapes_and_batch_independence():
    model = debug_model()
    x = inputs(model.config, b=3)
    with torch.no_grad():
        out = model(**x)
        alone = model(**{k: v[1:2] for k, v in x.items()})
    assert out.shape == x["img"].shape
    torch.testing.assert_close(out[1:2], alone, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out[0], out[1])


def test_cond_none_is_a_zero_condition():
    model = debug_model()
    x = inputs(model.config)
    with torch.no_grad():
        none = model(**{**x, "cond": None})
        zeros = model(**{**x, "cond": torch.zeros_like(x["cond"])})
        given = model(**x)
    torch.testing.assert_close(none, zeros)
    assert (given - zeros).abs().max() > 1e-3
    plain = MMDiT(MMDiTConfig(**{**PRESETS["debug"]().__dict__, "cond_embed": False}))
    assert plain.cond_in is None
    with pytest.raises(ValueError, match="cond_embed"):
        plain(**x)


def test_gradients_reach_every_parameter():
    model = debug_model().train()
    out = model(**inputs(model.config))
    out.square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_attention_is_one_swappable_function(monkeypatch):
    model = debug_model()
    calls = []

    def spy(q, k, v):
        calls.append(q.shape)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)

    x = inputs(model.config)
    with torch.no_grad():
        expected = model(**x)
        monkeypatch.setattr(gmath, "attention", spy)
        torch.testing.assert_close(model(**x), expected)
    cfg = model.config
    assert len(calls) == cfg.depth + cfg.depth_single_blocks
    assert calls[0] == (2, cfg.num_heads, 5 + 2 * 3 * 4, cfg.head_dim)


def test_model_file_imports_no_distributed_code():
    source = Path(gmath.__file__).with_name("model.py").read_text() + Path(gmath.__file__).read_text()
    assert "torch.distributed" not in source and "colossalai" not in source


# Activation checkpointing.


@pytest.mark.parametrize("n_double, n_single", [(None, None), (1, 1), (0, 2)])
def test_checkpointing_keeps_outputs_and_gradients(n_double, n_single):
    model = debug_model().train()
    wrapped = copy.deepcopy(model)
    count = apply_activation_checkpointing(wrapped, n_double, n_single)
    assert count == (2 if n_double is None else n_double) + (2 if n_single is None else n_single)
    assert list(wrapped.state_dict()) == list(model.state_dict())
    x = inputs(model.config)
    outs = []
    for m in (model, wrapped):
        out = m(**x)
        out.square().mean().backward()
        outs.append(out.detach())
    torch.testing.assert_close(outs[0], outs[1], atol=0, rtol=0)
    for (name, a), b in zip(model.named_parameters(), wrapped.parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=0, rtol=0, msg=name)
    assert apply_activation_checkpointing(wrapped, n_double, n_single) == count  # idempotent


def test_checkpointed_model_copies_stay_independent():
    model = debug_model()
    apply_activation_checkpointing(model)
    ema = copy.deepcopy(model)
    with torch.no_grad():
        for p in ema.parameters():
            p.zero_()
        x = inputs(model.config)
        assert model(**x).abs().max() > 0  # the copy's blocks run on the copy's (zeroed) weights
        assert ema(**x).abs().max() == 0
    with pytest.raises(ValueError, match=">= 0"):
        apply_activation_checkpointing(model, -1, 0)


# Config validation.


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(num_heads=3), "divisible by num_heads"),
        (dict(axes_dim=[4, 6, 8]), "sum\\(axes_dim\\)"),
        (dict(axes_dim=[8, 8]), "three positive even"),
        (dict(patch_size=3), "patch_size must be 1 or 2"),
        (dict(in_channels=18, patch_size=2), "multiple of patch_size"),
        (dict(rope_layout="liger"), "rope_layout"),
        (dict(hidden_size=0), "hidden_size must be positive"),
        (dict(depth=-1), "block counts"),
        (dict(theta=0), "theta"),
    ],
)
def test_config_validation(changes, message):
    with pytest.raises(ValueError, match=message):
        MMDiTConfig(**{**PRESETS["debug"]().__dict__, **changes})


def test_forward_rejects_wrong_widths():
    model = debug_model()
    x = inputs(model.config)
    with pytest.raises(ValueError, match="in_channels"):
        model(**{**x, "img": x["img"][..., :-1]})


# Loading and saving.


def test_save_load_round_trip(tmp_path):
    model = debug_model(5)
    folder = save_pretrained(model, tmp_path / "m")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    loaded = load_pretrained(folder)
    assert loaded.config == model.config
    x = inputs(model.config)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**x), model(**x), atol=0, rtol=0)
    assert load_pretrained(folder, dtype=torch.bfloat16).img_in.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("in_channels, patch_size, qkv_bias", [(64, 2, True), (128, 1, False)])
def test_release_single_file_with_wrapper_prefix(tmp_path, in_channels, patch_size, qkv_bias):
    cfg = MMDiTConfig(
        in_channels=in_channels,
        patch_size=patch_size,
        hidden_size=256,
        num_heads=2,
        depth=1,
        depth_single_blocks=2,
        qkv_bias=qkv_bias,
        vec_in_dim=32,
        context_in_dim=48,
    )
    torch.manual_seed(0)
    model = MMDiT(cfg).eval()
    path = tmp_path / "release.safetensors"
    save_file({f"module.{k}": v.contiguous() for k, v in model.state_dict().items()}, path)
    loaded = load_pretrained(path)  # architecture read off the shapes (head dim 128 = release RoPE)
    assert loaded.config == cfg == infer_config(model.state_dict())
    x = inputs(cfg, l_txt=3)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**x), model(**x), atol=0, rtol=0)
    assert not loaded.double_blocks[0].img_attn.q_proj.weight.is_meta


def test_loading_errors(tmp_path):
    model = debug_model()
    path = tmp_path / "w.safetensors"
    save_file({f"module.{k}": v.contiguous() for k, v in model.state_dict().items()}, path)
    with pytest.raises(ValueError, match="head dim 16"):
        load_pretrained(path)
    loaded = load_pretrained(path, config=model.config)
    torch.testing.assert_close(loaded.final_layer.linear.weight, model.final_layer.linear.weight)
    with pytest.raises(ValueError, match="does not match"):
        load_pretrained(path, config=MMDiTConfig(**{**model.config.__dict__, "depth": 3}))
    with pytest.raises(FileNotFoundError):
        load_pretrained(tmp_path / "nothing.safetensors")
    save_file({"a": torch.zeros(1)}, tmp_path / "x.safetensors")
    with pytest.raises(ValueError, match="not an MMDiT"):
        load_pretrained(tmp_path / "x.safetensors")
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps({**model.config.__dict__, "colour": "red"}))
    save_file({"a": torch.zeros(1)}, tmp_path / "m" / "model.safetensors")
    with pytest.raises(ValueError, match="unknown MMDiTConfig fields"):
        load_pretrained(tmp_path / "m")


# Packing and positions.


@pytest.mark.parametrize("p", [1, 2])
def test_pack_unpack_round_trip(p):
    x = torch.randn(2, 5, 3, 4 * p, 6 * p)
    tokens = pack(x, p)
    assert tokens.shape == (2, 3 * 4 * 6, 5 * p * p)
    torch.testing.assert_close(unpack(tokens, p, 3, 4 * p, 6 * p), x, atol=0, rtol=0)
    # A token holds one patch: channel-major, then the patch's rows and columns.
    torch.testing.assert_close(tokens[0, 1 * 24 + 2 * 6 + 3], x[0, :, 1, 2 * p : 3 * p, 3 * p : 4 * p].reshape(-1))


def test_ids_layout():
    ids = make_ids(2, 3, 4, batch=2)
    assert ids.shape == (2, 24, 3) and ids.dtype == torch.float32
    assert ids[0, :5].tolist() == [[0, 0, 0], [0, 0, 1], [0, 0, 2], [0, 0, 3], [0, 1, 0]]
    assert ids[1, 23].tolist() == [1, 2, 3] and ids[1, 12].tolist() == [1, 0, 0]
    assert make_txt_ids(2, 7).abs().sum() == 0 and make_txt_ids(2, 7).shape == (2, 7, 3)


@needs_fixtures("mmdit_tiny_p2_liger.json", "mmdit_tiny_p1_liger.json")
@pytest.mark.parametrize("name, p", [("mmdit_tiny_p2_liger", 2), ("mmdit_tiny_p1_liger", 1)])
def test_packing_matches_the_reference_inputs(name, p):
    _, t = fixture(name)
    b, _, frames, h, w = t["latent_unpacked"].shape
    torch.testing.assert_close(pack(t["latent_unpacked"], p), t["img"], atol=0, rtol=0)
    torch.testing.assert_close(make_ids(frames, h // p, w // p, batch=b), t["img_ids"], atol=0, rtol=0)
    torch.testing.assert_close(pack(torch.cat([t["masks"], t["masked_ref"]], dim=1), p), t["cond"], atol=0, rtol=0)
    torch.testing.assert_close(unpack(t["output"], p, frames, h, w), t["output_unpacked"], atol=0, rtol=0)
    assert t["cond"].shape[-1] == t["img"].shape[-1] + p * p
