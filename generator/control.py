"""A VACE-style control adapter for the MMDiT, attached from outside the model.

Control videos (edges, flow, depth, ...; `cinedit data control`) are encoded by the generator's own tokenizer and
packed like `img`; several kinds are concatenated along the channel axis in `ControlAdapterConfig.kinds` order. The
adapter embeds them (`control_in`, shaped like `img_in`), adds the backbone's image stream as it enters the first
double block (as VACE adds the video's embedding to its context), and runs N context blocks of the
`DoubleStreamBlock` structure with the backbone's `txt`, `mod` and `pe`. Context block i yields a hint through a
zero-initialised Linear; the hint is added to the backbone's image stream after double block `hint_blocks[i]`.
With every output projection zero, the controlled model starts as the unchanged backbone, bit for bit.

`with_control(model, adapter, control)` attaches the adapter with forward hooks for the duration of a `with` block,
so the sampler and the trainer call `model(img, img_ids, txt, txt_ids, timesteps, vec, cond=...)` unchanged;
`ControlledMMDiT` is the same as a module with a `control=` keyword. Hooks sit on the entries of
`model.double_blocks` as they are then, outside any checkpointed forward (`parallel.checkpoint_block` wraps a
block's own `forward`), so a recompute in backward never sees a hook. Under context parallelism the control tokens
must be sharded like `img` (not done here).
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from cinedit.generator.model import DoubleStreamBlock, MMDiT, MMDiTConfig
from cinedit.runtime.modelio import read_checkpoint, save_model_folder

CONTROL_KINDS = ("edges", "flow", "grey", "scribble", "mask", "depth", "pose")


def spread(n: int, depth: int) -> list[int]:
    """`n` backbone double blocks spread evenly over `depth`, starting at 0 (VACE's every-k-th layer)."""
    if not 0 < n <= depth:
        raise ValueError(f"cannot spread {n} hints over {depth} double blocks")
    return [i * depth // n for i in range(n)]


@dataclass
class ControlAdapterConfig:
    """Control adapter architecture; the backbone's `MMDiTConfig` supplies the widths.

    `hint_blocks` are the backbone double blocks whose image output gets context block i's hint (default: 0..N-1;
    `spread(N, depth)` spaces them out). `control_channels` is the packed width of one control kind (0: the
    backbone's `in_channels`, i.e. the same tokenizer and patch size as `img`). `reference` adds a reference-image
    latent: one packed latent frame (b, h*w, control_channels), embedded by `ref_in` and added to every latent
    frame of the control embedding.
    """

    num_blocks: int = 2
    hint_blocks: list[int] | None = None
    control_channels: int = 0
    kinds: list[str] = field(default_factory=lambda: ["edges"])
    reference: bool = False
    init_from_backbone: bool = True  # copy img_in and the first N double blocks' weights (VACE does the same)

    def __post_init__(self) -> None:
        self.kinds = list(self.kinds)
        self.hint_blocks = None if self.hint_blocks is None else list(self.hint_blocks)

    def validate(self, backbone: MMDiTConfig) -> None:
        """Raise ValueError when this adapter cannot attach to `backbone`."""
        if not 0 < self.num_blocks <= backbone.depth:
            raise ValueError(
                f"num_blocks must be in [1, {backbone.depth}] (the backbone's double blocks), got {self.num_blocks}"
            )
        hints = self.hints(backbone)
        if len(hints) != self.num_blocks:
            raise ValueError(f"hint_blocks {hints} must name one backbone block per context block ({self.num_blocks})")
        if sorted(set(hints)) != hints or hints[0] < 0 or hints[-1] >= backbone.depth:
            raise ValueError(f"hint_blocks {hints} must be ascending, distinct and in [0, {backbone.depth})")
        if not self.kinds or len(set(self.kinds)) != len(self.kinds):
            raise ValueError(f"kinds must name each control kind once, got {self.kinds}")
        unknown = [k for k in self.kinds if k not in CONTROL_KINDS]
        if unknown:
            raise ValueError(f"unknown control kinds {unknown}; expected some of {CONTROL_KINDS}")
        if self.control_channels < 0:
            raise ValueError(
                f"control_channels must be >= 0 (0: the backbone's in_channels), got {self.control_channels}"
            )

    def hints(self, backbone: MMDiTConfig) -> list[int]:
        return list(range(self.num_blocks)) if self.hint_blocks is None else list(self.hint_blocks)

    def channels(self, backbone: MMDiTConfig) -> int:
        """Packed width of one control kind."""
        return self.control_channels or backbone.in_channels


class ControlAdapter(nn.Module):
    """Control tokens -> N context blocks -> zero-initialised hints for chosen backbone double blocks."""

    def __init__(self, config: ControlAdapterConfig, backbone: MMDiTConfig):
        super().__init__()
        config.validate(backbone)
        self.config, self.backbone_config = config, backbone
        self.hint_blocks = config.hints(backbone)
        dim, width = backbone.hidden_size, config.channels(backbone)
        self.control_in = nn.Linear(width * len(config.kinds), dim)
        self.ref_in = nn.Linear(width, dim) if config.reference else None
        self.blocks = nn.ModuleList(DoubleStreamBlock(backbone) for _ in range(config.num_blocks))
        self.hint_out = nn.ModuleList(nn.Linear(dim, dim) for _ in range(config.num_blocks))
        for proj in self.hint_out:
            nn.init.zeros_(proj.weight)
            nn.init.zeros_(proj.bias)

    @classmethod
    def from_backbone(cls, model: MMDiT, config: ControlAdapterConfig) -> ControlAdapter:
        """An adapter for `model`; with `init_from_backbone` its context blocks start as copies of the first N double
        blocks and `control_in` as `img_in` (averaged over the kinds, so the embedding keeps its scale)."""
        p = next(model.parameters())
        adapter = cls(config, model.config).to(p.device, p.dtype)
        if config.init_from_backbone:
            adapter.init_from(model)
        return adapter

    @torch.no_grad()
    def init_from(self, model: MMDiT) -> None:
        """Copy `img_in` into `control_in` (when the widths match) and the first N double blocks into the context
        blocks; the zero hint projections are left as they are."""
        k = len(self.config.kinds)
        if self.control_in.in_features == k * model.img_in.in_features:
            self.control_in.weight.copy_(model.img_in.weight.repeat(1, k) / k)
            self.control_in.bias.copy_(model.img_in.bias)
        for block, source in zip(self.blocks, model.double_blocks):
            block.load_state_dict(copy.deepcopy(source.state_dict()))

    def embed(self, control: Tensor, img: Tensor, reference: Tensor | None = None) -> Tensor:
        """The context stream's input: (b, l_img, hidden)."""
        width, kinds = self.control_in.in_features, self.config.kinds
        if control.shape[-1] != width:
            raise ValueError(
                f"control tokens have width {control.shape[-1]}, the adapter takes {width} "
                f"({len(kinds)} kinds {kinds} x {width // len(kinds)} channels, concatenated in that order)"
            )
        c = self.control_in(control.to(img.dtype)) + img
        if self.ref_in is None:
            if reference is not None:
                raise ValueError("a reference latent was given but this adapter has reference=False")
            return c
        if reference is None:
            raise ValueError("this adapter has reference=True: pass the reference latent tokens (b, h*w, channels)")
        frames = c.shape[1] // reference.shape[1]
        if frames * reference.shape[1] != c.shape[1]:
            raise ValueError(f"reference tokens ({reference.shape[1]}) must be one latent frame of {c.shape[1]} tokens")
        return c + self.ref_in(reference.to(img.dtype)).repeat(1, frames, 1)

    def forward(
        self, control: Tensor, img: Tensor, txt: Tensor, mod: Tensor, pe: Tensor, reference: Tensor | None = None
    ) -> list[Tensor]:
        """Hints (b, l_img, hidden), one per context block, from control tokens (b, l_img, width * kinds) and the
        backbone's inputs to its first double block."""
        c = self.embed(control, img, reference)
        hints = []
        for block, proj in zip(self.blocks, self.hint_out):
            c, txt = block(c, txt, mod, pe)
            hints.append(proj(c))
        return hints


def _batched(x: Tensor | None, batch: int) -> Tensor | None:
    """Repeat a control batch to the model's batch (the sampler stacks its guidance passes along the batch)."""
    if x is None or x.shape[0] == batch:
        return x
    if batch % x.shape[0]:
        raise ValueError(f"control batch {x.shape[0]} does not divide the model's batch {batch}")
    return x.repeat(batch // x.shape[0], *([1] * (x.ndim - 1)))


@contextlib.contextmanager
def with_control(
    model: MMDiT, adapter: ControlAdapter, control: Tensor, reference: Tensor | None = None, scale: float = 1.0
) -> Iterator[MMDiT]:
    """Make `model(...)` add the adapter's hints inside the block; the hooks are gone after it.

    Args:
        control: (b, l_img, width * kinds) packed control latents; a batch that divides the model's (e.g. 1, or
            the sampler's guidance passes stacked) is repeated.
        scale: multiplies every hint (VACE's context scale: 0 is the backbone, 1 the trained strength).
    """
    if len(model.double_blocks) != adapter.backbone_config.depth or (
        model.config.hidden_size != adapter.backbone_config.hidden_size
    ):
        raise ValueError("this adapter was built for another backbone (depth or hidden size differ)")
    hints: dict[int, Tensor] = {}

    def make_hints(block, args, kwargs):
        img, txt, mod, pe = _block_inputs(args, kwargs)
        out = adapter(_batched(control, img.shape[0]), img, txt, mod, pe, _batched(reference, img.shape[0]))
        hints.clear()
        hints.update(zip(adapter.hint_blocks, out))

    def add_hint(index: int):
        def hook(block, args, output):
            img, txt = output
            hint = hints.pop(index)
            return img + (hint if scale == 1.0 else scale * hint), txt

        return hook

    handles = [model.double_blocks[0].register_forward_pre_hook(make_hints, with_kwargs=True)]
    handles += [model.double_blocks[i].register_forward_hook(add_hint(i)) for i in adapter.hint_blocks]
    try:
        yield model
    finally:
        for h in handles:
            h.remove()


def _block_inputs(args: tuple, kwargs: dict) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    names = ("img", "txt", "mod", "pe")
    values = list(args) + [kwargs[n] for n in names[len(args) :]]
    return tuple(values[:4])


class ControlledMMDiT(nn.Module):
    """A frozen-or-not backbone and a control adapter as one module: `forward(..., control=, reference=)`; without
    `control` it is the backbone."""

    def __init__(self, model: MMDiT, adapter: ControlAdapter):
        super().__init__()
        self.model, self.adapter = model, adapter
        self.config = model.config

    def forward(
        self,
        *args,
        control: Tensor | None = None,
        reference: Tensor | None = None,
        control_scale: float = 1.0,
        **kwargs,
    ) -> Tensor:
        if control is None:
            return self.model(*args, **kwargs)
        with with_control(self.model, self.adapter, control, reference, control_scale):
            return self.model(*args, **kwargs)


def unused_parameters(adapter: ControlAdapter) -> list[str]:
    """Names of the adapter parameters no output depends on, which never get a gradient: the last context block's
    text-stream output layers (`txt_attn.proj`, `txt_mlp`), since its text stream feeds nothing. A trainer sets
    `requires_grad=False` on them so the optimizer and the checkpoints only see parameters that train."""
    last = f"blocks.{len(adapter.blocks) - 1}."
    return [n for n, _ in adapter.named_parameters() if n.startswith((last + "txt_attn.proj.", last + "txt_mlp."))]


def freeze_backbone(model: MMDiT) -> MMDiT:
    """Stop gradients to every backbone parameter (the adapter's are then the only trainable ones)."""
    model.requires_grad_(False)
    return model


def save_adapter(adapter: ControlAdapter, out_dir: str | os.PathLike) -> Path:
    """Write `config.json` (the ControlAdapterConfig) + `model.safetensors` (adapter weights only), atomically."""
    return save_model_folder(adapter, adapter.config, out_dir)


def load_adapter(path: str | os.PathLike, model: MMDiT) -> ControlAdapter:
    """An adapter saved by `save_adapter`, for the backbone `model` (on its device and dtype)."""
    config, state = read_checkpoint(path, ControlAdapterConfig)
    if config is None:
        raise ValueError(f"{path}: a control adapter is a folder with config.json and model.safetensors")
    p = next(model.parameters())
    adapter = ControlAdapter(config, model.config)
    try:
        adapter.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(
            f"{path}: the adapter does not fit this backbone (hidden {model.config.hidden_size}, "
            f"in_channels {model.config.in_channels}): {' '.join(str(e).split()[7:])[:300]}"
        ) from None
    return adapter.to(p.device, p.dtype)
