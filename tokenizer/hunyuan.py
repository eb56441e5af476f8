"""HunyuanVideo VAE: a causal 3D KL autoencoder, 4x in time (1 + 4k frames) and 8x8 in space, 16 latent channels.

Open-Sora 2.0's 256px/768px generators run on it. The network is diffusers' `AutoencoderKLHunyuanVideo`, whose
module tree and state-dict keys are the release's (`hunyuan_vae.safetensors` loads with `strict=True`); this file
adds the release's scaling, posterior sampling and spatial tiling on top, behind the Video DC-AE's interface.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from cinedit.runtime import modelio
from cinedit.tokenizer.kl import KLTokenizer, check_spatial

NUM_BLOCKS = 4  # 3 spatial and 2 temporal downsamplings: 8x, 4x


@dataclass
class HunyuanVAEConfig:
    """HunyuanVideo VAE architecture and tiling; the defaults are the release (`hunyuan_vae.safetensors`).

    Spatial tiling follows the reference: tiles of `tile_sample_size` px every int(size * (1 - overlap)) px, taken
    when H or W exceeds the tile (decode: when the latent H or W exceeds tile / 8). `temporal_tiling` uses diffusers'
    frame-wise scheme (`tile_sample_frames` frames); the release runs without it.
    """

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 16
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    scaling_factor: float = 0.476986
    shift_factor: float = 0.0
    tile_sample_size: int = 256
    tile_overlap: float = 0.25
    spatial_tiling: bool = True
    temporal_tiling: bool = False
    tile_sample_frames: int = 64

    def __post_init__(self) -> None:
        self.block_out_channels = tuple(int(c) for c in self.block_out_channels)
        self.validate()

    @property
    def tile_stride(self) -> int:
        """Pixels between the starts of neighbouring spatial tiles."""
        return int(self.tile_sample_size * (1 - self.tile_overlap))

    def validate(self) -> None:
        """Raise ValueError on an inconsistent architecture or a tile size the reference cannot shape."""
        for name in ("in_channels", "out_channels", "latent_channels", "layers_per_block", "norm_num_groups"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if len(self.block_out_channels) != NUM_BLOCKS:
            raise ValueError(
                f"block_out_channels needs {NUM_BLOCKS} entries (8x spatial, 4x temporal), "
                f"got {self.block_out_channels}"
            )
        bad = [c for c in self.block_out_channels if c < 1 or c % self.norm_num_groups]
        if bad:
            raise ValueError(
                f"every width in block_out_channels {self.block_out_channels} must be a positive multiple of "
                f"norm_num_groups={self.norm_num_groups} (GroupNorm)"
            )
        if not self.scaling_factor > 0:
            raise ValueError(f"scaling_factor must be positive, got {self.scaling_factor}")
        if not 0 <= self.tile_overlap < 1:
            raise ValueError(f"tile_overlap must be in [0, 1), got {self.tile_overlap}")
        if self.tile_sample_frames < 1:
            raise ValueError(f"tile_sample_frames must be positive, got {self.tile_sample_frames}")
        if not tile_size_ok(self.tile_sample_size, self.tile_overlap):
            good = [s for s in range(8, 4 * self.tile_sample_size + 9, 8) if tile_size_ok(s, self.tile_overlap)]
            near = sorted(good, key=lambda s: (abs(s - self.tile_sample_size), s))[:2]
            raise ValueError(
                f"tile_sample_size={self.tile_sample_size} with tile_overlap={self.tile_overlap} gives tiles the "
                f"reference's scheme cannot stitch (it needs int(S*(1-f)) / 8 == S/8 - int(S/8*f) and "
                f"int(S*f) == S - int(S*(1-f))); use e.g. {' or '.join(map(str, sorted(near))) or 'a multiple of 32'}"
            )


def tile_size_ok(size: int, overlap: float) -> bool:
    """Whether tiles of `size` px with this overlap stitch to the right shape in the reference's tiling."""
    if size < 8 or size % 8:
        return False
    stride, latent = int(size * (1 - overlap)), size // 8
    consistent = stride // 8 == latent - int(latent * overlap) and int(size * overlap) == size - stride
    return stride > 0 and stride % 8 == 0 and consistent


class HunyuanVAE(KLTokenizer):
    """HunyuanVideo VAE: (b, 3, 1 + 4k, h, w) in [-1, 1] <-> latents (b, 16, 1 + k, h/8, w/8); t = 1 is an image."""

    kind = "hunyuan_vae"
    causal = True  # frame i depends on frames <= i only; frame 0 is encoded alone (tiling: the reference's scheme)

    def __init__(self, config: HunyuanVAEConfig):
        super().__init__()
        # diffusers takes seconds to import and only these tokenizers need it.
        from diffusers import AutoencoderKLHunyuanVideo

        config.validate()
        self.config = config
        self.spatial_compression = 8
        self.temporal_compression = 4
        ae = AutoencoderKLHunyuanVideo(
            in_channels=config.in_channels,
            out_channels=config.out_channels,
            latent_channels=config.latent_channels,
            block_out_channels=config.block_out_channels,
            layers_per_block=config.layers_per_block,
            norm_num_groups=config.norm_num_groups,
            scaling_factor=config.scaling_factor,
            spatial_compression_ratio=self.spatial_compression,
            temporal_compression_ratio=self.temporal_compression,
        )
        # The diffusers wrapper stays outside the module tree so the keys are the release's (no `ae.` prefix); its
        # parts are registered here, so .to(), hooks and state dicts see them under their own names.
        object.__setattr__(self, "_ae", ae)
        self.encoder, self.decoder = ae.encoder, ae.decoder
        self.quant_conv, self.post_quant_conv = ae.quant_conv, ae.post_quant_conv

    @property
    def latent_channels(self) -> int:
        return self.config.latent_channels

    def _sync_tiling(self) -> None:
        """Set diffusers' tiling switches from the config (read at every call, so config edits take effect)."""
        c, ae = self.config, self._ae
        c.validate()
        ae.use_tiling = c.spatial_tiling
        ae.tile_sample_min_height = ae.tile_sample_min_width = c.tile_sample_size
        ae.tile_sample_stride_height = ae.tile_sample_stride_width = c.tile_stride
        ae.use_framewise_encoding = ae.use_framewise_decoding = c.temporal_tiling
        ae.tile_sample_min_num_frames = c.tile_sample_frames
        ae.tile_sample_stride_num_frames = int(c.tile_sample_frames * (1 - c.tile_overlap))

    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """(c, t, h, w) of the latent of a (3, num_frames, height, width) input; t = (num_frames - 1) // 4 + 1."""
        s, tc = self.spatial_compression, self.temporal_compression
        check_spatial(height, width, s)
        if num_frames < 1 or (num_frames - 1) % tc:
            low = max(1, 1 + (num_frames - 1) // tc * tc)
            fix = f"{low} or {low + tc}" if num_frames > 1 else "1"
            raise ValueError(
                f"num_frames must be 1 + {tc}k (1, 5, 9, ...) for this causal VAE, got {num_frames}: use {fix} frames"
            )
        return self.config.latent_channels, (num_frames - 1) // tc + 1, height // s, width // s

    def decoded_frames(self, t_latent: int) -> int:
        """Frames that `t_latent` latent frames decode to: 1 + 4(t - 1)."""
        return 1 + self.temporal_compression * (t_latent - 1)

    def posterior(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(mean, logvar) of the unscaled posterior of x (b, 3, t, h, w), spatially tiled when the config says so."""
        if x.ndim != 5 or x.shape[1] != self.config.in_channels:
            raise ValueError(f"expected (b, {self.config.in_channels}, t, h, w), got {tuple(x.shape)}")
        self.latent_shape(*x.shape[2:])
        self._sync_tiling()
        return self.clamped(self._ae.encode(x).latent_dist.parameters)

    def decode(self, z: Tensor, num_frames: int | None = None) -> Tensor:
        """Unscaled latents (b, c, t, h, w) -> (b, 3, 1 + 4(t - 1), 8h, 8w), trimmed to `num_frames` if given."""
        if z.ndim != 5 or z.shape[1] != self.config.latent_channels:
            raise ValueError(f"expected latents (b, {self.config.latent_channels}, t, h, w), got {tuple(z.shape)}")
        frames = self.decoded_frames(z.shape[2])
        if num_frames is not None and not 1 <= num_frames <= frames:
            raise ValueError(
                f"{z.shape[2]} latent frames decode to {frames} frames (or fewer), got num_frames={num_frames}"
            )
        self._sync_tiling()
        x = self._ae.decode(z).sample
        return x if num_frames is None else x[:, :, :num_frames]


def config_from_reference(ref: Mapping[str, Any]) -> HunyuanVAEConfig:
    """HunyuanVAEConfig from the reference's resolved `AutoEncoder3DConfig` dict (as the fixtures record it)."""
    fixed = {
        "act_fn": "silu",
        "time_compression_ratio": 4,
        "spatial_compression_ratio": 8,
        "mid_block_add_attention": True,
        "dropout": 0.0,
        "channel": False,
    }
    for name, want in fixed.items():
        if name in ref and ref[name] != want:
            raise ValueError(f"unsupported reference option {name}={ref[name]!r}: only {want!r} is implemented")
    defaults = HunyuanVAEConfig()
    return HunyuanVAEConfig(
        in_channels=ref.get("in_channels", defaults.in_channels),
        out_channels=ref.get("out_channels", defaults.out_channels),
        latent_channels=ref.get("latent_channels", defaults.latent_channels),
        block_out_channels=tuple(ref.get("block_out_channels", defaults.block_out_channels)),
        layers_per_block=ref.get("layers_per_block", defaults.layers_per_block),
        norm_num_groups=ref.get("norm_num_groups", defaults.norm_num_groups),
        scaling_factor=float(ref.get("scale_factor", defaults.scaling_factor)),
        shift_factor=float(ref.get("shift_factor", defaults.shift_factor) or 0.0),
        tile_sample_size=ref.get("sample_size", defaults.tile_sample_size),
        tile_overlap=ref.get("tile_overlap_factor", defaults.tile_overlap),
        # The reference's own default is off; the release config turns it on (as our default does).
        spatial_tiling=bool(ref.get("use_spatial_tiling", False)),
        temporal_tiling=bool(ref.get("use_temporal_tiling", False)),
        tile_sample_frames=ref.get("sample_tsize", defaults.tile_sample_frames),
    )


def _expected_keys(config: HunyuanVAEConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in HunyuanVAE(config).state_dict().items()}


def is_hunyuan_state(state: Mapping[str, Any]) -> bool:
    """Whether a state dict (after wrapper prefixes) has the HunyuanVideo VAE's key names."""
    return "encoder.conv_in.conv.weight" in state and "encoder.down_blocks.0.resnets.0.conv1.conv.weight" in state


def hunyuan_state_dict(
    state: Mapping[str, Tensor], config: HunyuanVAEConfig | None = None, prefix: str | None = None
) -> dict[str, Tensor]:
    """Release weights under our keys: the names are the same, so this strips wrapper prefixes (`module.`, `vae.`,
    ... or `prefix`) and checks every key and shape against `config` (default: inferred from the shapes)."""
    state = modelio.adapt_state_dict(dict(state), prefix)
    if not is_hunyuan_state(state):
        raise ValueError(
            f"not a HunyuanVideo VAE checkpoint: no `encoder.down_blocks.0.resnets.0.conv1.conv.weight` among its "
            f"{len(state)} tensors (first keys: {sorted(state)[:3]}); pass the wrapper's key prefix if it has one"
        )
    config = config or infer_config(state)
    want = _expected_keys(config)
    missing, unexpected = sorted(set(want) - set(state)), sorted(set(state) - set(want))
    wrong = sorted(k for k in set(want) & set(state) if tuple(state[k].shape) != want[k])
    if missing or unexpected or wrong:
        shapes = [f"{k}: {tuple(state[k].shape)} vs {want[k]}" for k in wrong[:3]]
        raise ValueError(
            f"the checkpoint does not match the HunyuanVAE config: {len(missing)} missing keys {missing[:5]}, "
            f"{len(unexpected)} unexpected keys {unexpected[:5]}, {len(wrong)} shape mismatches {shapes}; "
            f"is it a complete HunyuanVideo VAE file (pass its config if widths differ)?"
        )
    return state


def infer_config(state: Mapping[str, Tensor], **overrides: Any) -> HunyuanVAEConfig:
    """The architecture of a HunyuanVideo VAE state dict, from its tensor shapes.

    GroupNorm's group count leaves no trace in the shapes: it is 32 (the release) when every width allows it, else
    the largest group count up to 32 that divides every width; pass `norm_num_groups` to override.
    """
    needed = ("encoder.conv_in.conv.weight", "encoder.conv_out.conv.weight")
    if lacking := [k for k in needed if k not in state]:
        raise ValueError(f"cannot infer the HunyuanVAE config: the checkpoint lacks {lacking}")
    widths, i = [], 0
    while f"encoder.down_blocks.{i}.resnets.0.conv1.conv.weight" in state:
        widths.append(state[f"encoder.down_blocks.{i}.resnets.0.conv1.conv.weight"].shape[0])
        i += 1
    layers = 0
    while f"encoder.down_blocks.0.resnets.{layers}.conv1.conv.weight" in state:
        layers += 1
    common = math.gcd(*widths) if widths else 32
    out = state.get("decoder.conv_out.conv.weight")
    moments = state.get("quant_conv.weight", state["encoder.conv_out.conv.weight"])
    fields = {
        "in_channels": state["encoder.conv_in.conv.weight"].shape[1],
        "out_channels": out.shape[0] if out is not None else 3,
        "latent_channels": moments.shape[0] // 2,
        "block_out_channels": tuple(widths),
        "layers_per_block": layers,
        "norm_num_groups": max(g for g in range(1, 33) if common % g == 0),
    }
    fields.update(overrides)
    return HunyuanVAEConfig(**fields)


def load_hunyuan_vae(
    path: str | os.PathLike, config: HunyuanVAEConfig | None = None, prefix: str | None = None, **overrides: Any
) -> HunyuanVAE:
    """A HunyuanVAE from the release's `hunyuan_vae.safetensors` (or our model folder), strictly loaded.

    Args:
        config: the architecture; by default the folder's, or inferred from a single file's shapes, with
            `overrides` (e.g. `norm_num_groups=`, `spatial_tiling=`) applied.
    """
    saved, state = modelio.read_checkpoint(path, HunyuanVAEConfig, prefix)
    if config is None and saved is not None:
        config = dataclasses.replace(saved, **overrides)
    elif config is None and is_hunyuan_state(state):
        config = infer_config(state, **overrides)
    try:
        state = hunyuan_state_dict(state, config)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    model = HunyuanVAE(config)
    model.load_state_dict(state, strict=True)
    return model.eval()
