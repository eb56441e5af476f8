"""Reading and writing MMDiT weights: our format and the release's single file.

- Ours: a folder with `config.json` (the `MMDiTConfig`) and `model.safetensors` (`save_pretrained`).
- The release: one safetensors file whose key names are also ours (`load_pretrained`); its architecture is
  read off the tensor shapes (`infer_config`). Wrapper prefixes such as `module.` are stripped.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from cinedit.generator.model import MMDiT, MMDiTConfig
from cinedit.runtime import modelio
from cinedit.runtime.modelio import save_model_folder

RELEASE_AXES_DIM = [16, 56, 56]
RELEASE_THETA = 10000


def save_pretrained(model: MMDiT, out_dir: str | os.PathLike) -> Path:
    """Write `config.json` + `model.safetensors` into `out_dir`, each atomically (weights first)."""
    return save_model_folder(model, model.config, out_dir)


def read_config(path: str | os.PathLike) -> MMDiTConfig:
    """The `MMDiTConfig` saved in a model folder's `config.json`."""
    return modelio.read_config(path, MMDiTConfig)


def infer_config(state: dict[str, torch.Tensor]) -> MMDiTConfig:
    """The architecture of a release-layout state dict, read off its tensor shapes.

    RoPE has no weights: head dim 128 gets the release's axes [16, 56, 56], theta 10000 and rotate-half
    layout; other head dims need an explicit config. Without `cond_in` the patch size cannot be seen and is
    taken as 2 for 64 input channels (16-channel VAE) and 1 otherwise.
    """
    if "img_in.weight" not in state:
        raise ValueError(
            f"not an MMDiT checkpoint: no `img_in.weight` among its {len(state)} tensors "
            f"(first keys: {sorted(state)[:3]})"
        )
    hidden, in_channels = state["img_in.weight"].shape

    def count(kind: str) -> int:
        found = {int(m.group(1)) for k in state if (m := re.match(rf"^{kind}\.(\d+)\.", k))}
        return max(found) + 1 if found else 0

    depth, single = count("double_blocks"), count("single_blocks")
    if depth:
        head_dim = state["double_blocks.0.img_attn.norm.query_norm.scale"].shape[0]
        mlp_hidden = state["double_blocks.0.img_mlp.0.weight"].shape[0]
        qkv_bias = "double_blocks.0.img_attn.q_proj.bias" in state
    elif single:
        head_dim = state["single_blocks.0.norm.query_norm.scale"].shape[0]
        mlp_hidden = state["single_blocks.0.v_mlp.weight"].shape[0] - hidden
        qkv_bias = True  # only double blocks show it
    else:
        raise ValueError("MMDiT checkpoint without any double or single blocks")
    if head_dim != sum(RELEASE_AXES_DIM):
        raise ValueError(f"head dim {head_dim} is not the release's 128: pass the MMDiTConfig (RoPE axes) explicitly")
    cond_embed = "cond_in.weight" in state
    if cond_embed:
        patch_sq = state["cond_in.weight"].shape[1] - in_channels  # the mask channel, packed p x p
        patch_size = {1: 1, 4: 2}.get(patch_sq)
        if patch_size is None:
            raise ValueError(f"cond_in is {patch_sq} wider than img_in: expected 1 (patch 1) or 4 (patch 2)")
    else:
        patch_size = 2 if in_channels == 64 else 1
    return MMDiTConfig(
        in_channels=in_channels,
        patch_size=patch_size,
        hidden_size=hidden,
        num_heads=hidden // head_dim,
        depth=depth,
        depth_single_blocks=single,
        mlp_ratio=mlp_hidden / hidden,
        axes_dim=list(RELEASE_AXES_DIM),
        theta=RELEASE_THETA,
        qkv_bias=qkv_bias,
        vec_in_dim=state["vector_in.in_layer.weight"].shape[1],
        context_in_dim=state["txt_in.weight"].shape[1],
        cond_embed=cond_embed,
        rope_layout="rotate_half",
    )


def load_pretrained(
    path: str | os.PathLike,
    config: MMDiTConfig | None = None,
    prefix: str | None = None,
    strict: bool = True,
    dtype: torch.dtype | None = None,
) -> MMDiT:
    """An MMDiT from our model folder or from a release-style single safetensors file.

    With `strict` the model is built on the meta device and takes the file's tensors as they are (no second
    copy of 11B parameters); `dtype` then casts them (default: the file's dtype).

    Args:
        config: the architecture of a single-file checkpoint; by default read off its tensor shapes.
        prefix: key prefix to strip (default: common wrapper prefixes such as `module.` are removed).
    """
    saved, state = modelio.read_checkpoint(path, MMDiTConfig, prefix)
    config = config or saved or infer_config(state)
    if not strict:
        model = MMDiT(config)
        model.load_state_dict(state, strict=False)
        return model if dtype is None else model.to(dtype)
    with torch.device("meta"):
        model = MMDiT(config)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [k for k in expected if k in state and state[k].shape != expected[k]]
    if missing or unexpected or wrong:
        raise ValueError(
            f"{path} does not match the model: {len(missing)} missing keys (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:3]}), {len(wrong)} with other shapes "
            f"(e.g. {wrong[:3]}); pass the right config or prefix"
        )
    model.load_state_dict(state, strict=True, assign=True)
    return model if dtype is None else model.to(dtype)
