"""MMDiT generator: Flux-style double-stream then single-stream blocks over packed video tokens, 3D RoPE.

State-dict keys are the Open-Sora 2.0 release's (unfused q/k/v), so its checkpoints load as they are; Flux's fused
q/k/v checkpoints are split on loading (`loading.split_qkv_state_dict`). With `guidance_embed` it is also the
guidance-distilled Flux.1-dev text-to-image model.
Patchify is outside the model: it sees packed tokens `img` (b, l, in_channels) (see `math.pack`).
With `packed=` (a `cinedit.generator.packing.PackedBatch`) one forward runs several samples of different shapes as
one batch-1 sequence: the same blocks, with per-sample modulation spread over each sample's tokens and
block-diagonal attention.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from cinedit.generator import math as gmath  # called as gmath.attention so parallel code can swap it
from cinedit.generator.math import ROPE_LAYOUTS, apply_rope, rms_norm, rope, timestep_embedding

if TYPE_CHECKING:  # a pack is only read (its layout) and called (`attend`): no import when the module runs
    from cinedit.generator.packing import PackedBatch

TIME_DIM = 256


@dataclass
class MMDiTConfig:
    """MMDiT architecture; the defaults are the released 11B model on HunyuanVAE latents (16 ch, patch 2).

    `in_channels` is the packed token width (latent channels * patch_size**2). `qkv_bias` concerns the
    double blocks' q/k/v only. `rope_layout` is "rotate_half" for the release's weights and "interleaved" for
    Flux-style weights. `guidance_embed` adds Flux.1-dev's `guidance_in`: the distilled guidance strength joins
    the modulation vector, and `forward` then needs `guidance`.
    """

    in_channels: int = 64
    patch_size: int = 2
    hidden_size: int = 3072
    num_heads: int = 24
    depth: int = 19
    depth_single_blocks: int = 38
    mlp_ratio: float = 4.0
    axes_dim: list[int] = field(default_factory=lambda: [16, 56, 56])
    theta: float = 10000
    qkv_bias: bool = True
    vec_in_dim: int = 768
    context_in_dim: int = 4096
    cond_embed: bool = True
    rope_layout: str = "rotate_half"
    guidance_embed: bool = False

    def __post_init__(self) -> None:
        self.axes_dim = list(self.axes_dim)
        self.validate()

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    @property
    def latent_channels(self) -> int:
        return self.in_channels // self.patch_size**2

    @property
    def cond_channels(self) -> int:
        """Width of a packed i2v condition: the mask (1 channel) and the reference latent, packed like img."""
        return (self.latent_channels + 1) * self.patch_size**2

    def validate(self) -> None:
        """Raise ValueError on an inconsistent architecture."""
        for name in ("in_channels", "hidden_size", "num_heads", "vec_in_dim", "context_in_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.depth < 0 or self.depth_single_blocks < 0:
            raise ValueError(f"block counts must be >= 0, got depth={self.depth}, single={self.depth_single_blocks}")
        if self.patch_size not in (1, 2):
            raise ValueError(f"patch_size must be 1 or 2, got {self.patch_size}")
        if self.in_channels % self.patch_size**2:
            raise ValueError(
                f"in_channels {self.in_channels} is the packed width and must be a multiple of "
                f"patch_size**2 = {self.patch_size**2}"
            )
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} must be divisible by num_heads {self.num_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head dim {self.head_dim} must be even for RoPE")
        if len(self.axes_dim) != 3 or any(d < 2 or d % 2 for d in self.axes_dim):
            raise ValueError(f"axes_dim must be three positive even sizes (t, h, w), got {self.axes_dim}")
        if sum(self.axes_dim) != self.head_dim:
            raise ValueError(
                f"sum(axes_dim) = {sum(self.axes_dim)} must equal the head dim hidden_size/num_heads = {self.head_dim}"
            )
        if self.mlp_hidden < 1:
            raise ValueError(f"mlp_ratio {self.mlp_ratio} gives an empty MLP")
        if self.theta <= 0:
            raise ValueError(f"theta must be positive, got {self.theta}")
        if self.rope_layout not in ROPE_LAYOUTS:
            raise ValueError(f"rope_layout must be one of {ROPE_LAYOUTS}, got {self.rope_layout!r}")
        if not isinstance(self.guidance_embed, bool):
            raise ValueError(f"guidance_embed must be True or False, got {self.guidance_embed!r}")


def mmdit_11b() -> MMDiTConfig:
    """The released Open-Sora 2.0 11B model on HunyuanVAE latents (16 channels, patch 2)."""
    return MMDiTConfig()


def mmdit_11b_dcae() -> MMDiTConfig:
    """The released 11B model for the 128-channel Video DC-AE (patch 1)."""
    return MMDiTConfig(in_channels=128, patch_size=1)


def mmdit_2b() -> MMDiTConfig:
    """2,143,102,592 parameters on DC-AE latents: bf16 weights, fp32 master + AdamW states (~16 B/param, 34 GB)
    and checkpointed activations fit one 80 GB GPU.

    Head dim 128 and axes [16, 56, 56] as in the release, so RoPE tables and kernels are the same.
    """
    return MMDiTConfig(in_channels=128, patch_size=1, hidden_size=1792, num_heads=14, depth=10, depth_single_blocks=20)


def debug() -> MMDiTConfig:
    """Tiny model (the p1 parity fixture's config, on the tiny DC-AE's 16 latent channels) for tests and smoke runs."""
    return MMDiTConfig(
        in_channels=16,
        patch_size=1,
        hidden_size=64,
        num_heads=4,
        depth=2,
        depth_single_blocks=2,
        axes_dim=[4, 6, 6],
        vec_in_dim=32,
        context_in_dim=48,
    )


PRESETS: dict[str, Callable[[], MMDiTConfig]] = {
    "11b": mmdit_11b,
    "11b-dcae": mmdit_11b_dcae,
    "2b": mmdit_2b,
    "debug": debug,
}

# Reference (Open-Sora `MMDiTConfig`) fields copied under the same name; the last two have defaults there.
_REQUIRED = (
    "in_channels",
    "hidden_size",
    "num_heads",
    "depth",
    "depth_single_blocks",
    "mlp_ratio",
    "axes_dim",
    "theta",
    "qkv_bias",
    "vec_in_dim",
    "context_in_dim",
)
_REFERENCE_DEFAULTS = {"patch_size": 2, "cond_embed": False, "guidance_embed": False}
_LAYOUT_NAMES = {
    "liger": "rotate_half",
    "flux": "interleaved",
    "rotate_half": "rotate_half",
    "interleaved": "interleaved",
}


def config_from_reference(ref: Mapping[str, Any]) -> MMDiTConfig:
    """MMDiTConfig from the release's model config dict (Open-Sora `MMDiTConfig` fields, as in configs/fixtures).

    Absent optional fields take the reference's defaults (patch_size 2, no cond_in, no guidance_in, Flux RoPE);
    non-architectural ones (from_pretrained, cache_dir, grad_ckpt_settings, ...) are ignored. `fused_qkv` is
    not architecture but the key layout of the reference's checkpoints (Flux's default): the model is the same,
    and the loader splits fused keys wherever it finds them. A `rope_layout` entry ("liger"/"flux" or ours)
    stands in for a missing `use_liger_rope`.
    """
    if ref.get("fused_qkv", True) not in (True, False):
        raise ValueError(f"reference option fused_qkv must be True or False, got {ref['fused_qkv']!r}")
    missing = [name for name in _REQUIRED if name not in ref]
    if missing:
        raise ValueError(f"reference MMDiT config lacks {missing}")
    if ref.get("use_liger_rope") is not None:
        layout = "rotate_half" if ref["use_liger_rope"] else "interleaved"
    elif "rope_layout" in ref:
        if ref["rope_layout"] not in _LAYOUT_NAMES:
            raise ValueError(f"unknown rope_layout {ref['rope_layout']!r}, expected one of {sorted(_LAYOUT_NAMES)}")
        layout = _LAYOUT_NAMES[ref["rope_layout"]]
    else:
        layout = "interleaved"
    fields = {name: ref[name] for name in _REQUIRED}
    fields.update({name: ref.get(name, default) for name, default in _REFERENCE_DEFAULTS.items()})
    return MMDiTConfig(**fields, rope_layout=layout)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """AdaLN: (1 + scale) * LayerNorm(x) + shift, the norm without affine parameters."""
    return (1 + scale) * F.layer_norm(x, x.shape[-1:], eps=1e-6) + shift


def spread(chunks: list[Tensor], seg: Tensor | None) -> list[Tensor]:
    """Modulation chunks (n, 1, D), one per packed sample, -> (1, l, D) per token of a stream whose tokens belong to
    samples seg (l,); seg None (unpacked): the chunks as they are, broadcast over each sample's tokens."""
    return chunks if seg is None else [c[:, 0][seg][None] for c in chunks]


class MLPEmbedder(nn.Module):
    def __init__(self, in_dim: int, hidden: int):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden)
        self.out_layer = nn.Linear(hidden, hidden)

    def forward(self, x: Tensor) -> Tensor:
        return self.out_layer(F.silu(self.in_layer(x)))


class QKNorm(nn.Module):
    """Per-head RMSNorm of queries and keys with learnable gains."""

    def __init__(self, head_dim: int):
        super().__init__()
        self.query_norm = RMSNorm(head_dim)
        self.key_norm = RMSNorm(head_dim)

    def forward(self, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        return self.query_norm(q), self.key_norm(k)


class RMSNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.scale)


class Modulation(nn.Module):
    """mod -> n chunks of (shift, scale, gate), each (b, 1, hidden)."""

    def __init__(self, dim: int, n: int):
        super().__init__()
        self.n = n
        self.lin = nn.Linear(dim, 3 * n * dim)

    def forward(self, mod: Tensor) -> list[Tensor]:
        return self.lin(F.silu(mod))[:, None].chunk(3 * self.n, dim=-1)


class SelfAttention(nn.Module):
    """The q/k/v projections, QK norm and output projection of one stream of a double block."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool):
        super().__init__()
        self.num_heads = num_heads
        self.q_proj = nn.Linear(dim, dim, bias=qkv_bias)
        self.k_proj = nn.Linear(dim, dim, bias=qkv_bias)
        self.v_proj = nn.Linear(dim, dim, bias=qkv_bias)
        self.norm = QKNorm(dim // num_heads)
        self.proj = nn.Linear(dim, dim)

    def qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        q, k, v = (
            rearrange(f(x), "b l (n d) -> b n l d", n=self.num_heads) for f in (self.q_proj, self.k_proj, self.v_proj)
        )
        q, k = self.norm(q, k)
        return q.to(v), k.to(v), v


def mlp(dim: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))


class DoubleStreamBlock(nn.Module):
    """Separate image and text weights, joint attention over [txt; img]."""

    def __init__(self, cfg: MMDiTConfig):
        super().__init__()
        dim, self.rope_layout = cfg.hidden_size, cfg.rope_layout
        self.img_mod = Modulation(dim, 2)
        self.img_attn = SelfAttention(dim, cfg.num_heads, cfg.qkv_bias)
        self.img_mlp = mlp(dim, cfg.mlp_hidden)
        self.txt_mod = Modulation(dim, 2)
        self.txt_attn = SelfAttention(dim, cfg.num_heads, cfg.qkv_bias)
        self.txt_mlp = mlp(dim, cfg.mlp_hidden)

    def forward(
        self, img: Tensor, txt: Tensor, mod: Tensor, pe: Tensor, packed: PackedBatch | None = None
    ) -> tuple[Tensor, Tensor]:
        """packed: the streams hold every sample's tokens in sample order; pe is in packed order."""
        img_seg, txt_seg = (None, None) if packed is None else (packed.img_seg, packed.txt_seg)
        i_shift1, i_scale1, i_gate1, i_shift2, i_scale2, i_gate2 = spread(self.img_mod(mod), img_seg)
        t_shift1, t_scale1, t_gate1, t_shift2, t_scale2, t_gate2 = spread(self.txt_mod(mod), txt_seg)
        img_q, img_k, img_v = self.img_attn.qkv(modulate(img, i_shift1, i_scale1))
        txt_q, txt_k, txt_v = self.txt_attn.qkv(modulate(txt, t_shift1, t_scale1))
        q, k, v = (torch.cat(pair, dim=2) for pair in ((txt_q, img_q), (txt_k, img_k), (txt_v, img_v)))
        if packed is not None:  # [txt_0; img_0; txt_1; img_1; ...], each sample's joint order
            q, k, v = (x[:, :, packed.order] for x in (q, k, v))
        q, k = apply_rope(q, pe, self.rope_layout), apply_rope(k, pe, self.rope_layout)
        if packed is None:
            attn = gmath.attention(q, k, v)  # (b, l_txt + l_img, hidden)
        else:
            attn = packed.attend(q, k, v)[:, packed.inverse]  # back to [txt_0; txt_1; ...; img_0; img_1; ...]
        txt_attn, img_attn = attn[:, : txt.shape[1]], attn[:, txt.shape[1] :]
        img = img + i_gate1 * self.img_attn.proj(img_attn)
        img = img + i_gate2 * self.img_mlp(modulate(img, i_shift2, i_scale2))
        txt = txt + t_gate1 * self.txt_attn.proj(txt_attn)
        txt = txt + t_gate2 * self.txt_mlp(modulate(txt, t_shift2, t_scale2))
        return img, txt


class SingleStreamBlock(nn.Module):
    """One stream over [txt; img]: attention and MLP in parallel from one modulated input."""

    def __init__(self, cfg: MMDiTConfig):
        super().__init__()
        dim, self.rope_layout, self.num_heads = cfg.hidden_size, cfg.rope_layout, cfg.num_heads
        self.split = (dim, cfg.mlp_hidden)
        # As in the release, these always have biases: qkv_bias only concerns the double blocks.
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_mlp = nn.Linear(dim, dim + cfg.mlp_hidden)
        self.linear2 = nn.Linear(dim + cfg.mlp_hidden, dim)
        self.norm = QKNorm(cfg.head_dim)
        self.modulation = Modulation(dim, 1)

    def forward(self, x: Tensor, mod: Tensor, pe: Tensor, packed: PackedBatch | None = None) -> Tensor:
        """packed: x is the packed sequence, in packed order."""
        shift, scale, gate = spread(self.modulation(mod), None if packed is None else packed.seg)
        x_mod = modulate(x, shift, scale)
        v, h = self.v_mlp(x_mod).split(self.split, dim=-1)
        q, k, v = (
            rearrange(t, "b l (n d) -> b n l d", n=self.num_heads) for t in (self.q_proj(x_mod), self.k_proj(x_mod), v)
        )
        q, k = self.norm(q, k)
        q, k = apply_rope(q.to(v), pe, self.rope_layout), apply_rope(k.to(v), pe, self.rope_layout)
        attn = gmath.attention(q, k, v) if packed is None else packed.attend(q, k, v)
        return x + gate * self.linear2(torch.cat([attn, F.gelu(h, approximate="tanh")], dim=-1))


class LastLayer(nn.Module):
    def __init__(self, dim: int, out_channels: int):
        super().__init__()
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.linear = nn.Linear(dim, out_channels)

    def forward(self, x: Tensor, mod: Tensor, packed: PackedBatch | None = None) -> Tensor:
        chunks = self.adaLN_modulation(mod)[:, None].chunk(2, dim=-1)
        shift, scale = spread(chunks, None if packed is None else packed.img_seg)
        return self.linear(modulate(x, shift, scale))


class EmbedND(nn.Module):
    """Position ids (b, l, 3) -> RoPE table pe (b, 1, l, head_dim/2, 2); no parameters."""

    def __init__(self, cfg: MMDiTConfig):
        super().__init__()
        self.axes_dim, self.theta, self.layout = list(cfg.axes_dim), cfg.theta, cfg.rope_layout

    def forward(self, ids: Tensor) -> Tensor:
        return rope(ids, self.axes_dim, self.theta, self.layout)


class MMDiT(nn.Module):
    """Rectified-flow velocity model over packed video tokens, conditioned on T5 states, CLIP pooled and time."""

    def __init__(self, config: MMDiTConfig):
        super().__init__()
        config.validate()
        self.config = cfg = config
        dim = cfg.hidden_size
        self.pe_embedder = EmbedND(cfg)
        self.img_in = nn.Linear(cfg.in_channels, dim)
        self.time_in = MLPEmbedder(TIME_DIM, dim)
        self.vector_in = MLPEmbedder(cfg.vec_in_dim, dim)
        self.guidance_in = MLPEmbedder(TIME_DIM, dim) if cfg.guidance_embed else None
        self.cond_in = nn.Linear(cfg.cond_channels, dim) if cfg.cond_embed else None
        self.txt_in = nn.Linear(cfg.context_in_dim, dim)
        self.double_blocks = nn.ModuleList(DoubleStreamBlock(cfg) for _ in range(cfg.depth))
        self.single_blocks = nn.ModuleList(SingleStreamBlock(cfg) for _ in range(cfg.depth_single_blocks))
        # Built with patch size 1 as in the release: tokens come in and go out packed.
        self.final_layer = LastLayer(dim, cfg.in_channels)
        if self.cond_in is not None:
            # The i2v branch starts as a no-op, so t2v weights keep their behaviour when it is added.
            nn.init.zeros_(self.cond_in.weight)
            nn.init.zeros_(self.cond_in.bias)

    def compile_blocks(self, **options) -> list[nn.Module]:
        """Regional `torch.compile`: every double and single block compiled on its own, in place (`nn.Module.compile`,
        so state-dict keys do not change). Compile time is that of a block or two (blocks of one kind share their
        compiled code), not of the whole model, and the embedders, RoPE table and final layer stay eager."""
        blocks = [*self.double_blocks, *self.single_blocks]
        for block in blocks:
            block.compile(**options)
        return blocks

    def forward(
        self,
        img: Tensor,
        img_ids: Tensor,
        txt: Tensor,
        txt_ids: Tensor,
        timesteps: Tensor,
        vec: Tensor,
        cond: Tensor | None = None,
        guidance: Tensor | None = None,
        packed: PackedBatch | None = None,
    ) -> Tensor:
        """Velocity (b, l_img, in_channels) for packed tokens img at flow time timesteps (b,) in [0, 1].

        Args:
            img_ids, txt_ids: (b, l, 3) float (t, h, w) positions; text tokens all at (0, 0, 0).
            vec: (b, vec_in_dim) pooled text vector (CLIP pooled output or MiniLM mean).
            txt: (b, l_txt, context_in_dim) T5 states.
            cond: (b, l_img, cond_channels) packed [mask, masked reference latent] for i2v; None means no
                condition, the same as an all-zero one (cond_in then adds only its bias).
            guidance: (b,) distilled guidance strength (Flux.1-dev: e.g. 4.0), required by and only accepted by
                a `guidance_embed` model; embedded like the time, with the same 1000x factor.
            packed: n samples of different shapes in one sequence (`PackedBatch.inputs()` gives every argument):
                img, img_ids, cond (1, Li, .) and txt, txt_ids (1, Lt, .) all samples' tokens in sample order,
                timesteps, vec, guidance one per sample (n, ...); returns (1, Li, in_channels)
                (`PackedBatch.unpack_img` splits it by sample).
        """
        cfg = self.config
        if img.shape[-1] != cfg.in_channels or txt.shape[-1] != cfg.context_in_dim:
            raise ValueError(
                f"img/txt widths {img.shape[-1]}/{txt.shape[-1]} do not match the config's "
                f"in_channels={cfg.in_channels}/context_in_dim={cfg.context_in_dim}"
            )
        img = self.img_in(img)
        if self.cond_in is not None:
            img = img + (self.cond_in.bias if cond is None else self.cond_in(cond))
        elif cond is not None:
            raise ValueError("a condition was given but this model has no cond_in (cond_embed=False)")
        # mod: what AdaLN modulates with = time embedding (+ guidance embedding) + pooled-text embedding, summed in
        # the reference's order.
        mod = self.time_in(timestep_embedding(timesteps, TIME_DIM).to(img.dtype))
        if self.guidance_in is not None:
            if guidance is None:
                raise ValueError("this model is guidance-distilled (guidance_embed=True): pass guidance, e.g. 4.0")
            mod = mod + self.guidance_in(timestep_embedding(guidance, TIME_DIM).to(img.dtype))
        elif guidance is not None:
            raise ValueError("guidance was given but this model has no guidance_in (guidance_embed=False)")
        mod = mod + self.vector_in(vec)
        txt = self.txt_in(txt)
        ids = torch.cat([txt_ids, img_ids], dim=1)
        pe = self.pe_embedder(ids if packed is None else ids[:, packed.order])
        for block in self.double_blocks:
            img, txt = block(img, txt, mod, pe, packed)
        x = torch.cat([txt, img], dim=1)
        if packed is not None:
            x = x[:, packed.order]
        for block in self.single_blocks:
            x = block(x, mod, pe, packed)
        if packed is not None:
            x = x[:, packed.inverse]
        return self.final_layer(x[:, txt.shape[1] :], mod, packed)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
