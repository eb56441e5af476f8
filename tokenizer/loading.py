"""Reading and writing tokenizer weights: our format, the releases' single files, and image DC-AE inflation.

- Ours: a folder with `config.json` (the config, with the model class in `_class`) and `model.safetensors`
  (`save_pretrained`), for the Video DC-AE, the HunyuanVideo VAE and the Flux AE alike.
- The releases: one safetensors file each, told apart by their key names (`load_tokenizer`): the Video DC-AE's
  (`load_pretrained`), `hunyuan_vae.safetensors` (`load_hunyuan_vae`) and `flux1-dev-ae.safetensors` (`load_flux_ae`).
- An image DC-AE as diffusers' `AutoencoderDC` holds it (`init_from_image_dcae`): keys are mapped to ours and
  every 2D kernel is inflated to 3D by putting it in the temporal centre slice, so a T = 1 input (whose
  temporal neighbours are the zero padding) gives exactly the image model's output.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from cinedit.configs.tokenizer import DEBUG_TOKENIZER
from cinedit.runtime import modelio
from cinedit.runtime.modelio import save_model_folder
from cinedit.tokenizer.flux_ae import FluxAE, FluxAEConfig, is_flux_ae_state, load_flux_ae
from cinedit.tokenizer.hunyuan import HunyuanVAE, HunyuanVAEConfig, is_hunyuan_state, load_hunyuan_vae
from cinedit.tokenizer.model import PRESETS, DCAEConfig, VideoDCAE

DEBUG_TOKENIZER_SEED = 0

Tokenizer = VideoDCAE | HunyuanVAE | FluxAE
# Model folders record their class (`_class` in config.json); a folder without one is a Video DC-AE.
TOKENIZER_CLASSES: dict[str, tuple[type, type]] = {
    "VideoDCAE": (VideoDCAE, DCAEConfig),
    "HunyuanVAE": (HunyuanVAE, HunyuanVAEConfig),
    "FluxAE": (FluxAE, FluxAEConfig),
}
# How a tokenizer runs, not what it computes: left out of `tokenizer_hash`, so its latents stay valid.
RUNTIME_FIELDS = ("tile_sample_size", "tile_overlap", "spatial_tiling", "temporal_tiling", "tile_sample_frames")
DCAE_KEY = "encoder.project_out.main.op_list.0.conv.weight"


def save_pretrained(model: Tokenizer, out_dir: str | os.PathLike) -> Path:
    """Write `config.json` + `model.safetensors` into `out_dir`, each atomically (weights first)."""
    return save_model_folder(model, model.config, out_dir)


def read_config(path: str | os.PathLike) -> DCAEConfig:
    """The `DCAEConfig` saved in a model folder's `config.json`."""
    return modelio.read_config(path, DCAEConfig)


def release_config(state: dict[str, torch.Tensor]) -> DCAEConfig:
    """The release preset matching a checkpoint's latent width (128 or 256 channels)."""
    key = DCAE_KEY
    if key not in state:
        raise ValueError(
            f"not a Video DC-AE checkpoint: no `{key}` among its {len(state)} tensors "
            f"(first keys: {sorted(state)[:3]}); for an image DC-AE use init_from_image_dcae"
        )
    channels = state[key].shape[0]
    presets = {128: "f32t4c128", 256: "f32t4c256"}
    if channels not in presets:
        raise ValueError(f"checkpoint has {channels} latent channels; pass its DCAEConfig explicitly")
    return PRESETS[presets[channels]]()


def load_pretrained(
    path: str | os.PathLike, config: DCAEConfig | None = None, prefix: str | None = None, strict: bool = True
) -> VideoDCAE:
    """A Video DC-AE from our model folder or from a release-style single safetensors file.

    Args:
        config: the architecture of a single-file checkpoint; by default the release preset that matches
            its latent width.
        prefix: key prefix to strip (default: common wrapper prefixes such as `module.` are removed).
    """
    saved, state = modelio.read_checkpoint(path, DCAEConfig, prefix)
    config = config or saved
    model = VideoDCAE(config or release_config(state))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if strict and (missing or unexpected):
        raise ValueError(
            f"{path} does not match the model: {len(missing)} missing keys (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:3]}); pass the right config or prefix"
        )
    return model


# Image DC-AE (diffusers AutoencoderDC) -> Video DC-AE key renames, applied in order to the part after
# `{encoder.down_blocks|decoder.up_blocks}.i.j.`.
_BLOCK_RENAMES = [
    (r"^conv1\.", "main.conv1.conv."),
    (r"^conv2\.", "main.conv2.conv."),
    (r"^norm\.", "main.conv2.norm."),
    (r"^attn\.to_out\.", "context_module.main.proj.conv."),
    (r"^attn\.norm_out\.", "context_module.main.proj.norm."),
    (r"^attn\.to_qkv_multiscale\.(\d+)\.proj_in\.", r"context_module.main.aggreg.\1.0."),
    (r"^attn\.to_qkv_multiscale\.(\d+)\.proj_out\.", r"context_module.main.aggreg.\1.1."),
    (r"^conv_out\.conv_inverted\.", "local_module.main.inverted_conv.conv."),
    (r"^conv_out\.conv_depth\.", "local_module.main.depth_conv.conv."),
    (r"^conv_out\.conv_point\.", "local_module.main.point_conv.conv."),
    (r"^conv_out\.norm\.", "local_module.main.point_conv.norm."),
]
_TOP_RENAMES = {
    "encoder.conv_in.": "encoder.project_in.conv.",
    "encoder.conv_out.": "encoder.project_out.main.op_list.0.conv.",
    "decoder.conv_in.": "decoder.project_in.main.conv.",
    "decoder.norm_out.": "decoder.project_out.op_list.0.",
    "decoder.conv_out.": "decoder.project_out.op_list.2.conv.",
}


def _rename(key: str) -> str | None:
    for src, dst in _TOP_RENAMES.items():
        if key.startswith(src):
            return dst + key[len(src) :]
    m = re.match(r"^(encoder)\.down_blocks\.(\d+)\.(\d+)\.(.*)$", key) or re.match(
        r"^(decoder)\.up_blocks\.(\d+)\.(\d+)\.(.*)$", key
    )
    if m is None:
        return None
    side, stage, op, rest = m.groups()
    head = f"{side}.stages.{stage}.op_list.{op}."
    if rest.startswith("conv."):  # the resampling conv of a stage
        return head + ("main.conv." if side == "encoder" else "main.conv.conv.") + rest[len("conv.") :]
    for pattern, repl in _BLOCK_RENAMES:
        if re.match(pattern, rest):
            return head + re.sub(pattern, repl, rest)
    return None


def _inflate(w: torch.Tensor, target: torch.Size) -> torch.Tensor:
    """A 2D kernel (or Linear weight) as the 3D kernel that acts the same on every frame alone."""
    if w.ndim == 2:  # Linear (out, in) -> 1x1x1 conv
        w = w[:, :, None, None]
    if w.ndim != 4 or w.shape[:2] != target[:2] or w.shape[2:] != target[3:]:
        raise ValueError(f"cannot inflate a {tuple(w.shape)} kernel to {tuple(target)}")
    out = w.new_zeros(target)
    out[:, :, target[2] // 2] = w
    return out


def image_dcae_config(ae_config: Any, temporal: list[bool] | None = None) -> DCAEConfig:
    """The Video DC-AE config with an `AutoencoderDC`'s widths, depths, blocks and latent channels."""
    c = dict(ae_config)
    checks = {
        "downsample_block_type": "Conv",
        "upsample_block_type": "interpolate",
        "encoder_out_shortcut": True,
        "decoder_in_shortcut": True,
        "decoder_conv_act_fn": "relu",
    }
    for name, want in checks.items():
        if c.get(name, want) != want:
            raise ValueError(f"AutoencoderDC {name}={c[name]!r} has no Video DC-AE counterpart (needs {want!r})")
    for name, want in (("decoder_norm_types", "rms_norm"), ("decoder_act_fns", "silu")):
        value = c.get(name, want)
        if any(v != want for v in ([value] if isinstance(value, str) else value)):
            raise ValueError(f"AutoencoderDC {name}={value!r}: only {want!r} has a Video DC-AE counterpart")
    n = len(c["encoder_block_out_channels"])

    def blocks(types, scales) -> list[str]:
        types = [types] * n if isinstance(types, str) else list(types)
        out = []
        for t, s in zip(types, scales):
            if t == "ResBlock":
                out.append("ResBlock")
            elif t == "EfficientViTBlock" and tuple(s) in ((), (5,)):
                out.append("EViTS5_GLU" if tuple(s) == (5,) else "EViT_GLU")
            else:
                raise ValueError(f"AutoencoderDC block {t!r} with multiscales {s} has no Video DC-AE counterpart")
        return out

    temporal = list(temporal) if temporal is not None else [False] * (n - 3) + [True, True, False]
    return DCAEConfig(
        in_channels=c.get("in_channels", 3),
        latent_channels=c["latent_channels"],
        encoder_width_list=list(c["encoder_block_out_channels"]),
        encoder_depth_list=list(c["encoder_layers_per_block"]),
        encoder_block_types=blocks(c["encoder_block_types"], c["encoder_qkv_multiscales"]),
        temporal_downsample=temporal,
        decoder_width_list=list(c["decoder_block_out_channels"]),
        decoder_depth_list=list(c["decoder_layers_per_block"]),
        decoder_block_types=blocks(c["decoder_block_types"], c["decoder_qkv_multiscales"]),
        temporal_upsample=list(temporal),
        head_dim=c.get("attention_head_dim", 32),
        # The image model's factor: at T = 1 the latents are the image model's, so it is the natural start.
        scaling_factor=c.get("scaling_factor"),
    )


def image_dcae_state_dict(image_state: dict[str, torch.Tensor], model: VideoDCAE) -> dict[str, torch.Tensor]:
    """An `AutoencoderDC` state dict as Video DC-AE weights for `model` (renamed, q/k/v fused, 2D -> 3D)."""
    target = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    for key, w in image_state.items():
        m = re.match(r"^(.*)\.attn\.to_([qkv])\.weight$", key)
        if m:
            qkv.setdefault(m.group(1), {})[m.group(2)] = w
            continue
        new = _rename(key)
        if new is None or new not in target:
            raise ValueError(f"image DC-AE key {key!r} has no Video DC-AE counterpart (mapped to {new!r})")
        out[new] = _inflate(w, target[new].shape) if target[new].ndim == 5 else w
    for block, parts in qkv.items():
        # The release's single qkv conv is [q; k; v] along its output channels; diffusers split it in three.
        fused = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
        new = _rename(f"{block}.attn.to_out.weight").replace(".proj.conv.", ".qkv.conv.")
        out[new] = _inflate(fused, target[new].shape)
    missing = sorted(set(target) - set(out))
    if missing:
        raise ValueError(f"the image DC-AE leaves {len(missing)} Video DC-AE weights unset, e.g. {missing[:3]}")
    return out


def init_from_image_dcae(image_model: Any, temporal: list[bool] | None = None) -> VideoDCAE:
    """A Video DC-AE initialised from an image DC-AE (a diffusers `AutoencoderDC`, a local folder or a hub id).

    A T = 1 input then gives the image model's latents and reconstruction; video frames start out encoded
    independently until the temporal layers learn.
    """
    if isinstance(image_model, (str, os.PathLike)):
        from diffusers import AutoencoderDC  # heavy (diffusers): loaded only to convert an image DC-AE

        image_model = AutoencoderDC.from_pretrained(str(image_model))
    model = VideoDCAE(image_dcae_config(image_model.config, temporal))
    model.load_state_dict(image_dcae_state_dict(image_model.state_dict(), model), strict=True)
    return model


def checkpoint_kind(path: str | os.PathLike) -> str:
    """Which tokenizer class a model folder or a single safetensors file holds: a key of TOKENIZER_CLASSES.

    Folders say so in config.json; single files are told apart by their key names (only the names are read).
    """
    path = Path(path)
    if path.is_dir():
        config = path / modelio.CONFIG_NAME
        if not config.is_file():
            raise FileNotFoundError(f"{path}: a model folder holds {modelio.CONFIG_NAME} and {modelio.WEIGHTS_NAME}")
        name = json.loads(config.read_text()).get("_class", "VideoDCAE")
        if name not in TOKENIZER_CLASSES:
            raise ValueError(f"{path}: a {name} folder is not a tokenizer (known: {', '.join(TOKENIZER_CLASSES)})")
        return name
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: only safetensors checkpoints are read (convert .pt/.ckpt files first)")
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = modelio.adapt_state_dict(dict.fromkeys(f.keys()))
    except (OSError, SafetensorError) as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None
    if DCAE_KEY in keys:
        return "VideoDCAE"
    if is_hunyuan_state(keys):
        return "HunyuanVAE"
    if is_flux_ae_state(keys):
        return "FluxAE"
    raise ValueError(
        f"{path}: not a known tokenizer checkpoint (first keys: {sorted(keys)[:3]}); expected the Video DC-AE's "
        f"`{DCAE_KEY}`, the HunyuanVideo VAE's `encoder.down_blocks.0.resnets.0.conv1.conv.weight` or the Flux "
        f"AE's `encoder.down.0.block.0.conv1.weight`"
    )


def load_tokenizer(spec: str | os.PathLike, device: torch.device | str = "cpu") -> Tokenizer:
    """A frozen tokenizer in eval mode on `device`: a model folder, a release .safetensors file, or `debug`.

    The one loader behind every command and trainer that uses a tokenizer. Release files are the Video DC-AE's,
    `hunyuan_vae.safetensors` or `flux1-dev-ae.safetensors`, recognised by their key names. `debug` is the Video
    DC-AE debug preset with RANDOM weights (seeded, so the trainer and `cinedit data cache` build the same one): its
    latents carry no learned structure, it is for smoke runs and tests only.
    """
    spec = str(spec) if spec else ""
    if not spec:
        raise ValueError(
            "no tokenizer given: pass a model folder or a release .safetensors file (Video DC-AE, "
            "hunyuan_vae.safetensors or flux1-dev-ae.safetensors), or 'debug' for the random-weight debug tokenizer"
        )
    if spec == DEBUG_TOKENIZER:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(DEBUG_TOKENIZER_SEED)
            model = VideoDCAE(PRESETS["debug"]())
    else:
        if not Path(spec).exists():
            raise FileNotFoundError(f"tokenizer {spec!r}: no such model folder or .safetensors file")
        loaders = {"VideoDCAE": load_pretrained, "HunyuanVAE": load_hunyuan_vae, "FluxAE": load_flux_ae}
        model = loaders[checkpoint_kind(spec)](spec)
    return model.to(device).eval().requires_grad_(False)


def tokenizer_hash(model: Tokenizer) -> str:
    """A short hash of the tokenizer's architecture, recorded with every latent (latents only decode with the same
    architecture, and a latent cache only serves the tokenizer that wrote it). Tiling settings are not part of it."""
    doc = dataclasses.asdict(model.config)
    if not isinstance(model, VideoDCAE):  # the DC-AE's hash predates the other kinds: keep it as it was
        doc = {"_class": type(model).__name__, **{k: v for k, v in doc.items() if k not in RUNTIME_FIELDS}}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]
