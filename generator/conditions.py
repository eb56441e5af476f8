"""Visual conditions for image-to-video and video inpainting.

A condition is a binary mask over the latent video (1 = given and kept, 0 = to generate) and the reference latent
zeroed outside the mask. The model sees `pack(cat([mask, masked_ref]), p)`, so in each token the p*p mask features
come first, then the latent channels. The loss covers the region to generate; after sampling the given region is
written back.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

# The condition types and the release's T/I2V training mix (weights, not probabilities) are config values.
from cinedit.configs.generator import COND_TYPES, STAGE1_I2V_WEIGHTS
from cinedit.generator.math import pack


@dataclass
class Condition:
    """mask (B, 1, T, H, W) in {0, 1} and masked_ref (B, C, T, H, W), zero where mask is 0."""

    mask: torch.Tensor
    masked_ref: torch.Tensor

    @property
    def has_given(self) -> bool:
        """Whether anything is given at all (t2v conditions are all zero)."""
        return bool(self.mask.any())

    @property
    def num_frames(self) -> int:
        return self.mask.shape[2]

    def tokens(self, patch_size: int) -> torch.Tensor:
        """The model's `cond` input: (B, L, (1 + C) * p * p)."""
        return pack(torch.cat([self.mask.to(self.masked_ref), self.masked_ref], dim=1), patch_size)

    def loss_mask(self, patch_size: int | None = None) -> torch.Tensor:
        """1 where the model has to generate: (B, 1, T, H, W), or packed like img (B, L, C*p*p) given patch_size."""
        keep = 1 - self.mask
        if patch_size is None:
            return keep
        return pack(keep.expand_as(self.masked_ref), patch_size)

    def write_back(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C, T, H, W) with the given region replaced by the reference."""
        return torch.where(self.mask.bool(), self.masked_ref.to(x), x)


def frame_mask(cond_type: str, num_frames: int) -> torch.Tensor:
    """(T,) float mask of the latent frames an i2v condition type gives; t2v gives none.

    A single latent frame (an image) is never conditioned, as in the reference: it cannot be given and generated.
    """
    if cond_type not in COND_TYPES or cond_type == "inpaint":
        raise ValueError(f"unknown frame condition {cond_type!r}; expected one of {COND_TYPES[:-1]}")
    mask = torch.zeros(num_frames)
    if num_frames > 1:
        if cond_type in ("i2v_head", "i2v_loop"):
            mask[0] = 1
        if cond_type in ("i2v_tail", "i2v_loop"):
            mask[-1] = 1
    return mask


def build_condition(ref: torch.Tensor, mask: torch.Tensor) -> Condition:
    """Condition from a reference latent (B, C, T, H, W) and a mask broadcastable to (B, 1, T, H, W)."""
    b, _, t, h, w = ref.shape
    mask = (mask.to(ref.device) > 0).to(ref.dtype).expand(b, 1, t, h, w).contiguous()
    return Condition(mask, torch.where(mask.bool(), ref, torch.zeros_like(ref)))


def reference_latent(
    shape: tuple[int, int, int, int, int], head: torch.Tensor | None = None, tail: torch.Tensor | None = None
) -> torch.Tensor:
    """A (B, C, T, H, W) zero latent with the encoded head frames (B, C, t, H, W) first and tail frames last."""
    given = head if head is not None else tail
    if given is None:
        raise ValueError("reference_latent needs head or tail frames")
    ref = given.new_zeros(shape)
    if head is not None:
        ref[:, :, : head.shape[2]] = head
    if tail is not None:
        ref[:, :, ref.shape[2] - tail.shape[2] :] = tail
    return ref


def i2v_condition(cond_type: str, ref: torch.Tensor) -> Condition:
    """Condition of one type for the whole batch; ref (B, C, T, H, W) holds the given frames in place."""
    return build_condition(ref, frame_mask(cond_type, ref.shape[2]).to(ref.device)[None, None, :, None, None])


def inpaint_mask(
    num_frames: int,
    height: int,
    width: int,
    frames: slice | list[int] | None = None,
    box: tuple[int, int, int, int] | None = None,
) -> torch.Tensor:
    """(1, 1, T, H, W) mask that keeps everything except a hole to generate.

    Args:
        frames: latent frames the hole spans (default all); box: (h0, h1, w0, w1) of the hole in latent pixels
            (default the whole frame, i.e. whole frames are generated).
    """
    mask = torch.ones(1, 1, num_frames, height, width)
    f = slice(None) if frames is None else frames
    h0, h1, w0, w1 = box if box is not None else (0, height, 0, width)
    hole = torch.zeros_like(mask, dtype=torch.bool)
    hole[:, :, :, h0:h1, w0:w1] = True
    keep_frames = torch.ones(num_frames, dtype=torch.bool)
    keep_frames[f] = False
    hole &= ~keep_frames[None, None, :, None, None]
    return mask.masked_fill(hole, 0.0)


def random_inpaint_mask(
    num_frames: int, height: int, width: int, generator: torch.Generator | None = None, spatial_prob: float = 0.5
) -> torch.Tensor:
    """(1, 1, T, H, W) training mask: keep a random run of frames, or (with spatial_prob) a hole in a random box."""
    r = lambda n: int(torch.randint(n, (1,), generator=generator))
    if torch.rand(1, generator=generator).item() < spatial_prob:
        h0, w0 = r(height), r(width)
        box = (h0, h0 + 1 + r(height - h0), w0, w0 + 1 + r(width - w0))
        return inpaint_mask(num_frames, height, width, box=box)
    keep = torch.zeros(num_frames, dtype=torch.bool)
    if num_frames > 1:
        start = r(num_frames - 1)
        keep[start : start + 1 + r(num_frames - 1 - start)] = True  # at least one frame, never all
    return keep.float()[None, None, :, None, None].expand(1, 1, num_frames, height, width).contiguous()


@dataclass
class ConditionMix:
    """Per-sample condition types drawn with fixed weights during training (e.g. STAGE1_I2V_WEIGHTS)."""

    weights: dict[str, float] = field(default_factory=lambda: dict(STAGE1_I2V_WEIGHTS))

    def __post_init__(self):
        unknown = set(self.weights) - set(COND_TYPES)
        if unknown:
            raise ValueError(f"unknown condition types {sorted(unknown)}; expected some of {COND_TYPES}")
        if not self.weights or min(self.weights.values()) < 0 or sum(self.weights.values()) <= 0:
            raise ValueError(f"condition weights must be non-negative with a positive sum, got {self.weights}")

    def sample(self, batch: int, generator: torch.Generator | None = None) -> list[str]:
        names = list(self.weights)
        probs = torch.tensor([self.weights[n] for n in names], dtype=torch.float64)
        idx = torch.multinomial(probs, batch, replacement=True, generator=generator)
        return [names[i] for i in idx.tolist()]

    def condition(self, x0: torch.Tensor, generator: torch.Generator | None = None) -> tuple[Condition, list[str]]:
        """Training condition for a clean latent batch x0 (B, C, T, H, W): given regions are taken from x0 itself."""
        b, _, t, h, w = x0.shape
        types = self.sample(b, generator)
        masks = []
        for cond_type in types:
            if cond_type == "inpaint":
                masks.append(random_inpaint_mask(t, h, w, generator))
            else:
                masks.append(frame_mask(cond_type, t)[None, None, :, None, None].expand(1, 1, t, h, w))
        return build_condition(x0, torch.cat(masks).to(x0.device)), types
