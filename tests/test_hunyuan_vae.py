"""The HunyuanVideo VAE tokenizer: reference parity on the shared fixtures, the release file through
`load_tokenizer`, the `cinedit tokenizer` and `cinedit eval recon` commands, shape rules and refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import FIXTURES, needs_fixtures
from safetensors import safe_open
from safetensors.torch import save_file

from cinedit.cli import main
from cinedit.data.video import probe, write_video
from cinedit.eval.parity import check_fixture
from cinedit.tokenizer import tiling
from cinedit.tokenizer.hunyuan import HunyuanVAE, HunyuanVAEConfig, hunyuan_state_dict
from cinedit.tokenizer.loading import load_tokenizer, save_pretrained, tokenizer_hash
from cinedit.tokenizer.model import PRESETS, VideoDCAE

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(block_out_channels=(8, 16, 32, 32), layers_per_block=1, norm_num_groups=8)


@pytest.fixture(scope="module")
def tiny() -> HunyuanVAE:
    torch.manual_seed(0)
    return HunyuanVAE(HunyuanVAEConfig(**TINY)).eval()


@pytest.fixture(scope="module")
def release_file(tiny, tmp_path_factory):
    """The tiny model as a release-style single file: `hunyuan_vae.safetensors`, the reference's key names."""
    path = tmp_path_factory.mktemp("ckpt") / "hunyuan_vae.safetensors"
    save_file({k: v.contiguous() for k, v in tiny.state_dict().items()}, str(path))
    return path


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """A 10-frame 64x96 moving pattern (a causal VAE takes 9 of them)."""
    d = tmp_path_factory.mktemp("clips")
    t = np.arange(10)[:, None, None, None]
    yy, xx = np.mgrid[:64, :96]
    frames = (127 + 100 * np.sin((xx[None, ..., None] + 3 * t) / 9 + yy[None, ..., None] / 13)).astype(np.uint8)
    write_video(d / "wave.mp4", np.repeat(frames, 3, axis=-1), 25)
    return d / "wave.mp4"


@needs_fixtures("hunyuanvae_tiny_video.*", "hunyuanvae_tiny_image.*", "hunyuanvae_tiny_video_tiled.*")
@pytest.mark.parametrize("name", ["hunyuanvae_tiny_video", "hunyuanvae_tiny_image", "hunyuanvae_tiny_video_tiled"])
def test_parity_with_the_reference(name):
    report = check_fixture(FIXTURES / f"{name}.json")
    names = {r.name for r in report.results}
    assert {"posterior_mean", "posterior_logvar", "latent", "decoded", "latent_sampled", "sample_eps"} <= names
    if name.endswith("image"):
        assert "intermediate.decoder.up_blocks.3" in names and "intermediate.quant_conv" in names
    assert report.ok, [(r.name, r.max_abs_diff) for r in report.results if not r.ok]


@needs_fixtures("hunyuanvae_tiny_video_tiled.*")
def test_tiled_fixture_is_tiled():
    """The tiled fixture's tiles change the result a lot: the same model untiled must not match it."""
    meta = json.loads((FIXTURES / "hunyuanvae_tiny_video_tiled.json").read_text())
    with safe_open(str(FIXTURES / "hunyuanvae_tiny_video.safetensors"), framework="pt") as f:
        state = {k.removeprefix("state_dict."): f.get_tensor(k) for k in f.keys() if k.startswith("state_dict.")}
    with safe_open(str(FIXTURES / "hunyuanvae_tiny_video_tiled.safetensors"), framework="pt") as f:
        x, want = f.get_tensor("input"), f.get_tensor("posterior_mean")
    cfg = meta["constructor"]["factory_kwargs"]
    model = HunyuanVAE(HunyuanVAEConfig(**{k: cfg[k] for k in ("block_out_channels", "norm_num_groups")}))
    model.load_state_dict(hunyuan_state_dict(state), strict=True)
    model.config.tile_sample_size = 32
    with torch.no_grad():
        assert (model.encode(x) - want).abs().max() < 2e-5
        model.config.spatial_tiling = False
        assert (model.encode(x) - want).abs().max() > 0.1


def test_shapes_and_sampling(tiny):
    assert tiny.latent_shape(9, 40, 64) == (16, 3, 5, 8) and tiny.latent_shape(1, 8, 8) == (16, 1, 1, 1)
    assert tiny.decoded_frames(3) == 9 and tiny.decoded_frames(1) == 1
    assert tiny.config.latent_channels == tiny.latent_channels == 16 and tiny.causal and tiny.native_tiling
    with pytest.raises(ValueError, match="1 \\+ 4k.*got 8: use 5 or 9 frames"):
        tiny.latent_shape(8, 40, 64)
    with pytest.raises(ValueError, match="multiples of 8, got 50x64: use height 48 or 56"):
        tiny.latent_shape(5, 50, 64)
    x = torch.rand(1, 3, 5, 16, 24) * 2 - 1
    with torch.no_grad():
        mean, logvar = tiny.posterior(x)
        assert mean.shape == (1, 16, 2, 2, 3) and torch.equal(tiny.encode(x), mean)
        # Sampling with no generator draws from the global RNG, on the CPU in float32.
        torch.manual_seed(5)
        a = tiny.encode(x, sample=True)
        torch.manual_seed(5)
        eps = torch.randn(mean.shape)
        torch.testing.assert_close(a, mean + torch.exp(logvar / 2) * eps)
        b = tiny.encode(x, sample=True, generator=torch.Generator().manual_seed(5))
        assert torch.equal(a, b) and not torch.equal(a, mean)
        z = tiny.encode_latents(x)
        torch.testing.assert_close(z, 0.476986 * mean)
        rec = tiny.decode_latents(z)
        assert rec.shape == (1, 3, 5, 16, 24) and tiny.decode_latents(z, num_frames=3).shape[2] == 3
        with pytest.raises(ValueError, match="decode to 5 frames"):
            tiny.decode(mean, num_frames=6)
        # The DC-AE tiler hands a self-tiling model the whole clip.
        cfg = tiling.TilingConfig(spatial_tile=32, temporal_tile=4, enabled=True, progress=False)
        assert torch.equal(tiling.encode(tiny, x, cfg), mean)
        assert torch.equal(tiling.decode(tiny, mean, cfg, num_frames=5), tiny.decode(mean))
        assert torch.equal(tiling.chunked_latents(tiny, x, 4), z)


def test_tile_sizes_the_reference_cannot_stitch_are_refused():
    with pytest.raises(ValueError, match="tile_sample_size=48.*use e.g. 32 or 64"):
        HunyuanVAEConfig(**TINY, tile_sample_size=48)
    with pytest.raises(ValueError, match="4 entries"):
        HunyuanVAEConfig(block_out_channels=(8, 16, 32), norm_num_groups=8)
    HunyuanVAEConfig(**TINY, tile_sample_size=64, tile_overlap=0.5)


def test_release_file_loads_and_folder_round_trips(tiny, release_file, tmp_path):
    model = load_tokenizer(release_file)
    assert isinstance(model, HunyuanVAE) and not any(p.requires_grad for p in model.parameters())
    # The group count is not in the shapes: 32 does not divide 8, so the largest that divides every width is taken.
    assert model.config == HunyuanVAEConfig(**TINY)
    x = torch.rand(1, 3, 5, 16, 16) * 2 - 1
    with torch.no_grad():
        assert torch.equal(model.encode(x), tiny.encode(x))
    folder = save_pretrained(model, tmp_path / "hunyuan")
    assert json.loads((folder / "config.json").read_text())["_class"] == "HunyuanVAE"
    again = load_tokenizer(folder)
    assert isinstance(again, HunyuanVAE) and again.config == model.config
    with torch.no_grad():
        assert torch.equal(again.encode(x), tiny.encode(x))
    # The hash names the architecture: the DC-AE's differs, tiling settings do not count.
    h = tokenizer_hash(again)
    again.config.spatial_tiling = False
    assert tokenizer_hash(again) == h != tokenizer_hash(VideoDCAE(PRESETS["debug"]()))
    assert tokenizer_hash(HunyuanVAE(HunyuanVAEConfig(**{**TINY, "layers_per_block": 2}))) != h


def test_missing_keys_are_named(tiny, tmp_path):
    state = {f"vae.{k}": v.contiguous() for k, v in tiny.state_dict().items()}  # a wrapper prefix is stripped
    del state["vae.decoder.conv_out.conv.bias"]
    path = tmp_path / "hunyuan_vae.safetensors"
    save_file(state, str(path))
    with pytest.raises(ValueError, match="1 missing keys \\['decoder.conv_out.conv.bias'\\]"):
        load_tokenizer(path)
    with pytest.raises(ValueError, match="not a HunyuanVideo VAE checkpoint"):
        hunyuan_state_dict({"decoder.conv_in.weight": torch.zeros(1)})


def test_tokenizer_commands_keep_causal_frame_counts(release_file, clip, tmp_path, capsys):
    ckpt = str(release_file)
    out = tmp_path / "rec.mp4"
    assert main(["tokenizer", "reconstruct", str(clip), "--out", str(out), "--ckpt", ckpt, "--device", "cpu"]) == 0
    assert "9 frame(s) 64x96" in capsys.readouterr().out
    assert (probe(out).num_frames, probe(out).height, probe(out).width) == (9, 64, 96)
    lat = tmp_path / "wave.safetensors"
    assert main(["tokenizer", "encode", str(clip), "--out", str(lat), "--ckpt", ckpt, "--max-frames", "7"]) == 0
    with safe_open(str(lat), framework="pt") as f:
        meta, z = f.metadata(), f.get_tensor("latent")
    assert z.shape == (16, 2, 8, 12) and meta["num_frames"] == "5"  # 7 frames trimmed to 1 + 4k
    assert meta["tokenizer_kind"] == "hunyuan_vae" and float(meta["scaling_factor"]) == pytest.approx(0.476986)
    assert float(meta["shift_factor"]) == 0.0 and meta["scaled"] == "False"
    dec = tmp_path / "back.mp4"
    assert main(["tokenizer", "decode", str(lat), "--out", str(dec), "--ckpt", ckpt]) == 0
    assert probe(dec).num_frames == 5
    # Sizes follow the model's own rule (multiples of 8), and a tile size its reference cannot stitch is refused.
    assert main(["tokenizer", "reconstruct", str(clip), "--out", str(tmp_path / "s.mp4"), "--ckpt", ckpt,
                 "--size", "44", "64"]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert "44x64 is not a multiple of 8" in err and "--pad" in err
    assert main(["tokenizer", "reconstruct", str(clip), "--out", str(tmp_path / "t.mp4"), "--ckpt", ckpt,
                 "--tile-size", "48"]) == 2  # fmt: skip
    assert "use e.g. 32 or 64" in capsys.readouterr().err


def test_recon_compares_two_tokenizers_in_one_report(release_file, clip, tmp_path, capsys):
    torch.manual_seed(0)
    dcae = save_pretrained(VideoDCAE(PRESETS["debug"]()), tmp_path / "dcae")
    out = tmp_path / "report"
    argv = ["eval", "recon", str(clip), "--ckpt", str(dcae), "--ckpt", str(release_file), "--out", str(out)]
    assert main([*argv, "--num-frames", "9", "--quiet"]) == 0
    report = json.loads((out / "recon.json").read_text())
    rows = {r["label"]: r for r in report["tokenizers"]}
    assert sorted(rows) == ["dcae", "hunyuan_vae.safetensors"]
    assert rows["dcae"]["kind"] == "dcae" and rows["hunyuan_vae.safetensors"]["kind"] == "hunyuan_vae"
    # Each reads the frames it takes: 8 for the DC-AE, 9 (1 + 4k) for the causal VAE.
    assert rows["dcae"]["clips"][0]["frames"] == 8 and rows["hunyuan_vae.safetensors"]["clips"][0]["frames"] == 9
    assert rows["dcae"]["mean"]["psnr"] != rows["hunyuan_vae.safetensors"]["mean"]["psnr"]
    assert report["settings"]["ckpt"] == [str(dcae), str(release_file)] and "mean" not in report
    md = (out / "recon.md").read_text()
    assert "| tokenizer | kind | clips | frames | PSNR (dB) |" in md
    assert "| dcae | dcae | 1 | 8 |" in md and "| hunyuan_vae.safetensors | hunyuan_vae | 1 | 9 |" in md
    assert "dcae: 1 clip(s)" in capsys.readouterr().out
