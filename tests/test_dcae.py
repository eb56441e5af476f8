"""Video DC-AE: parity with the reference fixtures, release state-dict schema, shapes, errors, gradients."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import FIXTURES, needs_fixtures
from safetensors.torch import load_file

from cinedit.tokenizer import model as dcae_model
from cinedit.tokenizer.model import PRESETS, DCAEConfig, VideoDCAE, config_from_reference, load_weights

# Suggested by the fixtures' README for an fp32 CPU re-implementation: (atol, rtol).
TOLERANCES = {"refinit": (1e-5, 0.0), "randw": (1e-4, 1e-4)}


def load_fixture(name: str) -> tuple[dict, dict[str, torch.Tensor], VideoDCAE]:
    """The fixture's JSON, its tensors, and our model built from its recorded config with its weights (strict)."""
    meta = json.loads((FIXTURES / f"{name}.json").read_text())
    tensors = load_file(FIXTURES / meta["file"])
    model = VideoDCAE(config_from_reference(meta["constructor"]["resolved_config"])).eval()
    load_weights(model, FIXTURES / meta.get("weights_file", meta["file"]), prefix="state_dict.")
    return meta, tensors, model


def assert_close(actual: torch.Tensor, expected: torch.Tensor, variant: str, what: str) -> None:
    atol, rtol = TOLERANCES[variant]
    diff = (actual - expected).abs().max().item()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.allclose(actual, expected, atol=atol, rtol=rtol), f"{what}: max abs diff {diff:.3g}"


@needs_fixtures("dcae_tiny_*.json")
@pytest.mark.parametrize("case", ["video", "image"])
@pytest.mark.parametrize("variant", ["refinit", "randw"])
def test_fixture_parity(case: str, variant: str) -> None:
    _, tensors, model = load_fixture(f"dcae_tiny_{case}_{variant}")
    x = tensors["input"]
    with torch.no_grad():
        latent = model.encode(x)
        recon = model.decode(tensors["latent"], num_frames=x.shape[2])
        forward = model(x)
    assert_close(latent, tensors["latent"], variant, "latent")
    assert_close(recon, tensors["reconstruction"], variant, "reconstruction")
    assert_close(forward, tensors["reconstruction"], variant, "forward")


@needs_fixtures("dcae_tiny_video_refinit.json")
def test_fixture_weights_are_release_keys() -> None:
    meta, _, model = load_fixture("dcae_tiny_video_refinit")
    assert len(model.state_dict()) == meta["num_state_dict_tensors"] == 138
    assert sum(p.numel() for p in model.parameters()) == meta["num_parameters"]
    assert sum(p.numel() for p in VideoDCAE(PRESETS["debug"]()).parameters()) == meta["num_parameters"]


@needs_fixtures("schema_dcae_f32t4c128.json")
def test_full_size_schema() -> None:
    schema = json.loads((FIXTURES / "schema_dcae_f32t4c128.json").read_text())
    with torch.device("meta"):
        model = VideoDCAE(PRESETS["f32t4c128"]())
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert ours == {k: v["shape"] for k, v in schema["keys"].items()}
    assert len(ours) == 339
    assert sum(p.numel() for p in model.parameters()) == schema["total_parameters"] == 459_462_147
    assert list(model.buffers()) == []
    assert config_from_reference(schema["resolved_config"]).latent_channels == 128


@pytest.fixture(scope="module")
def tiny() -> VideoDCAE:
    torch.manual_seed(0)
    return VideoDCAE(PRESETS["debug"]()).eval()


@pytest.mark.parametrize("frames", [1, 4, 8, 12])
def test_round_trip_shapes(tiny: VideoDCAE, frames: int) -> None:
    x = torch.rand(2, 3, frames, 64, 32) * 2 - 1
    with torch.no_grad():
        z = tiny.encode(x)
        assert z.shape == (2, 16, max(1, frames // 4), 2, 1) == (2, *tiny.latent_shape(frames, 64, 32))
        assert tiny.decode(z, num_frames=frames).shape == x.shape
        assert tiny(x).shape == x.shape


def test_single_latent_frame_decodes_to_image_or_four_frames(tiny: VideoDCAE) -> None:
    z = torch.randn(1, 16, 1, 1, 1)
    with torch.no_grad():
        assert tiny.decode(z).shape == (1, 3, 1, 32, 32)
        assert tiny.decode(z, num_frames=4).shape == (1, 3, 4, 32, 32)
        assert tiny.decode(torch.randn(1, 16, 3, 1, 1)).shape == (1, 3, 12, 32, 32)
    with pytest.raises(ValueError, match="num_frames=1 or 4"):
        tiny.decode(z, num_frames=2)
    with pytest.raises(ValueError, match="num_frames=8"):
        tiny.decode(torch.randn(1, 16, 2, 1, 1), num_frames=1)


@pytest.mark.parametrize("frames", [2, 3, 5, 6, 9])
def test_rejects_bad_frame_counts(tiny: VideoDCAE, frames: int) -> None:
    with pytest.raises(ValueError, match="multiple of 4.*trim to"):
        tiny.encode(torch.zeros(1, 3, frames, 32, 32))


@pytest.mark.parametrize("size", [(48, 64), (64, 40)])
def test_rejects_bad_spatial_size(tiny: VideoDCAE, size: tuple[int, int]) -> None:
    with pytest.raises(ValueError, match="multiples of 32.*resize or crop"):
        tiny.encode(torch.zeros(1, 3, 1, *size))
    with pytest.raises(ValueError, match=r"expected \(b, 3"):
        tiny.encode(torch.zeros(1, 4, 1, 32, 32))


def test_batched_equals_per_sample(tiny: VideoDCAE) -> None:
    x = torch.rand(3, 3, 8, 64, 64) * 2 - 1
    with torch.no_grad():
        batched = tiny.encode(x)
        single = torch.cat([tiny.encode(x[i : i + 1]) for i in range(3)])
        torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-5)
        recon = tiny.decode(batched)
        torch.testing.assert_close(recon, torch.cat([tiny.decode(z[None]) for z in batched]), atol=1e-5, rtol=1e-5)


def test_gradients_reach_every_parameter() -> None:
    torch.manual_seed(0)
    model = VideoDCAE(PRESETS["debug"]())
    x = torch.rand(1, 3, 4, 32, 64) * 2 - 1
    (model(x) - x).abs().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"no gradient reaches {name}"


def test_scaling_helpers(tiny: VideoDCAE) -> None:
    model = VideoDCAE(PRESETS["debug"]())
    model.load_state_dict(tiny.state_dict())
    model.scaling_factor = 0.5
    x = torch.rand(1, 3, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_latents(x), tiny.encode(x) / 0.5)
        z = torch.randn(1, 16, 1, 1, 1)
        torch.testing.assert_close(model.decode_latents(z), tiny.decode(z * 0.5))
    assert PRESETS["f32t4c128"]().scaling_factor == 0.493


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="multiple of head_dim 32"):
        DCAEConfig(encoder_width_list=[128, 256, 512, 500, 1024, 1024])
    with pytest.raises(ValueError, match="encoder_depth_list has 5 entries"):
        DCAEConfig(encoder_depth_list=[2, 2, 2, 3, 3])
    with pytest.raises(ValueError, match="latent_channels 100 must divide"):
        DCAEConfig(latent_channels=100)
    with pytest.raises(ValueError, match="same number of True"):
        DCAEConfig(temporal_upsample=[False] * 6)
    with pytest.raises(ValueError, match="unknown block type"):
        DCAEConfig(decoder_block_types=["ResBlock"] * 5 + ["Attention"])
    cfg = PRESETS["debug"]()
    assert (VideoDCAE(cfg).spatial_compression, VideoDCAE(cfg).temporal_compression) == (32, 4)


def test_config_from_reference_rejects_unsupported_options() -> None:
    ref = {
        "latent_channels": 16,
        "encoder": {"width_list": [32, 32], "depth_list": [1, 1], "block_type": "ResBlock"},
        "decoder": {"width_list": [32, 32], "depth_list": [1, 1], "block_type": "ResBlock"},
    }
    ref["encoder"]["temporal_downsample"] = ref["decoder"]["temporal_upsample"] = [False, False]
    assert config_from_reference(ref).encoder_block_types == ["ResBlock", "ResBlock"]
    ref["encoder"]["downsample_block_type"] = "ConvPixelUnshuffle"
    with pytest.raises(ValueError, match="encoder.downsample_block_type='ConvPixelUnshuffle'"):
        config_from_reference(ref)


def test_model_file_has_no_parallelism_imports() -> None:
    source = Path(dcae_model.__file__).read_text()
    assert "torch.distributed" not in source and "colossalai" not in source
