"""Reading and writing MMDiT weights: our format, the release's single file and Flux's (BFL) single file.

- Ours: a folder with `config.json` (the `MMDiTConfig`) and `model.safetensors` (`save_pretrained`).
- The release: one safetensors file whose key names are also ours (`load_pretrained`); its architecture is
  read off the tensor shapes (`infer_config`). Wrapper prefixes such as `module.` are stripped.
- Flux (`flux1-dev.safetensors`): the same names except that q/k/v are fused (`img_attn.qkv`, `txt_attn.qkv`,
  `single_blocks.i.linear1`). The fused layout is a property of the file, not of the model: `load_pretrained`
  finds the fused keys and splits them (`split_qkv_state_dict`); `fuse_qkv_state_dict` writes them back.
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

# Flux's fused q/k/v keys and our split ones: (stem, [part,] weight|bias).
_FUSED_ATTN = re.compile(r"^(double_blocks\.\d+\.(?:img|txt)_attn)\.qkv\.(weight|bias)$")
_FUSED_SINGLE = re.compile(r"^(single_blocks\.\d+)\.linear1\.(weight|bias)$")
_SPLIT_ATTN = re.compile(r"^(double_blocks\.\d+\.(?:img|txt)_attn)\.(q_proj|k_proj|v_proj)\.(weight|bias)$")
_SPLIT_SINGLE = re.compile(r"^(single_blocks\.\d+)\.(q_proj|k_proj|v_mlp)\.(weight|bias)$")


def has_fused_qkv(state: dict[str, torch.Tensor]) -> bool:
    """Whether a state dict holds Flux's fused q/k/v keys (`*_attn.qkv.*`, `single_blocks.i.linear1.*`)."""
    return any(_FUSED_ATTN.match(k) or _FUSED_SINGLE.match(k) for k in state)


def split_qkv_state_dict(state: dict[str, torch.Tensor], cfg: MMDiTConfig) -> dict[str, torch.Tensor]:
    """Flux's fused key layout -> ours; other keys pass through unchanged.

    `*_attn.qkv` (3h rows) -> `q_proj`, `k_proj`, `v_proj` (h rows each); `single_blocks.i.linear1` (3h + mlp rows)
    -> rows [0, h) `q_proj`, [h, 2h) `k_proj`, [2h, ...) `v_mlp` (v and the MLP input, as our single block
    projects them together). The parts are copies, so the fused tensors can be freed and the parts saved.
    """
    h, out = cfg.hidden_size, {}
    for key, value in state.items():
        if m := _FUSED_ATTN.match(key):
            stem, kind = m.groups()
            if value.shape[0] != 3 * h:
                raise ValueError(f"{key} has {value.shape[0]} rows, expected 3 * hidden_size = {3 * h}")
            sizes, names = (h, h, h), ("q_proj", "k_proj", "v_proj")
        elif m := _FUSED_SINGLE.match(key):
            stem, kind = m.groups()
            if value.shape[0] != 3 * h + cfg.mlp_hidden:
                raise ValueError(
                    f"{key} has {value.shape[0]} rows, expected 3 * hidden_size + mlp hidden = {3 * h + cfg.mlp_hidden}"
                )
            sizes, names = (h, h, h + cfg.mlp_hidden), ("q_proj", "k_proj", "v_mlp")
        else:
            out[key] = value
            continue
        for name, part in zip(names, value.split(sizes, dim=0)):
            out[f"{stem}.{name}.{kind}"] = part.clone()
    return out


def fuse_qkv_state_dict(state: dict[str, torch.Tensor], cfg: MMDiTConfig) -> dict[str, torch.Tensor]:
    """Our key layout -> Flux's fused one (the inverse of `split_qkv_state_dict`, exact); other keys unchanged."""
    parts: dict[str, dict[str, torch.Tensor]] = {}  # fused key -> its parts by name
    out: dict[str, torch.Tensor | None] = {}
    for key, value in state.items():
        m = _SPLIT_ATTN.match(key) or _SPLIT_SINGLE.match(key)
        if m is None:
            out[key] = value
            continue
        stem, name, kind = m.groups()
        fused = f"{stem}.{'linear1' if stem.startswith('single_blocks') else 'qkv'}.{kind}"
        out.setdefault(fused, None)  # keeps the key order: the fused tensor sits where its q part was
        parts.setdefault(fused, {})[name] = value
    for fused, found in parts.items():
        names = ("q_proj", "k_proj", "v_mlp") if fused.startswith("single_blocks") else ("q_proj", "k_proj", "v_proj")
        if set(found) != set(names):
            raise ValueError(f"cannot write {fused} without all of {names}, found {sorted(found)}")
        if found["q_proj"].shape[0] != cfg.hidden_size:
            raise ValueError(f"{fused}: q_proj has {found['q_proj'].shape[0]} rows, not hidden_size {cfg.hidden_size}")
        out[fused] = torch.cat([found[n] for n in names], dim=0)
    return out


def save_pretrained(model: MMDiT, out_dir: str | os.PathLike) -> Path:
    """Write `config.json` + `model.safetensors` into `out_dir`, each atomically (weights first)."""
    return save_model_folder(model, model.config, out_dir)


def read_config(path: str | os.PathLike) -> MMDiTConfig:
    """The `MMDiTConfig` saved in a model folder's `config.json`."""
    return modelio.read_config(path, MMDiTConfig)


def infer_config(state: dict[str, torch.Tensor], axes_dim: list[int] | None = None) -> MMDiTConfig:
    """The architecture of a release-layout or Flux-layout (fused q/k/v) state dict, read off its tensor shapes.

    RoPE has no weights: head dim 128 gets the release's axes [16, 56, 56] and theta 10000; other head dims
    need `axes_dim` (or an explicit config). The RoPE layout follows the key layout: Flux (fused) files were
    trained with interleaved pairs, the release's (unfused) with rotate-half. `guidance_in` means a
    guidance-distilled model (Flux.1-dev). Without `cond_in` the patch size cannot be seen and is taken as 2
    for 64 input channels (16-channel VAE) and 1 otherwise.
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
    fused = has_fused_qkv(state)
    if depth:
        head_dim = state["double_blocks.0.img_attn.norm.query_norm.scale"].shape[0]
        mlp_hidden = state["double_blocks.0.img_mlp.0.weight"].shape[0]
        qkv_bias = f"double_blocks.0.img_attn.{'qkv' if fused else 'q_proj'}.bias" in state
    elif single:
        head_dim = state["single_blocks.0.norm.query_norm.scale"].shape[0]
        if fused:  # linear1 holds q, k, then v and the MLP input
            mlp_hidden = state["single_blocks.0.linear1.weight"].shape[0] - 3 * hidden
        else:
            mlp_hidden = state["single_blocks.0.v_mlp.weight"].shape[0] - hidden
        qkv_bias = True  # only double blocks show it
    else:
        raise ValueError("MMDiT checkpoint without any double or single blocks")
    if axes_dim is None:
        if head_dim != sum(RELEASE_AXES_DIM):
            raise ValueError(
                f"head dim {head_dim} is not the release's 128: pass axes_dim (the RoPE axes) or the MMDiTConfig"
            )
        axes_dim = RELEASE_AXES_DIM
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
        axes_dim=list(axes_dim),
        theta=RELEASE_THETA,
        qkv_bias=qkv_bias,
        vec_in_dim=state["vector_in.in_layer.weight"].shape[1],
        context_in_dim=state["txt_in.weight"].shape[1],
        cond_embed=cond_embed,
        rope_layout="interleaved" if fused else "rotate_half",
        guidance_embed="guidance_in.in_layer.weight" in state,
    )


def load_pretrained(
    path: str | os.PathLike,
    config: MMDiTConfig | None = None,
    prefix: str | None = None,
    strict: bool = True,
    dtype: torch.dtype | None = None,
) -> MMDiT:
    """An MMDiT from our model folder or from a release-style or Flux-style (fused q/k/v) single safetensors file.

    With `strict` the model is built on the meta device and takes the file's tensors as they are (no second
    copy of 11B parameters); `dtype` then casts them (default: the file's dtype).

    Args:
        config: the architecture of a single-file checkpoint; by default read off its tensor shapes.
        prefix: key prefix to strip (default: common wrapper prefixes such as `module.` are removed).
    """
    saved, state = modelio.read_checkpoint(path, MMDiTConfig, prefix)
    config = config or saved or infer_config(state)
    if has_fused_qkv(state):
        state = split_qkv_state_dict(state, config)
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
