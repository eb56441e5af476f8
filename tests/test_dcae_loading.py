"""Video DC-AE weights: our folder format, release-style single files, key adapters, image DC-AE inflation."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from cinedit.runtime.modelio import adapt_state_dict, read_state_dict
from cinedit.tokenizer.loading import init_from_image_dcae, load_pretrained, save_pretrained
from cinedit.tokenizer.model import PRESETS, VideoDCAE

BLOCKS = ["ResBlock", "ResBlock", "ResBlock", "EfficientViTBlock", "EfficientViTBlock", "EfficientViTBlock"]


def tiny_image_dcae(latent_channels: int = 16, seed: int = 0):
    """A random diffusers AutoencoderDC with the dc-ae-f32c32-sana layout at tiny widths."""
    from diffusers import AutoencoderDC

    torch.manual_seed(seed)
    ae = AutoencoderDC(
        latent_channels=latent_channels,
        encoder_block_types=BLOCKS,
        decoder_block_types=BLOCKS,
        encoder_block_out_channels=(8, 16, 32, 32, 64, 64),
        decoder_block_out_channels=(8, 16, 32, 32, 64, 64),
        encoder_layers_per_block=(1, 1, 1, 2, 1, 1),
        decoder_layers_per_block=(1, 2, 1, 1, 1, 1),
        encoder_qkv_multiscales=((), (), (), (5,), (5,), (5,)),
        decoder_qkv_multiscales=((), (), (), (5,), (5,), (5,)),
        upsample_block_type="interpolate",
        downsample_block_type="Conv",
        decoder_norm_types="rms_norm",
        decoder_act_fns="silu",
        scaling_factor=0.41407,
    ).eval()
    # Default init leaves norms at 1/0; perturb every tensor so each one matters.
    with torch.no_grad():
        for p in ae.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return ae


def test_inflated_image_dcae_matches_image_model_at_t1():
    ae = tiny_image_dcae()
    model = init_from_image_dcae(ae).eval()
    assert model.config.latent_channels == 16 and model.scaling_factor == 0.41407
    x = torch.rand(2, 3, 64, 96) * 2 - 1
    with torch.no_grad():
        z_img = ae.encode(x).latent
        rec_img = ae.decode(z_img).sample
        z = model.encode(x[:, :, None])
        rec = model.decode(z)
    assert z.shape == (2, 16, 1, 2, 3)
    torch.testing.assert_close(z[:, :, 0], z_img, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(rec[:, :, 0], rec_img, atol=1e-4, rtol=1e-4)
    # Video frames start out as independent images (before the temporal stages mix them).
    video = x[:, :, None].repeat(1, 1, 8, 1, 1)
    with torch.no_grad():
        assert model.encode(video).shape == (2, 16, 2, 2, 3)


def test_inflation_from_a_saved_diffusers_folder(tmp_path):
    ae = tiny_image_dcae(seed=1)
    ae.save_pretrained(tmp_path / "image_dcae")
    model = init_from_image_dcae(tmp_path / "image_dcae")
    x = torch.rand(1, 3, 1, 64, 64) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(model.encode(x)[:, :, 0], ae.encode(x[:, :, 0]).latent, atol=1e-4, rtol=1e-4)


def test_unsupported_image_dcae_is_refused():
    from diffusers import AutoencoderDC

    ae = AutoencoderDC(
        latent_channels=16,
        encoder_block_types=BLOCKS,
        decoder_block_types=BLOCKS,
        encoder_block_out_channels=(8, 16, 32, 32, 64, 64),
        decoder_block_out_channels=(8, 16, 32, 32, 64, 64),
        encoder_layers_per_block=(1,) * 6,
        decoder_layers_per_block=(1,) * 6,
        upsample_block_type="pixel_shuffle",
        downsample_block_type="Conv",
    )
    with pytest.raises(ValueError, match="upsample_block_type"):
        init_from_image_dcae(ae)


def test_save_and_load_our_format(tmp_path):
    torch.manual_seed(0)
    model = VideoDCAE(PRESETS["debug"]())
    save_pretrained(model, tmp_path / "m")
    assert json.loads((tmp_path / "m" / "config.json").read_text())["latent_channels"] == 16
    loaded = load_pretrained(tmp_path / "m")
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    assert not list((tmp_path / "m").glob(".*tmp"))


def test_release_style_single_file_with_wrapper_prefix(tmp_path):
    torch.manual_seed(0)
    model = VideoDCAE(PRESETS["debug"]())
    save_file({f"module.{k}": v.to(torch.bfloat16) for k, v in model.state_dict().items()}, tmp_path / "r.safetensors")
    loaded = load_pretrained(tmp_path / "r.safetensors", config=PRESETS["debug"]())
    w = "encoder.project_in.conv.weight"
    torch.testing.assert_close(loaded.state_dict()[w], model.state_dict()[w].to(torch.bfloat16).float())
    assert adapt_state_dict({"module.model.a": 1, "module.model.b": 2}) == {"a": 1, "b": 2}
    assert adapt_state_dict({"x.a": 1, "y.b": 2}, prefix="x.") == {"a": 1}
    assert sorted(read_state_dict(tmp_path / "r.safetensors"))[0].startswith("module.")


def test_bad_checkpoints_fail_clearly(tmp_path):
    save_file({"foo": torch.zeros(1)}, tmp_path / "x.safetensors")
    with pytest.raises(ValueError, match="not a Video DC-AE checkpoint"):
        load_pretrained(tmp_path / "x.safetensors")
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        load_pretrained(tmp_path / "nope.safetensors")
    (tmp_path / "x.pt").write_bytes(b"")
    with pytest.raises(ValueError, match="only safetensors"):
        load_pretrained(tmp_path / "x.pt")
    state = VideoDCAE(PRESETS["debug"]()).state_dict()
    state.pop("decoder.project_out.op_list.0.bias")
    save_file(state, tmp_path / "partial.safetensors")
    with pytest.raises(ValueError, match="1 missing keys"):
        load_pretrained(tmp_path / "partial.safetensors", config=PRESETS["debug"]())
