"""Sequence packing: samples of different shapes in one token sequence with block-diagonal attention.

NeMo/DFM's answer to padding waste. Images, short and long clips and different resolutions go into one batch-1
sequence; every sample contributes its text tokens followed by its image tokens (the MMDiT's own joint order),
attention stays within each sample (a block-diagonal mask, or varlen kernels over `cu_seqlens`), RoPE positions
are each sample's own ids, and the AdaLN modulation (from each sample's timestep and pooled vector) is gathered per
token by segment id. The MMDiT's own forward runs a pack (`model(**packed.inputs())`, its `packed=` argument: the
same blocks, which read the pack's layout and call its `attend`), so the packed outputs equal the per-sample
`model(...)` outputs up to float noise (tests/test_packing.py), and a wrapped model (DDP, a booster's) runs packs
through its own `__call__`.

The streams are kept apart as in the model: all samples' text tokens concatenated (`txt_cat`, sample order) and
all image tokens (`img_cat`); `PackedBatch.order` maps a packed position to its row of `[txt_cat; img_cat]`, so
the joint attention (and the single blocks, which run on the packed sequence) see [txt_0; img_0; txt_1; img_1; ...].
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from cinedit.generator.flow import flow_loss, interpolate, velocity_target
from cinedit.generator.math import make_ids, make_txt_ids, pack

ATTENTION_MODES = ("auto", "mask", "split", "varlen")


@dataclass
class Sample:
    """One sample's model inputs, unbatched: img (l, in_channels), img_ids (l, 3), txt (l_txt, context_in_dim),
    txt_ids (l_txt, 3), timestep (), vec (vec_in_dim,), optional cond (l, cond_channels) and guidance ()."""

    img: Tensor
    img_ids: Tensor
    txt: Tensor
    txt_ids: Tensor
    timestep: Tensor
    vec: Tensor
    cond: Tensor | None = None
    guidance: Tensor | None = None

    @classmethod
    def from_inputs(cls, inputs: dict[str, Tensor | None]) -> Sample:
        """The one sample of a batch-1 `MMDiT.forward` keyword dict (img, img_ids, txt, txt_ids, timesteps, vec and
        optional cond, guidance)."""
        if inputs["img"].shape[0] != 1:
            raise ValueError(f"a sample comes from a batch of one, got a batch of {inputs['img'].shape[0]}")
        first = {name: None if inputs.get(name) is None else inputs[name][0] for name in ("cond", "guidance")}
        return cls(
            img=inputs["img"][0],
            img_ids=inputs["img_ids"][0],
            txt=inputs["txt"][0],
            txt_ids=inputs["txt_ids"][0],
            timestep=inputs["timesteps"][0],
            vec=inputs["vec"][0],
            **first,
        )


@dataclass
class PackedBatch:
    """Samples packed into one sequence of batch 1 (see the module docstring).

    Tensors (n samples, Li / Lt their image / text token totals, L = Li + Lt):
        img: (1, Li, in_channels), txt: (1, Lt, context_in_dim), cond: (1, Li, cond_channels) or None;
        ids: (1, L, 3) positions in packed order; timesteps: (n,), vec: (n, vec_in_dim), guidance: (n,) or None;
        img_seg, txt_seg: (Li,), (Lt,) sample index of each stream token; seg: (L,) of each packed token;
        order: (L,) row of [txt_cat; img_cat] at each packed position, inverse: its inverse permutation;
        cu_seqlens: (n + 1,) int32 offsets of the samples in the packed sequence (varlen kernels).
    attention_mode: how `attend` runs (a `packed_attention` mode).
    """

    img: Tensor
    txt: Tensor
    cond: Tensor | None
    ids: Tensor
    timesteps: Tensor
    vec: Tensor
    guidance: Tensor | None
    img_seg: Tensor
    txt_seg: Tensor
    seg: Tensor
    order: Tensor
    inverse: Tensor
    cu_seqlens: Tensor
    img_lens: list[int]
    txt_lens: list[int]
    attention_mode: str = "auto"

    @classmethod
    def from_samples(cls, samples: Sequence[Sample], attention: str = "auto") -> PackedBatch:
        if not samples:
            raise ValueError("need at least one sample to pack")
        with_cond = [s.cond is not None for s in samples]
        with_guidance = [s.guidance is not None for s in samples]
        if any(with_cond) and not all(with_cond):
            # cond=None is the same as the bias alone; mixing it with given conditions would need zero conditions.
            raise ValueError("give a cond for every sample or for none")
        if any(with_guidance) and not all(with_guidance):
            raise ValueError("give a guidance for every sample or for none")
        for i, s in enumerate(samples):
            if s.img.dim() != 2 or s.txt.dim() != 2 or s.img_ids.shape != (s.img.shape[0], 3):
                raise ValueError(f"sample {i}: img (l, c), img_ids (l, 3) and txt (l_txt, d) expected, unbatched")
            if s.txt_ids.shape != (s.txt.shape[0], 3):
                raise ValueError(f"sample {i}: txt_ids must be (l_txt, 3), got {tuple(s.txt_ids.shape)}")
        dev = samples[0].img.device
        img_lens = [s.img.shape[0] for s in samples]
        txt_lens = [s.txt.shape[0] for s in samples]
        n_txt = sum(txt_lens)
        order, txt_off, img_off = [], 0, n_txt
        for lt, li in zip(txt_lens, img_lens):
            order.append(torch.arange(txt_off, txt_off + lt))
            order.append(torch.arange(img_off, img_off + li))
            txt_off, img_off = txt_off + lt, img_off + li
        order_t = torch.cat(order).to(dev)
        seq_lens = torch.tensor([lt + li for lt, li in zip(txt_lens, img_lens)])
        idx = torch.arange(len(samples))
        return cls(
            img=torch.cat([s.img for s in samples])[None],
            txt=torch.cat([s.txt for s in samples])[None],
            cond=torch.cat([s.cond for s in samples])[None] if all(with_cond) else None,
            ids=torch.cat([x for s in samples for x in (s.txt_ids, s.img_ids)])[None],
            timesteps=torch.stack([torch.as_tensor(s.timestep).reshape(()) for s in samples]).to(dev),
            vec=torch.stack([s.vec for s in samples]),
            guidance=(
                torch.stack([torch.as_tensor(s.guidance).reshape(()) for s in samples]).to(dev)
                if all(with_guidance)
                else None
            ),
            img_seg=idx.repeat_interleave(torch.tensor(img_lens)).to(dev),
            txt_seg=idx.repeat_interleave(torch.tensor(txt_lens)).to(dev),
            seg=idx.repeat_interleave(seq_lens).to(dev),
            order=order_t,
            inverse=torch.argsort(order_t),
            cu_seqlens=F.pad(seq_lens.cumsum(0), (1, 0)).to(dev, torch.int32),
            img_lens=img_lens,
            txt_lens=txt_lens,
            attention_mode=attention,
        )

    @property
    def num_samples(self) -> int:
        return len(self.img_lens)

    @property
    def seq_lens(self) -> list[int]:
        return [lt + li for lt, li in zip(self.txt_lens, self.img_lens)]

    @property
    def num_tokens(self) -> int:
        return sum(self.seq_lens)

    def attention_mask(self) -> Tensor:
        """(1, 1, L, L) bool, True where query and key belong to the same sample (SDPA's convention)."""
        return (self.seg[:, None] == self.seg[None, :])[None, None]

    def inputs(self) -> dict[str, Tensor | PackedBatch | None]:
        """`MMDiT.forward`'s keyword arguments for this pack. The tensors go as the plain arguments, so a wrapper
        (DDP, ZeRO's bf16 cast) treats them as it treats an unpacked batch's; `packed` adds the layout."""
        ids = self.ids[:, self.inverse]  # [txt_cat; img_cat]
        n_txt = self.txt.shape[1]
        return {
            "img": self.img,
            "img_ids": ids[:, n_txt:],
            "txt": self.txt,
            "txt_ids": ids[:, :n_txt],
            "timesteps": self.timesteps,
            "vec": self.vec,
            "cond": self.cond,
            "guidance": self.guidance,
            "packed": self,
        }

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """`packed_attention` in this pack's `attention_mode`: what the model's blocks call for a pack."""
        return packed_attention(q, k, v, self, self.attention_mode)

    def unpack_img(self, x: Tensor) -> list[Tensor]:
        """(1, Li, c) image-stream tokens -> per-sample (1, l_i, c)."""
        return list(x.split(self.img_lens, dim=1))


# ---------------------------------------------------------------------------------------------------- attention


@functools.cache
def _varlen_function():
    """flash_attn_varlen_func (FlashAttention-3, then -2), or None when neither package is installed."""
    for name in ("flash_attn_interface", "flash_attn"):
        try:
            return importlib.import_module(name).flash_attn_varlen_func
        except (ImportError, AttributeError):
            continue
    return None


def resolve_mode(mode: str, q: Tensor) -> str:
    """Mode "auto": varlen on CUDA in bf16/fp16 when FlashAttention is installed, else split (the dense mask computes
    the scores across samples too: 179 against 290 tokens/s on a 2-thread CPU, README "Speed")."""
    if mode not in ATTENTION_MODES:
        raise ValueError(f"attention mode must be one of {ATTENTION_MODES}, got {mode!r}")
    if mode == "auto":
        half = q.dtype in (torch.float16, torch.bfloat16)
        return "varlen" if q.is_cuda and half and _varlen_function() is not None else "split"
    if mode == "varlen" and _varlen_function() is None:
        raise ValueError("attention mode 'varlen' needs flash_attn or flash_attn_interface installed")
    return mode


def packed_attention(q: Tensor, k: Tensor, v: Tensor, packed: PackedBatch, mode: str = "mask") -> Tensor:
    """Block-diagonal attention over the packed sequence: (1, heads, L, d) -> (1, L, heads*d), as `math.attention`
    per sample.

    mode "mask": SDPA with the boolean block-diagonal mask (any device, O(L^2) scores). "split": SDPA on each
    sample's slice in turn (what varlen kernels do, as a loop; O(sum l_i^2)). "varlen": FlashAttention's
    flash_attn_varlen_func on (L, heads, d) with cu_seqlens (CUDA, bf16/fp16; optional package).
    """
    mode = resolve_mode(mode, q)
    if mode == "varlen":
        # GPU path: one kernel over all samples, no mask, no padding.
        cu, longest = packed.cu_seqlens, max(packed.seq_lens)
        q3, k3, v3 = (rearrange(x[0], "n l d -> l n d") for x in (q, k, v))
        out = _varlen_function()(q3, k3, v3, cu, cu, longest, longest)
        out = out[0] if isinstance(out, tuple) else out  # some FA3 releases also return the log-sum-exp
        return rearrange(out, "l n d -> 1 l (n d)")
    if mode == "split":
        lens = packed.seq_lens
        parts = [
            F.scaled_dot_product_attention(qs, ks, vs)
            for qs, ks, vs in zip(q.split(lens, dim=2), k.split(lens, dim=2), v.split(lens, dim=2))
        ]
        x = torch.cat(parts, dim=2)
    else:
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=packed.attention_mask())
    return rearrange(x, "b n l d -> b l (n d)")


# ---------------------------------------------------------------------------------------------------- forward


def packed_forward(model: nn.Module, packed: PackedBatch, attention: str | None = None) -> list[Tensor]:
    """Velocities of every packed sample, each (1, l_i, in_channels): one `model(**packed.inputs())` call.

    attention: a `packed_attention` mode for this call (None: the pack's `attention_mode`). `model` is an MMDiT or
    a wrapper around one (DDP, a booster's), whose `__call__` then synchronises gradients as for any batch.
    """
    if attention is not None:
        packed = dataclasses.replace(packed, attention_mode=attention)
    return packed.unpack_img(model(**packed.inputs()))


# ---------------------------------------------------------------------------------------------------- flow loss


def flow_sample(
    x0: Tensor,
    txt: Tensor,
    vec: Tensor,
    t: Tensor | float,
    noise: Tensor,
    patch_size: int,
    cond: Tensor | None = None,
) -> tuple[Sample, Tensor]:
    """A training `Sample` at flow time t for one latent x0 (c, T, H, W) and its packed velocity target (1, l, c p^2),
    as `train.flow_inputs` builds them for a batch."""
    _, lt, lh, lw = x0.shape
    p = patch_size
    t = torch.as_tensor(t, dtype=torch.float32, device=x0.device).reshape(())
    img = pack(interpolate(x0[None], noise[None], t[None]), p)[0]
    sample = Sample(
        img=img,
        img_ids=make_ids(lt, lh // p, lw // p, device=x0.device)[0],
        txt=txt,
        txt_ids=make_txt_ids(1, txt.shape[0], device=x0.device)[0],
        timestep=t,
        vec=vec,
        cond=cond,
    )
    return sample, pack(velocity_target(x0[None], noise[None]), p)


def packed_flow_losses(
    preds: Sequence[Tensor], targets: Sequence[Tensor], masks: Sequence[Tensor | None] | None = None
) -> Tensor:
    """(n,) per-sample flow losses (`flow.flow_loss`, each the mean over its own tokens): every sample weighs the
    same whatever its length, as in a batch of one shape. Sum or mean them for the step's loss."""
    masks = masks if masks is not None else [None] * len(preds)
    return torch.stack([flow_loss(p, t, m) for p, t, m in zip(preds, targets, masks)])
