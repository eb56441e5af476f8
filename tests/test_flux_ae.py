"""The Flux AE tokenizer: reference parity, the release's (BFL) key names through `load_tokenizer`, the key
adapter's rules, folder round trips and the `cinedit tokenizer` commands on images and videos."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import FIXTURES, needs_fixtures
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from cinedit.cli import main
from cinedit.data.video import probe, write_video
from cinedit.eval.parity import check_fixture
from cinedit.tokenizer.flux_ae import FluxAE, FluxAEConfig, flux_ae_state_dict
from cinedit.tokenizer.loading import load_tokenizer, save_pretrained, tokenizer_hash

pytestmark = pytest.mark.usefixtures("one_thread")

FIXTURE = "flux_ae_tiny"


def bfl_state() -> dict[str, torch.Tensor]:
    """The fixture's weights under the release's key names (`state_dict.` stripped)."""
    with safe_open(str(FIXTURES / f"{FIXTURE}.safetensors"), framework="pt") as f:
        return {k.removeprefix("state_dict."): f.get_tensor(k) for k in f.keys() if k.startswith("state_dict.")}


def fixture_tensor(name: str) -> torch.Tensor:
    with safe_open(str(FIXTURES / f"{FIXTURE}.safetensors"), framework="pt") as f:
        return f.get_tensor(name)


@needs_fixtures(f"{FIXTURE}.*")
def test_parity_with_the_reference():
    report = check_fixture(FIXTURES / f"{FIXTURE}.json")
    names = {r.name for r in report.results}
    assert {"posterior_mean", "latent", "decoded", "latent_sampled", "sample_eps", "decoded_from_sampled"} <= names
    assert report.ok, [(r.name, r.max_abs_diff) for r in report.results if not r.ok]


def test_key_adapter_rules():
    w = torch.zeros(4, 4, 1, 1)
    state = {
        "encoder.norm_out.weight": torch.zeros(4),
        "encoder.down.1.block.0.nin_shortcut.weight": torch.zeros(1),
        "encoder.down.2.downsample.conv.bias": torch.zeros(1),
        "decoder.up.0.block.2.conv1.weight": torch.zeros(1),
        "decoder.up.3.upsample.conv.weight": torch.zeros(1),
        "decoder.mid.block_2.norm1.bias": torch.zeros(1),
        "encoder.mid.attn_1.norm.weight": torch.zeros(1),
        "encoder.mid.attn_1.k.weight": w,
        "decoder.mid.attn_1.proj_out.weight": w,
        "decoder.conv_in.weight": torch.zeros(1),
    }
    out = flux_ae_state_dict(state, num_levels=4)
    assert sorted(out) == sorted(
        [
            "encoder.conv_norm_out.weight",
            "encoder.down_blocks.1.resnets.0.conv_shortcut.weight",
            "encoder.down_blocks.2.downsamplers.0.conv.bias",
            "decoder.up_blocks.3.resnets.2.conv1.weight",  # decoder.up.i is level i, applied last first
            "decoder.up_blocks.0.upsamplers.0.conv.weight",
            "decoder.mid_block.resnets.1.norm1.bias",
            "encoder.mid_block.attentions.0.group_norm.weight",
            "encoder.mid_block.attentions.0.to_k.weight",
            "decoder.mid_block.attentions.0.to_out.0.weight",
            "decoder.conv_in.weight",
        ]
    )
    assert out["encoder.mid_block.attentions.0.to_k.weight"].shape == (4, 4)  # 1x1 conv -> Linear
    assert flux_ae_state_dict(out, num_levels=4).keys() == out.keys()  # our names pass through


@needs_fixtures(f"{FIXTURE}.*")
def test_release_file_loads_and_folder_round_trips(tmp_path):
    path = tmp_path / "flux1-dev-ae.safetensors"
    save_file(bfl_state(), str(path))
    model = load_tokenizer(path)
    cfg = FluxAEConfig(ch=32, ch_mult=(1, 1, 1, 2), num_res_blocks=1)
    assert isinstance(model, FluxAE) and model.config == cfg
    assert (model.spatial_compression, model.temporal_compression, model.causal) == (8, 1, False)
    x = fixture_tensor("input")
    with torch.no_grad():
        # Exact (0.0) where the fixtures were made; another CPU's kernels round differently (the fixtures README:
        # diffusers' Linear attention against the reference's 1x1 convs). Measured on a later machine: 3.8e-6 on the
        # mean, 1.4e-6 on the scaled latent.
        assert (model.encode(x) - fixture_tensor("posterior_mean")).abs().max() < 2e-5
        assert (model.encode_latents(x) - fixture_tensor("latent")).abs().max() < 1e-5
    folder = save_pretrained(model, tmp_path / "flux_ae")
    assert json.loads((folder / "config.json").read_text())["_class"] == "FluxAE"
    again = load_tokenizer(folder)
    assert isinstance(again, FluxAE) and again.config == cfg and tokenizer_hash(again) == tokenizer_hash(model)
    with torch.no_grad():
        assert torch.equal(again.decode(again.encode(x)), model(x))
    # A missing tensor is named.
    state = bfl_state()
    del state["decoder.up.1.block.0.conv2.weight"]
    save_file(state, str(path))
    with pytest.raises(ValueError, match="1 missing keys \\['decoder.up_blocks.2.resnets.0.conv2.weight'\\]"):
        load_tokenizer(path)


def test_frames_are_coded_alone_and_shapes_checked():
    torch.manual_seed(0)
    model = FluxAE(FluxAEConfig(ch=32, ch_mult=(1, 1), num_res_blocks=1)).eval()
    assert model.spatial_compression == 2 and model.latent_shape(3, 8, 6) == (16, 3, 4, 3)
    with pytest.raises(ValueError, match="multiples of 2, got 7x6: use height 6 or 8"):
        model.latent_shape(1, 7, 6)
    with pytest.raises(ValueError, match="multiples of 32"):
        FluxAEConfig(ch=16)
    x = torch.rand(2, 3, 3, 8, 6) * 2 - 1
    with torch.no_grad():
        z = model.encode(x)
        torch.testing.assert_close(z[1, :, 2:], model.encode(x[1:, :, 2:])[0])
        torch.testing.assert_close(model.encode_latents(x), 0.3611 * (z - 0.1159))
        torch.manual_seed(8)
        sampled = model.encode(x, sample=True)
        torch.manual_seed(8)
        mean, logvar = model.posterior(x)
        torch.testing.assert_close(sampled, mean + torch.exp(logvar / 2) * torch.randn(mean.shape))
        assert model.decode(z).shape == (2, 3, 3, 8, 6) and model.decode(z, num_frames=2).shape[2] == 2


def test_tokenizer_commands_on_an_image_and_a_video(tmp_path, capsys):
    torch.manual_seed(0)
    ckpt = save_pretrained(FluxAE(FluxAEConfig(ch=32, ch_mult=(1, 1, 1, 1), num_res_blocks=1)), tmp_path / "ae")
    yy, xx = np.mgrid[:40, :48]
    frames = 127 + 100 * np.sin(xx[None, ..., None] / 7 + yy[None, ..., None] / 5 + np.arange(3)[:, None, None, None])
    frames = np.repeat(frames.astype(np.uint8), 3, axis=-1)
    Image.fromarray(frames[0]).save(tmp_path / "photo.png")
    write_video(tmp_path / "clip.mp4", frames, 25)
    out = tmp_path / "photo_rec.png"
    assert main(["tokenizer", "reconstruct", str(tmp_path / "photo.png"), "--out", str(out), "--ckpt", str(ckpt)]) == 0
    assert Image.open(out).size == (48, 40) and "1 frame(s) 40x48" in capsys.readouterr().out
    lat = tmp_path / "clip.safetensors"
    assert main(["tokenizer", "encode", str(tmp_path / "clip.mp4"), "--out", str(lat), "--ckpt", str(ckpt)]) == 0
    with safe_open(str(lat), framework="pt") as f:
        meta, z = f.metadata(), f.get_tensor("latent")
    assert z.shape == (16, 3, 5, 6) and meta["tokenizer_kind"] == "flux_ae"
    assert float(meta["shift_factor"]) == pytest.approx(0.1159) and meta["num_frames"] == "3"
    back = tmp_path / "clip_rec.mp4"
    assert main(["tokenizer", "decode", str(lat), "--out", str(back), "--ckpt", str(ckpt)]) == 0
    assert probe(back).num_frames == 3
