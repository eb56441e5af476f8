"""Flux.1 2D autoencoder: a KL image autoencoder, 8x8 in space, 16 latent channels; video frames are coded alone.

Open-Sora 2.0's text-to-image-to-video path decodes the Flux.1-dev model's first frame with it. The network is
diffusers' `AutoencoderKL` (no quant convs); `flux_ae_state_dict` maps the release's (BFL's) key names onto it.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from einops import rearrange
from torch import Tensor

from cinedit.runtime import modelio
from cinedit.tokenizer.kl import KLTokenizer, check_spatial

NORM_GROUPS = 32  # hard-coded in the reference's ResnetBlock, AttnBlock and norm_out


@dataclass
class FluxAEConfig:
    """Flux AE architecture; the defaults are the release (`flux1-dev-ae.safetensors`).

    Level i has width ch * ch_mult[i] and num_res_blocks resnets (decoder: one more); every level but the last
    halves H and W.
    """

    in_channels: int = 3
    out_channels: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 16
    scaling_factor: float = 0.3611
    shift_factor: float = 0.1159

    def __post_init__(self) -> None:
        self.ch_mult = tuple(int(m) for m in self.ch_mult)
        self.validate()

    @property
    def widths(self) -> tuple[int, ...]:
        return tuple(self.ch * m for m in self.ch_mult)

    @property
    def latent_channels(self) -> int:
        return self.z_channels

    def validate(self) -> None:
        """Raise ValueError on an inconsistent architecture."""
        for name in ("in_channels", "out_channels", "ch", "num_res_blocks", "z_channels"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not self.ch_mult or any(m < 1 for m in self.ch_mult):
            raise ValueError(f"ch_mult needs at least one positive entry, got {self.ch_mult}")
        bad = [w for w in self.widths if w % NORM_GROUPS]
        if bad:
            raise ValueError(
                f"widths ch * ch_mult = {self.widths} must be multiples of {NORM_GROUPS} (GroupNorm groups); "
                f"pick ch a multiple of {NORM_GROUPS}"
            )
        if not self.scaling_factor > 0:
            raise ValueError(f"scaling_factor must be positive, got {self.scaling_factor}")


class FluxAE(KLTokenizer):
    """Flux AE: (b, 3, t, h, w) in [-1, 1] <-> latents (b, 16, t, h/8, w/8), every frame on its own."""

    kind = "flux_ae"
    causal = False  # an image model (never tiled): the DC-AE tiler's blending in time would only blur it
    temporal_compression = 1

    def __init__(self, config: FluxAEConfig):
        super().__init__()
        # diffusers takes seconds to import and only these tokenizers need it.
        from diffusers import AutoencoderKL

        config.validate()
        self.config = config
        n = len(config.ch_mult)
        self.spatial_compression = 2 ** (n - 1)
        ae = AutoencoderKL(
            in_channels=config.in_channels,
            out_channels=config.out_channels,
            down_block_types=("DownEncoderBlock2D",) * n,
            up_block_types=("UpDecoderBlock2D",) * n,
            block_out_channels=config.widths,
            layers_per_block=config.num_res_blocks,
            latent_channels=config.z_channels,
            norm_num_groups=NORM_GROUPS,
            scaling_factor=config.scaling_factor,
            shift_factor=config.shift_factor,
            use_quant_conv=False,
            use_post_quant_conv=False,
        )
        # Only the encoder and decoder hold weights; diffusers' wrapper adds nothing the reference has.
        self.encoder, self.decoder = ae.encoder, ae.decoder

    @property
    def latent_channels(self) -> int:
        return self.config.z_channels

    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """(c, t, h, w) of the latent of a (3, num_frames, height, width) input; frames are kept one for one."""
        s = self.spatial_compression
        check_spatial(height, width, s)
        if num_frames < 1:
            raise ValueError(f"num_frames must be at least 1, got {num_frames}")
        return self.config.z_channels, num_frames, height // s, width // s

    def decoded_frames(self, t_latent: int) -> int:
        """Frames that `t_latent` latent frames decode to (the same number)."""
        return t_latent

    def posterior(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(mean, logvar) of the unscaled posterior of x (b, 3, t, h, w)."""
        if x.ndim != 5 or x.shape[1] != self.config.in_channels:
            raise ValueError(f"expected (b, {self.config.in_channels}, t, h, w), got {tuple(x.shape)}")
        self.latent_shape(*x.shape[2:])
        moments = self.encoder(rearrange(x, "b c t h w -> (b t) c h w"))
        return self.clamped(rearrange(moments, "(b t) c h w -> b c t h w", b=x.shape[0]))

    def decode(self, z: Tensor, num_frames: int | None = None) -> Tensor:
        """Unscaled latents (b, c, t, h, w) -> (b, 3, t, 8h, 8w), trimmed to `num_frames` if given."""
        if z.ndim != 5 or z.shape[1] != self.config.z_channels:
            raise ValueError(f"expected latents (b, {self.config.z_channels}, t, h, w), got {tuple(z.shape)}")
        t = z.shape[2]
        if num_frames is not None and not 1 <= num_frames <= t:
            raise ValueError(f"{t} latent frames decode to {t} frames (or fewer), got num_frames={num_frames}")
        z = z[:, :, :num_frames]
        x = self.decoder(rearrange(z, "b c t h w -> (b t) c h w"))
        return rearrange(x, "(b t) c h w -> b c t h w", b=z.shape[0])


def config_from_reference(ref: Mapping[str, Any]) -> FluxAEConfig:
    """FluxAEConfig from the reference's resolved `AutoEncoderConfig` dict (as the fixtures record it)."""
    d = FluxAEConfig()
    return FluxAEConfig(
        in_channels=ref.get("in_channels", d.in_channels),
        out_channels=ref.get("out_ch", d.out_channels),
        ch=ref.get("ch", d.ch),
        ch_mult=tuple(ref.get("ch_mult", d.ch_mult)),
        num_res_blocks=ref.get("num_res_blocks", d.num_res_blocks),
        z_channels=ref.get("z_channels", d.z_channels),
        scaling_factor=float(ref.get("scale_factor", d.scaling_factor)),
        shift_factor=float(ref.get("shift_factor", d.shift_factor)),
    )


_RESNET = {"nin_shortcut.": "conv_shortcut."}
_ATTN = {"norm.": "group_norm.", "q.": "to_q.", "k.": "to_k.", "v.": "to_v.", "proj_out.": "to_out.0."}


def _rename(key: str, num_levels: int) -> str:
    """One BFL key under diffusers' name (keys already in diffusers' layout come back unchanged)."""
    side, _, rest = key.partition(".")
    if rest.startswith("norm_out."):
        return f"{side}.conv_norm_out.{rest[len('norm_out.') :]}"
    if m := re.match(r"^(down|up)\.(\d+)\.block\.(\d+)\.(.*)$", rest):
        kind, level, j, tail = m.groups()
        i = int(level) if kind == "down" else num_levels - 1 - int(level)
        for src, dst in _RESNET.items():
            tail = dst + tail[len(src) :] if tail.startswith(src) else tail
        return f"{side}.{kind}_blocks.{i}.resnets.{j}.{tail}"
    if m := re.match(r"^down\.(\d+)\.downsample\.conv\.(.*)$", rest):
        return f"{side}.down_blocks.{m.group(1)}.downsamplers.0.conv.{m.group(2)}"
    if m := re.match(r"^up\.(\d+)\.upsample\.conv\.(.*)$", rest):
        return f"{side}.up_blocks.{num_levels - 1 - int(m.group(1))}.upsamplers.0.conv.{m.group(2)}"
    if m := re.match(r"^mid\.block_([12])\.(.*)$", rest):
        tail = m.group(2)
        for src, dst in _RESNET.items():
            tail = dst + tail[len(src) :] if tail.startswith(src) else tail
        return f"{side}.mid_block.resnets.{int(m.group(1)) - 1}.{tail}"
    if m := re.match(r"^mid\.attn_1\.(.*)$", rest):
        tail = m.group(1)
        for src, dst in _ATTN.items():
            if tail.startswith(src):
                return f"{side}.mid_block.attentions.0.{dst}{tail[len(src) :]}"
    return key


def flux_ae_state_dict(state: Mapping[str, Tensor], num_levels: int) -> dict[str, Tensor]:
    """The release's (BFL) Flux AE weights under our (diffusers') names: renamed per level and block, and the
    attention's 1x1-conv kernels (C, C, 1, 1) reshaped to the Linear weights (C, C) that diffusers uses."""
    out: dict[str, Tensor] = {}
    for key, w in state.items():
        new = _rename(key, num_levels)
        if ".mid_block.attentions.0.to_" in new and new.endswith(".weight") and w.ndim == 4:
            w = w.reshape(w.shape[0], w.shape[1])  # a 1x1 conv is a Linear over channels
        if new in out:
            raise ValueError(f"two checkpoint keys map to {new!r} (the second is {key!r}); is the file mixed?")
        out[new] = w
    return out


def is_flux_ae_state(state: Mapping[str, Any]) -> bool:
    """Whether a state dict has the Flux AE's key names (BFL's, or diffusers' 2D `AutoencoderKL`)."""
    bfl = "encoder.down.0.block.0.conv1.weight" in state and any(k.startswith("decoder.up.") for k in state)
    ours = "encoder.down_blocks.0.resnets.0.conv1.weight" in state and "decoder.conv_in.weight" in state
    return bfl or ours


def infer_config(state: Mapping[str, Tensor], **overrides: Any) -> FluxAEConfig:
    """The architecture of a Flux AE state dict (our key names), from its tensor shapes; scale and shift are the
    release's unless given in `overrides`."""
    needed = ("encoder.conv_in.weight", "encoder.conv_out.weight")
    if lacking := [k for k in needed if k not in state]:
        raise ValueError(f"cannot infer the Flux AE config: the checkpoint lacks {lacking}")
    ch = state["encoder.conv_in.weight"].shape[0]
    widths, i = [], 0
    while f"encoder.down_blocks.{i}.resnets.0.conv1.weight" in state:
        widths.append(state[f"encoder.down_blocks.{i}.resnets.0.conv1.weight"].shape[0])
        i += 1
    blocks = 0
    while f"encoder.down_blocks.0.resnets.{blocks}.conv1.weight" in state:
        blocks += 1
    if any(w % ch for w in widths):
        raise ValueError(f"level widths {widths} are not multiples of conv_in's width {ch}: not a Flux AE layout")
    fields = {
        "in_channels": state["encoder.conv_in.weight"].shape[1],
        "out_channels": state["decoder.conv_out.weight"].shape[0] if "decoder.conv_out.weight" in state else 3,
        "ch": ch,
        "ch_mult": tuple(w // ch for w in widths),
        "num_res_blocks": blocks,
        "z_channels": state["encoder.conv_out.weight"].shape[0] // 2,
    }
    fields.update(overrides)
    return FluxAEConfig(**fields)


def _num_levels(state: Mapping[str, Any]) -> int:
    levels = {int(m.group(1)) for k in state if (m := re.match(r"^(?:encoder\.down|decoder\.up)\.(\d+)\.", k))}
    return max(levels) + 1 if levels else 0


def load_flux_ae(
    path: str | os.PathLike, config: FluxAEConfig | None = None, prefix: str | None = None, **overrides: Any
) -> FluxAE:
    """A FluxAE from the release's `flux1-dev-ae.safetensors` (BFL key names) or our model folder, strictly loaded.

    Args:
        config: the architecture; by default the folder's, or inferred from a single file's shapes, with
            `overrides` (e.g. `scaling_factor=`) applied.
    """
    saved, state = modelio.read_checkpoint(path, FluxAEConfig, prefix)
    if not is_flux_ae_state(state):
        raise ValueError(
            f"{path}: not a Flux AE checkpoint: no `encoder.down.0.block.0.conv1.weight` (nor diffusers' "
            f"`encoder.down_blocks.0.resnets.0.conv1.weight`) among its {len(state)} tensors "
            f"(first keys: {sorted(state)[:3]}); pass the wrapper's key prefix if it has one"
        )
    state = flux_ae_state_dict(state, _num_levels(state))
    if config is None:
        config = dataclasses.replace(saved, **overrides) if saved is not None else infer_config(state, **overrides)
    model = FluxAE(config)
    want = model.state_dict()
    missing, unexpected = sorted(set(want) - set(state)), sorted(set(state) - set(want))
    wrong = sorted(k for k in set(want) & set(state) if want[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        raise ValueError(
            f"{path} does not match the Flux AE config: {len(missing)} missing keys {missing[:5]}, "
            f"{len(unexpected)} unexpected keys {unexpected[:5]}, {len(wrong)} shape mismatches "
            f"{wrong[:3]}; is it a complete Flux AE file (pass its config if the layout differs)?"
        )
    model.load_state_dict(state, strict=True)
    return model.eval()
