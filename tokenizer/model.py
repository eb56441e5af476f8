"""Video DC-AE: a deterministic, non-causal autoencoder, 4x in time and 32x32 in space (Open-Sora 2.0 family).

The module tree and state-dict keys are those of the public release, so its checkpoints load with `strict=True`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from safetensors.torch import load_file
from torch import Tensor, nn

from cinedit.tokenizer.math import (
    average_channel_groups,
    channels_to_space_time,
    duplicate_channels,
    relu_linear_attention,
    rms_norm,
    space_time_to_channels,
)

BLOCK_TYPES = ("ResBlock", "EViT_GLU", "EViTS5_GLU")
RELEASE_BLOCKS = ["ResBlock"] * 3 + ["EViTS5_GLU"] * 3
RELEASE_TEMPORAL = [False, False, False, True, True, False]


@dataclass
class DCAEConfig:
    """Video DC-AE architecture; the defaults are the released f32t4c128 model.

    Stage i of the encoder runs its blocks then downsamples to stage i+1 (temporally too where
    `temporal_downsample[i]`); decoder stage i upsamples from stage i+1 (temporally where `temporal_upsample[i]`)
    then runs its blocks. Block types use the release's names: ResBlock, EViT_GLU, EViTS5_GLU (5x5x5 extra scale).
    """

    in_channels: int = 3
    latent_channels: int = 128
    encoder_width_list: list[int] = field(default_factory=lambda: [128, 256, 512, 512, 1024, 1024])
    encoder_depth_list: list[int] = field(default_factory=lambda: [2, 2, 2, 3, 3, 3])
    encoder_block_types: list[str] = field(default_factory=lambda: list(RELEASE_BLOCKS))
    temporal_downsample: list[bool] = field(default_factory=lambda: list(RELEASE_TEMPORAL))
    decoder_width_list: list[int] = field(default_factory=lambda: [128, 256, 512, 512, 1024, 1024])
    decoder_depth_list: list[int] = field(default_factory=lambda: [3, 3, 3, 3, 3, 3])
    decoder_block_types: list[str] = field(default_factory=lambda: list(RELEASE_BLOCKS))
    temporal_upsample: list[bool] = field(default_factory=lambda: list(RELEASE_TEMPORAL))
    head_dim: int = 32
    scaling_factor: float | None = 0.493

    def __post_init__(self) -> None:
        self.validate()

    @property
    def num_stages(self) -> int:
        return len(self.encoder_width_list)

    @property
    def spatial_compression(self) -> int:
        return 2 ** (self.num_stages - 1)

    @property
    def temporal_compression(self) -> int:
        return 2 ** sum(self.temporal_downsample)

    def validate(self) -> None:
        """Raise ValueError on an inconsistent architecture."""
        n = len(self.encoder_width_list)
        if self.head_dim < 1 or self.in_channels < 1 or self.latent_channels < 1:
            raise ValueError("head_dim, in_channels and latent_channels must be positive")
        if n < 2:
            raise ValueError(f"need at least 2 stages, got encoder_width_list={self.encoder_width_list}")
        for side, lists in (
            ("encoder", ("encoder_width_list", "encoder_depth_list", "encoder_block_types", "temporal_downsample")),
            ("decoder", ("decoder_width_list", "decoder_depth_list", "decoder_block_types", "temporal_upsample")),
        ):
            for name in lists:
                if len(getattr(self, name)) != n:
                    raise ValueError(f"{name} has {len(getattr(self, name))} entries, expected one per stage ({n})")
            widths, depths, blocks, temporal = (getattr(self, name) for name in lists)
            if any(d < 1 for d in depths):
                raise ValueError(f"{side} depths must be >= 1 per stage, got {depths}")
            if temporal[-1]:
                raise ValueError(f"{lists[3]}[-1] must be False: the last stage is not resampled")
            for i, (w, b) in enumerate(zip(widths, blocks)):
                if b not in BLOCK_TYPES:
                    raise ValueError(f"{side} stage {i}: unknown block type {b!r}, expected one of {BLOCK_TYPES}")
                if b.startswith("EViT") and w % self.head_dim != 0:
                    raise ValueError(
                        f"{side} stage {i}: EfficientViT width {w} must be a multiple of head_dim {self.head_dim}"
                    )
            for i in range(n - 1):
                # The parameter-free shortcuts need whole channel groups (on the 2D path too, used when T == 1).
                if (widths[i] * 4) % widths[i + 1]:
                    raise ValueError(
                        f"{side} stages {i}->{i + 1}: 4 * {widths[i]} is not a multiple of {widths[i + 1]} channels"
                    )
        if self.encoder_width_list[-1] % self.latent_channels or self.decoder_width_list[-1] % self.latent_channels:
            raise ValueError(
                f"latent_channels {self.latent_channels} must divide the last encoder/decoder widths "
                f"({self.encoder_width_list[-1]}, {self.decoder_width_list[-1]})"
            )
        if sum(self.temporal_downsample) != sum(self.temporal_upsample):
            raise ValueError("temporal_downsample and temporal_upsample must have the same number of True entries")
        if self.scaling_factor is not None and self.scaling_factor <= 0:
            raise ValueError(f"scaling_factor must be positive or None, got {self.scaling_factor}")


def f32t4c128() -> DCAEConfig:
    """The released Open-Sora 2.0 Video DC-AE (128 latent channels)."""
    return DCAEConfig()


def f32t4c256() -> DCAEConfig:
    """The 256-latent-channel variant (no released scaling factor, so latents stay unscaled)."""
    return DCAEConfig(latent_channels=256, scaling_factor=None)


def debug() -> DCAEConfig:
    """Tiny model with the release's layout (the parity fixtures' config), for tests and smoke runs."""
    widths = [8, 16, 32, 32, 64, 64]
    return DCAEConfig(
        latent_channels=16,
        encoder_width_list=list(widths),
        encoder_depth_list=[1] * 6,
        decoder_width_list=list(widths),
        decoder_depth_list=[1] * 6,
        scaling_factor=None,
    )


def demo() -> DCAEConfig:
    """`debug` with its two full-resolution stages at half width (4 and 8 channels): the demo's tokenizer.

    Those stages run at 1x and 1/2 of the input's side, so they cost most of a CPU step while holding few of the
    parameters: the 2 x 8 x 64 x 64 training step takes 0.54 s against 0.78 s for `debug` on one thread (0.445 against
    0.56 s in 2-thread demo runs), with 1.12M parameters against 1.16M. Same compression (4x32x32, 16 latent
    channels) and block layout.
    """
    widths = [4, 8, 32, 32, 64, 64]
    return replace(debug(), encoder_width_list=list(widths), decoder_width_list=list(widths))


PRESETS: dict[str, Callable[[], DCAEConfig]] = {
    "f32t4c128": f32t4c128,
    "f32t4c256": f32t4c256,
    "debug": debug,
    "demo": demo,
}


class RMSNorm(nn.Module):
    """Channel RMSNorm (dim 1) with weight and bias, eps 1e-5, normalised in float32."""

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.bias, self.eps)


class ConvLayer(nn.Module):
    """Conv3d with symmetric zero padding (non-causal), then optional RMSNorm and activation."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: tuple[int, int, int] = (1, 1, 1),
        groups: int = 1,
        bias: bool = True,
        norm: bool = False,
        act: Callable[[Tensor], Tensor] | None = None,
    ):
        super().__init__()
        pad = kernel_size // 2
        self.conv = nn.Conv3d(in_channels, out_channels, kernel_size, stride, padding=pad, groups=groups, bias=bias)
        self.norm = RMSNorm(out_channels) if norm else None
        self.act = act

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv(x)
        if self.norm is not None:
            x = self.norm(x)
        return x if self.act is None else self.act(x)


class OpSequential(nn.Module):
    """Ops applied in order, kept under `op_list` as in the release's key names."""

    def __init__(self, ops: list[nn.Module]):
        super().__init__()
        self.op_list = nn.ModuleList(ops)

    def forward(self, x: Tensor) -> Tensor:
        for op in self.op_list:
            x = op(x)
        return x


class Residual(nn.Module):
    """main(x) + shortcut(x); the shortcut has no parameters (identity unless given)."""

    def __init__(self, main: nn.Module, shortcut: nn.Module | None = None):
        super().__init__()
        self.main = main
        self.shortcut = nn.Identity() if shortcut is None else shortcut

    def forward(self, x: Tensor) -> Tensor:
        return self.main(x) + self.shortcut(x)


class ResBlock(nn.Module):
    """conv(bias) -> SiLU -> conv(no bias) -> RMSNorm."""

    def __init__(self, width: int):
        super().__init__()
        self.conv1 = ConvLayer(width, width, 3, act=F.silu)
        self.conv2 = ConvLayer(width, width, 3, bias=False, norm=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv2(self.conv1(x))


class MultiScaleLinearAttention(nn.Module):
    """ReLU linear attention over the whole T*H*W volume, with extra heads from local (depthwise) aggregation of qkv."""

    def __init__(self, width: int, head_dim: int, scales: tuple[int, ...]):
        super().__init__()
        self.head_dim = head_dim
        heads, qkv_dim = width // head_dim, 3 * width
        self.qkv = ConvLayer(width, qkv_dim, 1, bias=False)
        self.aggreg = nn.ModuleList(
            nn.Sequential(
                nn.Conv3d(qkv_dim, qkv_dim, s, padding=s // 2, groups=qkv_dim, bias=False),
                nn.Conv3d(qkv_dim, qkv_dim, 1, groups=3 * heads, bias=False),
            )
            for s in scales
        )
        self.proj = ConvLayer(width * (1 + len(scales)), width, 1, bias=False, norm=True)

    def forward(self, x: Tensor) -> Tensor:
        t, h, w = x.shape[2:]
        qkv = self.qkv(x)
        qkv = torch.cat([qkv, *(op(qkv) for op in self.aggreg)], dim=1)
        # Channels are laid out per head as [q | k | v], each head_dim wide.
        qkv = rearrange(qkv, "b (n c) t h w -> b n c (t h w)", c=3 * self.head_dim)
        q, k, v = qkv.chunk(3, dim=2)
        out = rearrange(relu_linear_attention(q, k, v), "b n c (t h w) -> b (n c) t h w", t=t, h=h, w=w)
        return self.proj(out)


class GLUMBConv(nn.Module):
    """1x1x1 expand (SiLU) -> 3x3x3 depthwise -> SiLU-gated half -> 1x1x1 project -> RMSNorm."""

    def __init__(self, width: int, expand: int = 4):
        super().__init__()
        mid = width * expand
        self.inverted_conv = ConvLayer(width, 2 * mid, 1, act=F.silu)
        self.depth_conv = ConvLayer(2 * mid, 2 * mid, 3, groups=2 * mid)
        self.point_conv = ConvLayer(mid, width, 1, bias=False, norm=True)

    def forward(self, x: Tensor) -> Tensor:
        x, gate = self.depth_conv(self.inverted_conv(x)).chunk(2, dim=1)
        return self.point_conv(x * F.silu(gate))


class EfficientViTBlock(nn.Module):
    """Residual multi-scale linear attention, then residual GLU-MBConv."""

    def __init__(self, width: int, head_dim: int, scales: tuple[int, ...]):
        super().__init__()
        self.context_module = Residual(MultiScaleLinearAttention(width, head_dim, scales))
        self.local_module = Residual(GLUMBConv(width))

    def forward(self, x: Tensor) -> Tensor:
        return self.local_module(self.context_module(x))


def build_block(block_type: str, width: int, head_dim: int) -> nn.Module:
    """One residual block of the given release block type."""
    if block_type == "ResBlock":
        return Residual(ResBlock(width))
    return EfficientViTBlock(width, head_dim, scales=(5,) if block_type == "EViTS5_GLU" else ())


class ChannelAveraging(nn.Module):
    """Parameter-free downsampling shortcut: pixel-unshuffle (3D at temporal stages when T > 1), average groups."""

    def __init__(self, out_channels: int, factor: int, temporal: bool):
        super().__init__()
        self.out_channels, self.factor, self.temporal = out_channels, factor, temporal

    def forward(self, x: Tensor) -> Tensor:
        ft = 2 if self.temporal and x.shape[2] > 1 else 1
        return average_channel_groups(space_time_to_channels(x, ft, self.factor), self.out_channels)


class ChannelDuplicating(nn.Module):
    """Parameter-free upsampling shortcut: repeat-interleave channels, then pixel-shuffle (3D at temporal stages)."""

    def __init__(self, out_channels: int, factor: int, temporal: bool):
        super().__init__()
        self.out_channels, self.factor, self.temporal = out_channels, factor, temporal

    def forward(self, x: Tensor, video: bool = True) -> Tensor:
        ft = 2 if self.temporal and video else 1
        repeats = self.out_channels * ft * self.factor**2 // x.shape[1]
        return channels_to_space_time(duplicate_channels(x, repeats), ft, self.factor)


class InterpolateConv(nn.Module):
    """Nearest-neighbour 2x upsampling (also in time at temporal stages of a video), then a 3x3x3 conv."""

    def __init__(self, in_channels: int, out_channels: int, temporal: bool):
        super().__init__()
        self.temporal = temporal
        self.conv = ConvLayer(in_channels, out_channels, 3)

    def forward(self, x: Tensor, video: bool = True) -> Tensor:
        scale = (2 if self.temporal and video else 1, 2, 2)
        return self.conv(F.interpolate(x, scale_factor=scale, mode="nearest"))


class Upsample(nn.Module):
    """Residual upsampling block: InterpolateConv + duplicating shortcut."""

    def __init__(self, in_channels: int, out_channels: int, temporal: bool):
        super().__init__()
        self.main = InterpolateConv(in_channels, out_channels, temporal)
        self.shortcut = ChannelDuplicating(out_channels, 2, temporal)

    def forward(self, x: Tensor, video: bool = True) -> Tensor:
        return self.main(x, video) + self.shortcut(x, video)


class DecoderStage(OpSequential):
    """Optional upsampling from the next stage, then the stage's blocks."""

    def forward(self, x: Tensor, video: bool = True) -> Tensor:
        for op in self.op_list:
            x = op(x, video) if isinstance(op, Upsample) else op(x)
        return x


class Encoder(nn.Module):
    """conv-in, stages of blocks each followed by a strided conv with averaging shortcut, conv-out with shortcut."""

    def __init__(self, cfg: DCAEConfig):
        super().__init__()
        widths, n = cfg.encoder_width_list, cfg.num_stages
        self.project_in = ConvLayer(cfg.in_channels, widths[0], 3)
        stages = []
        for i in range(n):
            ops = [
                build_block(cfg.encoder_block_types[i], widths[i], cfg.head_dim)
                for _ in range(cfg.encoder_depth_list[i])
            ]
            if i < n - 1:
                temporal = cfg.temporal_downsample[i]
                down = ConvLayer(widths[i], widths[i + 1], 3, stride=(2 if temporal else 1, 2, 2))
                ops.append(Residual(down, ChannelAveraging(widths[i + 1], 2, temporal)))
            stages.append(OpSequential(ops))
        self.stages = nn.ModuleList(stages)
        project_out = OpSequential([ConvLayer(widths[-1], cfg.latent_channels, 3)])
        self.project_out = Residual(project_out, ChannelAveraging(cfg.latent_channels, 1, False))

    def forward(self, x: Tensor) -> Tensor:
        x = self.project_in(x)
        for stage in self.stages:
            x = stage(x)
        return self.project_out(x)


class Decoder(nn.Module):
    """conv-in with duplicating shortcut, stages (upsample then blocks) from deepest to shallowest, norm-relu-conv."""

    def __init__(self, cfg: DCAEConfig):
        super().__init__()
        widths, n = cfg.decoder_width_list, cfg.num_stages
        self.project_in = Residual(
            ConvLayer(cfg.latent_channels, widths[-1], 3), ChannelDuplicating(widths[-1], 1, False)
        )
        stages = []
        for i in range(n):
            ops = [Upsample(widths[i + 1], widths[i], cfg.temporal_upsample[i])] if i < n - 1 else []
            ops += [
                build_block(cfg.decoder_block_types[i], widths[i], cfg.head_dim)
                for _ in range(cfg.decoder_depth_list[i])
            ]
            stages.append(DecoderStage(ops))
        self.stages = nn.ModuleList(stages)
        self.project_out = OpSequential([RMSNorm(widths[0]), nn.ReLU(), ConvLayer(widths[0], cfg.in_channels, 3)])

    def forward(self, z: Tensor, video: bool = True) -> Tensor:
        x = self.project_in(z)
        for stage in reversed(self.stages):
            x = stage(x, video)
        return self.project_out(x)


class VideoDCAE(nn.Module):
    """Video DC-AE: (b, 3, t, h, w) in [-1, 1] <-> latents (b, c, t/4, h/32, w/32); t = 1 is an image."""

    kind = "dcae"
    causal = False  # its temporal convolutions look both ways: 4 frames per latent frame
    native_tiling = False  # large inputs go through tokenizer.tiling
    shift_factor = 0.0  # deterministic AE: latents are only scaled

    def __init__(self, config: DCAEConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.spatial_compression = config.spatial_compression
        self.temporal_compression = config.temporal_compression
        self.scaling_factor = config.scaling_factor
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.init_weights()

    def compile_blocks(self, **options) -> list[nn.Module]:
        """Regional `torch.compile`: every stage of the encoder and the decoder compiled on its own, in place
        (`nn.Module.compile`: state-dict keys do not change). Stages, not blocks: blocks of one class share their
        code, and their many widths would each be a recompile of it (Dynamo stops at 8 and runs the rest eagerly);
        a stage is one graph per width."""
        stages = [*self.encoder.stages, *self.decoder.stages]
        for stage in stages:
            stage.compile(**options)
        return stages

    def init_weights(self) -> None:
        """Truncated normal (std 0.02) conv weights, zero biases, unit RMSNorm gains."""
        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, RMSNorm):
                # The reference draws the gains from N(0, 0.02) too; unit gains are the usual, consistent choice.
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def zero_residual_branches(self) -> int:
        """Set the RMSNorm gain that closes each residual branch (ResBlock, attention projection, GLU-MBConv) to
        zero, so every block is the identity: the model is its convolutions plus the parameter-free averaging /
        duplicating shortcuts, and each block then learns a residual on top. Returns the number of gains zeroed.

        The tokenizer trainer does this to a model it trains from scratch (`model.zero_init`). With unit gains each
        random branch adds unit-RMS noise to a signal ~0.1 in size: the `debug` preset scored 13.15 dB held-out after
        150 steps with them, 13.98 dB with zero gains. (The reference draws these gains from N(0, 0.02), close to
        zero too.) A model built directly keeps `init_weights` as it is: a seeded random codec for tests.
        """
        gains = []
        for m in self.modules():
            if isinstance(m, ResBlock):
                gains.append(m.conv2.norm.weight)
            elif isinstance(m, MultiScaleLinearAttention):
                gains.append(m.proj.norm.weight)
            elif isinstance(m, GLUMBConv):
                gains.append(m.point_conv.norm.weight)
        with torch.no_grad():
            for g in gains:
                g.zero_()
        return len(gains)

    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """(c, t, h, w) of the latent of a (3, num_frames, height, width) input."""
        self._check_size(num_frames, height, width)
        t = 1 if num_frames == 1 else num_frames // self.temporal_compression
        s = self.spatial_compression
        return self.config.latent_channels, t, height // s, width // s

    def decoded_frames(self, t_latent: int) -> int:
        """Frames that `t_latent` latent frames decode to by default: 4t, or 1 (an image) for t = 1."""
        return 1 if t_latent == 1 else t_latent * self.temporal_compression

    def _check_size(self, t: int, h: int, w: int) -> None:
        s, tc = self.spatial_compression, self.temporal_compression
        if h % s or w % s:
            raise ValueError(
                f"height and width must be multiples of {s}, got {h}x{w}: resize or crop to e.g. "
                f"{max(s, h // s * s)}x{max(s, w // s * s)}"
            )
        if t != 1 and t % tc:
            fix = max(tc, t // tc * tc)
            raise ValueError(f"num_frames must be 1 (an image) or a multiple of {tc}, got {t}: trim to {fix} frames")

    def encode(self, x: Tensor) -> Tensor:
        """(b, 3, t, h, w) -> unscaled latents (b, c, t/4, h/32, w/32); t = 1 gives one latent frame."""
        if x.ndim != 5 or x.shape[1] != self.config.in_channels:
            raise ValueError(f"expected (b, {self.config.in_channels}, t, h, w), got {tuple(x.shape)}")
        self._check_size(*x.shape[2:])
        return self.encoder(x)

    def decode(self, z: Tensor, num_frames: int | None = None) -> Tensor:
        """Unscaled latents (b, c, t, h, w) -> (b, 3, num_frames, 32h, 32w).

        A single latent frame is ambiguous (an image, or a 4-frame video): it decodes to one frame unless
        `num_frames` = 4 is passed. By default num_frames is 1 for t = 1 and 4t otherwise.
        """
        if z.ndim != 5 or z.shape[1] != self.config.latent_channels:
            raise ValueError(f"expected latents (b, {self.config.latent_channels}, t, h, w), got {tuple(z.shape)}")
        t = z.shape[2]
        video_frames = t * self.temporal_compression
        if num_frames is None:
            num_frames = 1 if t == 1 else video_frames
        if num_frames != video_frames and not (t == 1 and num_frames == 1):
            allowed = f"1 or {video_frames}" if t == 1 else str(video_frames)
            raise ValueError(f"{t} latent frames decode to num_frames={allowed}, got {num_frames}")
        return self.decoder(z, video=num_frames > 1)

    def forward(self, x: Tensor) -> Tensor:
        """Reconstruction of x, with the same shape as x."""
        return self.decode(self.encode(x), num_frames=x.shape[2])

    def encode_latents(self, x: Tensor, sample: bool = False, generator: torch.Generator | None = None) -> Tensor:
        """Latents as the generator sees them: encode(x) / scaling_factor.

        `sample` and `generator` exist for the KL tokenizers' interface; this AE is deterministic and ignores them.
        """
        z = self.encode(x)
        return z if self.scaling_factor is None else z / self.scaling_factor

    def decode_latents(self, z: Tensor, num_frames: int | None = None) -> Tensor:
        """Inverse of `encode_latents`: decode(z * scaling_factor)."""
        if self.scaling_factor is not None:
            z = z * self.scaling_factor
        return self.decode(z, num_frames)


def config_from_reference(ref: Mapping[str, Any]) -> DCAEConfig:
    """DCAEConfig from the release's resolved DCAE config dict (Open-Sora `DCAEConfig`, as in checkpoints/fixtures)."""
    enc, dec = ref["encoder"], ref["decoder"]
    fixed = {
        "use_quant_conv": (ref, False),
        "is_image_model": (ref, False),
        "encoder.norm": (enc, "rms3d"),
        "encoder.act": (enc, "silu"),
        "encoder.downsample_block_type": (enc, "Conv"),
        "encoder.downsample_match_channel": (enc, True),
        "encoder.downsample_shortcut": (enc, "averaging"),
        "encoder.out_norm": (enc, None),
        "encoder.out_act": (enc, None),
        "encoder.out_shortcut": (enc, "averaging"),
        "encoder.double_latent": (enc, False),
        "encoder.is_video": (enc, True),
        "decoder.in_shortcut": (dec, "duplicating"),
        "decoder.norm": (dec, "rms3d"),
        "decoder.act": (dec, "silu"),
        "decoder.upsample_block_type": (dec, "InterpolateConv"),
        "decoder.upsample_match_channel": (dec, True),
        "decoder.upsample_shortcut": (dec, "duplicating"),
        "decoder.out_norm": (dec, "rms3d"),
        "decoder.out_act": (dec, "relu"),
        "decoder.is_video": (dec, True),
    }
    for name, (section, expected) in fixed.items():
        value = section.get(name.split(".")[-1], expected)
        values = value if isinstance(value, list) else [value]
        if any(v != expected for v in values):
            raise ValueError(f"unsupported reference option {name}={value!r}: only {expected!r} is implemented")

    def per_stage(value: str | list[str], n: int) -> list[str]:
        return list(value) if isinstance(value, list | tuple) else [value] * n

    n = len(enc["width_list"])
    cfg = DCAEConfig(
        in_channels=ref.get("in_channels", 3),
        latent_channels=ref["latent_channels"],
        encoder_width_list=list(enc["width_list"]),
        encoder_depth_list=list(enc["depth_list"]),
        encoder_block_types=per_stage(enc["block_type"], n),
        temporal_downsample=[bool(v) for v in enc["temporal_downsample"]],
        decoder_width_list=list(dec["width_list"]),
        decoder_depth_list=list(dec["depth_list"]),
        decoder_block_types=per_stage(dec["block_type"], n),
        temporal_upsample=[bool(v) for v in dec["temporal_upsample"]],
        scaling_factor=ref.get("scaling_factor"),
    )
    for key, ours in (
        ("spatial_compression_ratio", cfg.spatial_compression),
        ("time_compression_ratio", cfg.temporal_compression),
    ):
        if key in ref and ref[key] != ours:
            raise ValueError(f"reference {key}={ref[key]} does not match the stage layout, which gives {ours}")
    return cfg


def load_weights(model: VideoDCAE, path: str | Path, prefix: str = "", strict: bool = True) -> VideoDCAE:
    """Load a safetensors checkpoint with release key names; keys are read from under `prefix` (stripped)."""
    state = {k[len(prefix) :]: v for k, v in load_file(str(path)).items() if k.startswith(prefix)}
    model.load_state_dict(state, strict=strict)
    return model
