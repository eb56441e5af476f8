"""`cinedit generator sample --ckpt RELEASE_DIR`: a tiny random release folder laid out as the Hugging Face
repositories are (MMDiT, HunyuanVAE, T5, CLIP, Flux.1-dev, Flux AE; the MMDiTs at the release's head dim 128 so
their configs are read off the shapes as for the real files), sampled in every release mode."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from tiny_text import build_clip, build_t5

from cinedit.configs.inference import INFERENCE_PRESETS
from cinedit.data.video import probe, read_video, write_video
from cinedit.generator import generate as gen
from cinedit.generator import release
from cinedit.generator.inference import Offload, release_size
from cinedit.generator.loading import fuse_qkv_state_dict
from cinedit.generator.model import MMDiT, MMDiTConfig
from cinedit.tokenizer.flux_ae import FluxAE, FluxAEConfig
from cinedit.tokenizer.hunyuan import HunyuanVAE, HunyuanVAEConfig

H, W, FRAMES = 32, 48, 9
TXT, VEC = 32, 24

pytestmark = pytest.mark.usefixtures("one_thread")


def _save(model: torch.nn.Module, path, state=None) -> None:
    save_file({k: v.contiguous() for k, v in (state or model.state_dict()).items()}, str(path))


def _mmdit(**kw) -> MMDiTConfig:
    base = dict(in_channels=64, patch_size=2, hidden_size=128, num_heads=1, depth=1, depth_single_blocks=1)
    return MMDiTConfig(**base, mlp_ratio=2.0, vec_in_dim=VEC, context_in_dim=TXT, **kw)


@pytest.fixture(scope="module")
def release_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("release")
    torch.manual_seed(0)
    video_model = MMDiT(_mmdit())
    torch.nn.init.normal_(video_model.cond_in.weight, std=0.05)  # a conditioning branch that matters
    _save(video_model, root / release.GENERATOR)
    _save(
        HunyuanVAE(HunyuanVAEConfig(block_out_channels=(32, 32, 32, 32), layers_per_block=1)),
        root / release.HUNYUAN_VAE,
    )
    flux_cfg = _mmdit(guidance_embed=True, cond_embed=False, rope_layout="interleaved")
    flux = MMDiT(flux_cfg)
    _save(flux, root / release.FLUX, fuse_qkv_state_dict(flux.state_dict(), flux_cfg))  # BFL's fused layout
    _save(FluxAE(FluxAEConfig(ch=32, ch_mult=(1, 1, 1, 1), num_res_blocks=1)), root / release.FLUX_AE)
    build_t5(root / release.T5, d_model=TXT)
    build_clip(root / release.CLIP, hidden_size=VEC)
    return root


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    d = tmp_path_factory.mktemp("media")
    yy, xx = np.mgrid[:70, :100]
    photo = np.stack([127 + 100 * np.sin(xx / 7), 127 + 100 * np.cos(yy / 5), 127 + 80 * np.sin((xx + yy) / 11)], -1)
    Image.fromarray(photo.astype(np.uint8)).save(d / "photo.png")
    t = np.arange(FRAMES)[:, None, None, None]
    wave = (127 + 100 * np.sin((xx[None, :H, :W, None] + 3 * t) / 9)).astype(np.uint8)
    write_video(d / "clip.mp4", np.concatenate([wave, 255 - wave, wave // 2], -1), 24)
    return d


def run(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    gen.add_cli(parser.add_subparsers(required=True))
    args = parser.parse_args(["sample", *argv])
    args.argv = list(argv)
    return args.func(args)


def common(root, out, *extra: str) -> list[str]:
    size = ["--size", str(H), str(W), "--num-frames", str(FRAMES), "--steps", "2"]
    return ["--prompt", "a boat on a lake", *size, "--ckpt", str(root), "--out", str(out), "--quiet", *extra]


@pytest.mark.parametrize(
    "mode",
    [
        ["--motion-score", "3", "--offload"],  # t2v, the default for a release folder
        ["--cond-type", "i2v_head", "--ref", "photo.png", "--offload"],
        ["--cond-type", "t2i2v", "--t2i-resolution", "64px", "--motion-score", "4"],
        ["--cond-type", "v2v_head_half", "--ref", "clip.mp4", "--offload"],
    ],
    ids=["t2v", "i2v_head", "t2i2v", "v2v_head_half"],
)
def test_release_folder_samples_every_mode(release_dir, media, tmp_path, mode):
    mode = [str(media / m) if m.endswith((".png", ".mp4")) else m for m in mode]
    assert run(*common(release_dir, tmp_path, *mode)) == 0
    out = tmp_path / "0000_a-boat-on-a-lake.mp4"
    info = probe(out)
    assert (info.num_frames, info.height, info.width, info.fps) == (FRAMES, H, W, 24.0)
    video = read_video(out)
    assert video.std() > 0.01  # decoded content, not a constant frame
    if "t2i2v" in mode:
        first = np.asarray(Image.open(tmp_path / "0000_a-boat-on-a-lake.t2i.png"))
        assert first.shape == (*release_size("64px", "16:9", 16, training=True), 3)


def test_modes_differ_and_seeds_repeat(release_dir, media, tmp_path):
    assert run(*common(release_dir, tmp_path / "a", "--seed", "1")) == 0
    assert run(*common(release_dir, tmp_path / "b", "--seed", "1")) == 0
    assert run(*common(release_dir, tmp_path / "c", "--seed", "2")) == 0
    assert run(*common(release_dir, tmp_path / "d", "--seed", "1", "--ref", str(media / "photo.png"))) == 0
    a, b, c, d = (read_video(next((tmp_path / x).iterdir())) for x in "abcd")
    assert torch.equal(a, b)
    assert (a - c).abs().mean() > 0.01 and (a - d).abs().mean() > 0.01


def test_missing_release_files_are_named_with_their_download(release_dir, tmp_path, capsys):
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / release.GENERATOR).symlink_to(release_dir / release.GENERATOR)
    assert run(*common(partial, tmp_path / "out")) == 2
    err = capsys.readouterr().err
    for name in (release.HUNYUAN_VAE, release.T5, release.CLIP):
        assert name in err
    assert "huggingface-cli download hpcai-tech/Open-Sora-v2" in err and release.FLUX not in err
    # t2i2v needs the Flux pair too
    assert run(*common(partial, tmp_path / "out", "--cond-type", "t2i2v")) == 2
    err = capsys.readouterr().err
    assert release.FLUX in err and release.FLUX_AE in err and "black-forest-labs/FLUX.1-dev" in err
    assert not (tmp_path / "out").exists()


def test_release_prompt_suffixes():
    preset = INFERENCE_PRESETS["256px"]
    assert gen.prompt_text("a fox", preset, "4") == "a fox. 24 FPS. 4 motion score."
    assert gen.prompt_text("a fox", None, "4") == "a fox 4 motion score."
    assert gen.prompt_text("a fox", None, None) == "a fox"
    # presets: the release's sizes and frame counts
    assert release_size("256px", "16:9", preset.spatial_multiple) == (192, 336)
    assert release_size("768px", "16:9", 16) == (576, 1024)
    assert (preset.num_frames, INFERENCE_PRESETS["high_compression"].num_frames) == (129, 128)
    assert release_size("96px", "16:9", 16, training=True) == (64, 144)


def test_offload_moves_each_model_back_after_use():
    moves = []

    class Recorded(torch.nn.Linear):
        def to(self, device):  # record where the model is sent; stay on the CPU
            moves.append(str(device))
            return self

    model = Recorded(2, 2)
    with Offload(torch.device("cuda", 1), enabled=False).use(model):
        pass
    assert moves == []
    with Offload(torch.device("cuda", 1), enabled=True).use(model) as m:
        assert m is model and moves == ["cuda:1"]
    assert moves == ["cuda:1", "cpu"]


def test_high_compression_preset_reads_the_dcae_release(tmp_path):
    preset = INFERENCE_PRESETS["high_compression"]
    assert release.needed_files(preset) == {
        "t5": release.T5,
        "clip": release.CLIP,
        "generator": release.DCAE_GENERATOR,
        "tokenizer": release.DCAE,
    }
    (tmp_path / release.DCAE).touch()
    assert release.is_release_folder(tmp_path)
    with pytest.raises(
        FileNotFoundError, match="(?s)Open_Sora_v2_Video_DC_AE.safetensors.*hpcai-tech/Open-Sora-v2-Video-DC-AE"
    ):
        release.release_paths(tmp_path, preset)
    args = argparse.Namespace(preset=None, ckpt=str(tmp_path))
    assert gen._preset(args).name == "high_compression"  # a folder with the DC-AE files only
    assert not preset.tokenizer_scaling and preset.spatial_multiple == 32
