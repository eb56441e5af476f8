"""The pipeline replay is not tied to the shared fixtures' configs: a fixture of the same format made here from tiny
random models of another config (batch of 2, i2v_tail, 11 steps so the guidance oscillates, tiled HunyuanVAE encode
and decode, other seeds and sizes) replays through `cinedit eval parity`, and a perturbed stored output fails."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from cinedit.configs.generator import SamplerConfig
from cinedit.data.video import read_reference
from cinedit.eval.parity import check_fixture
from cinedit.eval.parity_pipeline import RecordedText
from cinedit.generator.inference import Request, sample_videos
from cinedit.generator.model import MMDiT, config_from_reference
from cinedit.generator.pipeline import Pipeline
from cinedit.tokenizer import hunyuan

pytestmark = pytest.mark.usefixtures("one_thread")

MODEL = {
    "in_channels": 64, "patch_size": 2, "hidden_size": 64, "num_heads": 2, "depth": 1, "depth_single_blocks": 2,
    "mlp_ratio": 2.0, "axes_dim": [8, 12, 12], "theta": 10000, "qkv_bias": True, "vec_in_dim": 20,
    "context_in_dim": 28, "guidance_embed": False, "cond_embed": True, "fused_qkv": False, "use_liger_rope": True,
}  # fmt: skip
AE = {"block_out_channels": [8, 16, 16, 16], "layers_per_block": 1, "norm_num_groups": 8, "latent_channels": 16,
      "use_spatial_tiling": True, "use_temporal_tiling": False, "sample_size": 32}  # fmt: skip
OPTION = {
    "height": 48, "width": 80, "resolution": "64px", "aspect_ratio": "16:9", "num_frames": 13, "num_steps": 11,
    "guidance": 6.0, "guidance_img": 2.5, "text_osci": True, "image_osci": True, "scale_temporal_osci": True,
    "shift": True, "flow_shift": None, "seed": None,
}  # fmt: skip
PROMPTS = ["a kite over the dunes", "rain on a tin roof"]
SEED, REF_SEED = 123, 77


def _weights(model: torch.nn.Module, path) -> None:
    save_file({f"state_dict.{k}": v.contiguous() for k, v in model.state_dict().items()}, str(path))


@pytest.fixture(scope="module")
def fixture(tmp_path_factory):
    d = tmp_path_factory.mktemp("fixture")
    torch.manual_seed(5)
    gen = MMDiT(config_from_reference(MODEL)).eval()
    torch.nn.init.normal_(gen.cond_in.weight, std=0.1)
    tok = hunyuan.HunyuanVAE(hunyuan.config_from_reference(AE)).eval()
    _weights(gen, d / "model.safetensors")
    _weights(tok, d / "ae.safetensors")
    texts = [f"{p}. 24 FPS. 4 motion score." for p in PROMPTS]
    encoder_prompts = [*texts, ""]
    tensors = {}
    for i, _ in enumerate(encoder_prompts):
        tensors[f"txt.{i}"], tensors[f"vec.{i}"] = torch.randn(6, 28), torch.randn(20)
    rng = np.random.default_rng(0)
    refs = {}
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (60 + 10 * i, 90, 3), dtype=np.uint8)).save(d / f"ref{i}.png")
        refs[str(i)] = f"ref{i}.png"
    pipe = Pipeline(gen, tok, RecordedText(encoder_prompts, tensors), None, SamplerConfig(), 24.0)
    req = Request(
        texts,
        OPTION["num_frames"],
        (OPTION["height"], OPTION["width"]),
        SamplerConfig(num_steps=11, guidance=6.0, guidance_img=2.5, seed=SEED),
        cond_type="i2v_tail",
        refs=[read_reference(d / refs[str(i)], (48, 80)) for i in range(2)],
        ref_seed=REF_SEED,
        write_back="first",
    )
    trace = {}
    with torch.no_grad():
        sample_videos(pipe, req, trace=trace)
    tensors.update({k: v.contiguous() for k, v in trace.items()})
    save_file(tensors, str(d / "pipeline_own.safetensors"))
    meta = {
        "desc": "made by cinedit's own sampling path (tests/test_pipeline_fixture.py)",
        "components": {
            "model": {"weights_file": "model.safetensors", "key_prefix": "state_dict.", "config": MODEL},
            "model_ae": {"weights_file": "ae.safetensors", "key_prefix": "state_dict.", "factory_kwargs": AE},
        },
        "sampling_option": OPTION,
        "seed": SEED,
        "prompts": PROMPTS,
        "text_passed_to_api_fn": texts,
        "motion_score_text": [{"with_motion_score_4": "... 4 motion score."}],
        "text_encoders": {"encoder_prompts": encoder_prompts},
        "cond_type": "i2v_tail",
        "ref_png_files": refs,
        "ref_rng_seed": REF_SEED,
        "AE_SPATIAL_COMPRESSION": 16,
        "file": "pipeline_own.safetensors",
    }
    (d / "pipeline_own.json").write_text(json.dumps(meta))
    return d / "pipeline_own.json", trace


def test_own_config_fixture_replays(fixture):
    path, trace = fixture
    assert trace["output"].shape == (2, 3, 13, 48, 80) and trace["model_outputs"].shape[1] == 6
    # the release writes back batch item 0 only: item 1's last latent frame is generated, not the reference's
    last = trace["latent_final"][:, :, -1]
    assert torch.allclose(last[0], trace["ref_latent.0"][:, -1]) and not torch.allclose(
        last[1], trace["ref_latent.1"][:, -1]
    )
    report = check_fixture(path)
    assert report.ok, [r for r in report.results if not r.ok]
    names = {r.name for r in report.results}
    assert {"output", "latent_final", "ref_latent.1", "masked_ref", "model_outputs", "z", "prompt text"} <= names


def test_a_wrong_stored_output_fails(fixture, tmp_path):
    src, _ = fixture
    for f in src.parent.iterdir():
        shutil.copy(f, tmp_path / f.name)
    path = tmp_path / src.name
    tensors = load_file(str(path.with_suffix(".safetensors")))
    tensors["output"] = tensors["output"] + 1e-2
    save_file(tensors, str(path.with_suffix(".safetensors")))
    report = check_fixture(path)
    bad = [r.name for r in report.results if not r.ok]
    assert bad == ["output"]
