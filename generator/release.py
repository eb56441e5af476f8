"""The public Open-Sora 2.0 release as it is downloaded: a folder laid out as its Hugging Face repositories are.

    Open_Sora_v2.safetensors        11B MMDiT on HunyuanVAE latents     (hpcai-tech/Open-Sora-v2)
    hunyuan_vae.safetensors         HunyuanVideo causal VAE             (hpcai-tech/Open-Sora-v2)
    google/t5-v1_1-xxl/             T5-XXL text encoder                 (hpcai-tech/Open-Sora-v2)
    openai/clip-vit-large-patch14/  CLIP-L text encoder                 (hpcai-tech/Open-Sora-v2)
    flux1-dev.safetensors           Flux.1-dev, the t2i2v first frame   (black-forest-labs/FLUX.1-dev)
    flux1-dev-ae.safetensors        its 2D autoencoder (ae.safetensors) (black-forest-labs/FLUX.1-dev)
    Open_Sora_v2_Video_DC_AE.safetensors + F32T4C128_AE.safetensors     (hpcai-tech/Open-Sora-v2-Video-DC-AE)

Which files a preset needs: the HunyuanVAE presets the first four (+ the two Flux files for `t2i2v_*`), the
high-compression preset the DC-AE pair and the two text encoders.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from cinedit.configs.generator import TEXT_ENCODERS, SamplerConfig
from cinedit.configs.inference import InferencePreset
from cinedit.generator.loading import load_pretrained as load_generator
from cinedit.generator.pipeline import Pipeline, check_compatible
from cinedit.generator.text import load_text_encoder
from cinedit.tokenizer.loading import load_tokenizer

GENERATOR = "Open_Sora_v2.safetensors"
HUNYUAN_VAE = "hunyuan_vae.safetensors"
T5 = "google/t5-v1_1-xxl"
CLIP = "openai/clip-vit-large-patch14"
FLUX = "flux1-dev.safetensors"
FLUX_AE = "flux1-dev-ae.safetensors"
DCAE_GENERATOR = "Open_Sora_v2_Video_DC_AE.safetensors"
DCAE = "F32T4C128_AE.safetensors"

DOWNLOADS = {
    GENERATOR: "huggingface-cli download hpcai-tech/Open-Sora-v2 --local-dir {root}",
    HUNYUAN_VAE: "huggingface-cli download hpcai-tech/Open-Sora-v2 --local-dir {root}",
    T5: "huggingface-cli download hpcai-tech/Open-Sora-v2 --local-dir {root}",
    CLIP: "huggingface-cli download hpcai-tech/Open-Sora-v2 --local-dir {root}",
    FLUX: "huggingface-cli download black-forest-labs/FLUX.1-dev flux1-dev.safetensors --local-dir {root}",
    FLUX_AE: (
        "huggingface-cli download black-forest-labs/FLUX.1-dev ae.safetensors --local-dir {root} && "
        "mv {root}/ae.safetensors {root}/flux1-dev-ae.safetensors"
    ),
    DCAE_GENERATOR: "huggingface-cli download hpcai-tech/Open-Sora-v2-Video-DC-AE --local-dir {root}",
    DCAE: "huggingface-cli download hpcai-tech/Open-Sora-v2-Video-DC-AE --local-dir {root}",
}


def is_release_folder(path: str | os.PathLike) -> bool:
    """Whether `path` is a folder holding release files (rather than a cinedit pipeline folder)."""
    root = Path(path)
    return root.is_dir() and any((root / name).exists() for name in (GENERATOR, DCAE_GENERATOR, HUNYUAN_VAE, DCAE))


def needed_files(preset: InferencePreset) -> dict[str, str]:
    """{part: file name} the preset reads from a release folder."""
    files = {"t5": T5, "clip": CLIP}
    if preset.tokenizer == "dcae":
        files.update(generator=DCAE_GENERATOR, tokenizer=DCAE)
    else:
        files.update(generator=GENERATOR, tokenizer=HUNYUAN_VAE)
    if preset.cond_type == "t2i2v":
        files.update(flux=FLUX, flux_ae=FLUX_AE)
    return files


def release_paths(root: str | os.PathLike, preset: InferencePreset, t2i: bool | None = None) -> dict[str, Path]:
    """{part: path} of the files a preset needs (t2i: also the Flux pair, default: when the preset is t2i2v);
    FileNotFoundError naming every missing one and the command that downloads it."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"--ckpt {root}: no such folder (download the release into it, see the README)")
    files = needed_files(preset)
    if t2i:
        files.update(flux=FLUX, flux_ae=FLUX_AE)
    missing = [name for name in files.values() if not (root / name).exists()]
    if missing:
        commands = sorted({DOWNLOADS[name].format(root=root) for name in missing})
        raise FileNotFoundError(
            f"{root} lacks {', '.join(missing)} (preset {preset.name}); download with:\n  " + "\n  ".join(commands)
        )
    return {part: root / name for part, name in files.items()}


def load_release(
    root: str | os.PathLike,
    preset: InferencePreset,
    device: str = "cpu",
    t2i: bool | None = None,
    idle_device: str | None = None,
) -> Pipeline:
    """The release's models for `preset` from a downloaded folder, in eval mode on `idle_device` (default `device`;
    `--offload` loads them on the CPU and moves each to the GPU only for its use)."""
    paths = release_paths(root, preset, t2i)
    where = idle_device or device
    gen = load_generator(paths["generator"]).to(where).eval().requires_grad_(False)
    tok = load_tokenizer(paths["tokenizer"], where)
    if not preset.tokenizer_scaling:
        tok.scaling_factor = None  # the DC-AE release's inference config samples unscaled latents
    text_cfg = dataclasses.replace(TEXT_ENCODERS["release"], t5=str(paths["t5"]), clip=str(paths["clip"]))
    text = load_text_encoder(text_cfg, device=where)
    check_compatible(gen, tok, text_cfg, text)
    flux = flux_ae = None
    if "flux" in paths:
        flux = load_generator(paths["flux"]).to(where).eval().requires_grad_(False)
        flux_ae = load_tokenizer(paths["flux_ae"], where)
    sampler = SamplerConfig(
        num_steps=preset.num_steps,
        guidance=preset.guidance,
        guidance_img=preset.guidance_img,
        text_osci=preset.text_osci,
        image_osci=preset.image_osci,
        temporal_osci=preset.temporal_osci,
        shift=preset.shift,
    )
    return Pipeline(gen, tok, text, text_cfg, sampler, float(preset.fps), t2i_generator=flux, t2i_tokenizer=flux_ae)


__all__ = ["DOWNLOADS", "is_release_folder", "load_release", "needed_files", "release_paths"]
