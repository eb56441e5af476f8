"""Sampling as the Open-Sora 2.0 release runs it: the one code path behind `cinedit generator sample` and the
end-to-end parity replay (`cinedit eval parity pipeline_*.json`).

One call samples a batch of prompts:

1. latent frames from the tokenizer's rule (causal HunyuanVAE: (T - 1) // 4 + 1, DC-AE: T // 4), noise drawn
   once for the whole batch from a CPU generator seeded with the seed;
2. references (image-to-video, video extension) encoded by the tokenizer, after seeding the global RNG with the
   reference seed (the HunyuanVAE samples its posterior, as the release does), placed in the condition;
3. Euler steps with text and image guidance (three passes [prompt, empty, empty without the condition]);
4. the given latent frames written back (the release writes back batch item 0 only: `write_back="first"`);
5. decoding and trimming to the asked frame count. Outputs are not clamped (writers clamp).

Text-to-image-to-video (`t2i2v`) first makes the first frame with Flux.1-dev (a guidance-distilled MMDiT, one pass
per step) and its 2D autoencoder, quantises it to 8 bits as the release's PNG, and reads it back as the reference
(`resize_crop` to the video size).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from cinedit.configs.generator import SamplerConfig
from cinedit.configs.inference import InferencePreset
from cinedit.data.video import reference_tensor
from cinedit.generator.conditions import Condition, build_condition
from cinedit.generator.sampler import sample, sample_distilled
from cinedit.tokenizer import tiling

I2V_TYPES = ("i2v_head", "i2v_tail", "i2v_loop")
V2V_TYPES = ("v2v_head_half", "v2v_tail_half")
COND_TYPES = ("t2v", *I2V_TYPES, *V2V_TYPES, "t2i2v")


class InferenceError(ValueError):
    """An input this sampler cannot use; the message says how to fix it."""


# Tokenizer side: the DC-AE goes through cinedit's tiler, tokenizers with their own tiling (the HunyuanVAE, the
# Flux AE) through their encode_latents / decode_latents.


def is_causal(tok: Any) -> bool:
    return bool(getattr(tok, "causal", False))


def latent_frames(tok: Any, num_frames: int) -> int:
    """Latent frames for `num_frames` output frames (the release's rule)."""
    if num_frames == 1:
        return 1
    tc = tok.temporal_compression
    return (num_frames - 1) // tc + 1 if is_causal(tok) else num_frames // tc


def check_frames(tok: Any, num_frames: int) -> None:
    """Raise InferenceError unless the tokenizer decodes exactly `num_frames` frames."""
    tc = tok.temporal_compression
    if tc == 1 and num_frames != 1:
        raise InferenceError(f"this tokenizer is an image autoencoder: --num-frames must be 1, got {num_frames}")
    if is_causal(tok):
        if num_frames < 1 or (num_frames - 1) % tc:
            k = max(0, (num_frames - 1) // tc)
            raise InferenceError(
                f"--num-frames {num_frames}: this causal tokenizer makes 1 + {tc}k frames "
                f"(1, {1 + tc}, {1 + 2 * tc}, ..., 129); nearest: {1 + tc * k} or {1 + tc * (k + 1)}"
            )
    elif num_frames < 1 or (num_frames > 1 and num_frames % tc):
        lo = max(tc, num_frames // tc * tc)
        raise InferenceError(
            f"--num-frames {num_frames}: the tokenizer takes 1 (an image) or a multiple of {tc} "
            f"({tc}, {2 * tc}, {3 * tc}, ...); nearest: {lo} or {lo + tc}"
        )


def _native(tok: Any) -> bool:
    return bool(getattr(tok, "native_tiling", False))


@torch.no_grad()
def to_latents(tok: Any, x: Tensor, sample_posterior: bool = False, cfg: tiling.TilingConfig | None = None) -> Tensor:
    """Pixels (b, 3, T, H, W) in [-1, 1] -> latents as the generator sees them (scaled)."""
    p = next(tok.parameters())
    x = x.to(p.device, p.dtype)
    if _native(tok):
        return tok.encode_latents(x, sample=sample_posterior)
    z = tiling.encode(tok, x, cfg)
    return z if tok.scaling_factor is None else z / tok.scaling_factor


@torch.no_grad()
def from_latents(tok: Any, z: Tensor, num_frames: int, cfg: tiling.TilingConfig | None = None) -> Tensor:
    """Latents (b, c, t, h, w) as the generator sees them -> float pixels (b, 3, num_frames, H, W) on the CPU,
    not clamped."""
    p = next(tok.parameters())
    z = z.to(p.device, p.dtype)
    if _native(tok):
        return tok.decode_latents(z, num_frames=num_frames).float().cpu()[:, :, :num_frames]
    if tok.scaling_factor is not None:
        z = z * tok.scaling_factor
    return tiling.decode(tok, z, cfg, num_frames=num_frames).float().cpu()[:, :, :num_frames]


# Sizes: the release's table (`get_image_size`): about side^2 pixels at the aspect ratio, sides multiples of the
# tokenizer compression times the patch size; the training-mode table (used for the t2i frame) moves a side by one
# multiple when that comes closer to the pixel budget.


def parse_aspect_ratio(aspect_ratio: str) -> float:
    """'16:9' (width:height) -> height / width."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*:\s*(\d+(?:\.\d+)?)\s*", aspect_ratio)
    if not m or float(m.group(1)) <= 0 or float(m.group(2)) <= 0:
        raise InferenceError(f"--aspect-ratio looks like 16:9, 9:16 or 1:1 (width:height), got {aspect_ratio!r}")
    return float(m.group(2)) / float(m.group(1))


def release_size(resolution: str, aspect_ratio: str, multiple: int, training: bool = False) -> tuple[int, int]:
    """(H, W) of the release's size table for "256px" / "768px" (any "Npx") at a "W:H" aspect ratio."""
    m = re.fullmatch(r"(\d+)px", resolution)
    if not m or int(m.group(1)) < multiple:
        raise InferenceError(f"--resolution looks like 256px or 768px (at least {multiple}px), got {resolution!r}")
    total = int(m.group(1)) ** 2
    ratio = parse_aspect_ratio(aspect_ratio)
    h = math.sqrt(total * ratio)
    w = h / ratio
    size = [max(multiple, math.floor(v / multiple + 1e-6) * multiple) for v in (h, w)]
    if training:
        options = [(size[0] + a, size[1] + b) for a in (0, multiple) for b in (0, multiple)]
        size = list(min(options, key=lambda s: abs(s[0] * s[1] - total)))
    return size[0], size[1]


# Conditions.


def reference_condition(cond_type: str, shape: Sequence[int], refs: Sequence[Tensor | None]) -> Condition:
    """The condition of `cond_type` for latents of `shape` (B, C, T, H, W) from per-sample reference latents
    (C, t, H, W) (None: that sample has none). i2v: the image's latent frame first (head), last (tail) or both
    (loop). v2v: the first (head_half) or last (tail_half) T // 2 latent frames of the given video's latents."""
    b, c, t, h, w = shape
    ref = torch.zeros(b, c, t, h, w)
    mask = torch.zeros(b, 1, t, h, w)
    if cond_type in I2V_TYPES and t < 2:
        raise InferenceError("image-to-video needs at least 2 latent frames: ask for more frames")
    for i, z in enumerate(refs):
        if z is None:
            continue
        z = z.float().cpu()
        if cond_type in ("i2v_head", "i2v_loop"):
            ref[i, :, 0], mask[i, :, 0] = z[:, 0], 1
        if cond_type in ("i2v_tail", "i2v_loop"):
            ref[i, :, -1], mask[i, :, -1] = z[:, -1], 1
        if cond_type in V2V_TYPES:
            n = t // 2
            if n < 1 or z.shape[1] < n:
                raise InferenceError(
                    f"video extension needs a given video of at least {n} latent frames and an output of at least "
                    f"2; the given video has {z.shape[1]}, the output {t}: give a longer video or ask for more frames"
                )
            if cond_type == "v2v_head_half":
                ref[i, :, :n], mask[i, :, :n] = z[:, :n], 1
            else:
                ref[i, :, t - n :], mask[i, :, t - n :] = z[:, z.shape[1] - n :], 1
    return build_condition(ref, mask)


def encode_references(
    tok: Any, refs: Sequence[Tensor | None], ref_seed: int | None, trace: dict | None = None
) -> list[Tensor | None]:
    """Per-sample pixel references (3, T, H, W) -> latents (C, t, h, w) as the generator sees them.

    The global torch RNG is seeded with `ref_seed` first (when given): a tokenizer with a sampled posterior (the
    HunyuanVAE, as the release encodes references) draws its noise from it, one draw per reference in order.
    """
    if ref_seed is not None:
        torch.manual_seed(ref_seed)
    out: list[Tensor | None] = []
    for i, r in enumerate(refs):
        if r is None:
            out.append(None)
            continue
        z = to_latents(tok, r[None], sample_posterior=True)[0].float().cpu()
        if trace is not None:
            trace[f"ref_pixels.{i}"], trace[f"ref_latent.{i}"] = r.float().cpu(), z
        out.append(z)
    return out


def png_uint8(x: Tensor) -> np.ndarray:
    """Float images (b, 3, 1, H, W) in [-1, 1] -> (b, H, W, 3) uint8 as the release saves its PNG (clamp, (x+1)/2,
    then * 255 + 0.5 truncated)."""
    y = (x.float().clamp(-1, 1)[:, :, 0] + 1) / 2
    return y.mul(255).add_(0.5).clamp_(0, 255).permute(0, 2, 3, 1).to(torch.uint8).numpy()


def image_reference(png: np.ndarray, size: tuple[int, int]) -> Tensor:
    """An (H, W, 3) uint8 image read back as the release reads a reference file (`resize_crop`): (3, 1, H, W)."""
    return reference_tensor(Image.fromarray(png), size)


# Offloading: only the model in use on the GPU.


@dataclass
class Offload:
    """Moves a model to `device` for its use and back to `idle` after (CPU), when `enabled`."""

    device: torch.device
    enabled: bool = False
    idle: torch.device = torch.device("cpu")

    @contextlib.contextmanager
    def use(self, model: Any) -> Iterator[Any]:
        if not self.enabled or model is None:
            yield model
            return
        model.to(self.device)
        try:
            yield model
        finally:
            model.to(self.idle)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()


def _device_dtype(model: torch.nn.Module, offload: Offload | None) -> tuple[torch.device, torch.dtype]:
    p = next(model.parameters())
    return (offload.device if offload is not None and offload.enabled else p.device), p.dtype


@dataclass
class Request:
    """One batch to sample. `prompts` are the texts the text encoder sees (suffixes already applied)."""

    prompts: list[str]
    num_frames: int
    size: tuple[int, int]
    sampler: SamplerConfig
    cond_type: str = "t2v"
    refs: list[Tensor | None] | None = None  # per sample pixels (3, T, H, W) in [-1, 1]
    ref_seed: int | None = None
    condition: Condition | None = None  # an explicit condition (inpainting), instead of refs
    write_back: str = "all"
    # t2i2v: the first frame's prompts (the release gives Flux the prompts without suffixes), size and guidance
    t2i_prompts: list[str] | None = None
    t2i_size: tuple[int, int] | None = None
    t2i_guidance: float = 4.0
    first_frames: Any = None  # t2i2v: filled with the first frames as saved (B, H, W, 3) uint8


def _encode_text(pipe: Any, prompts: list[str], offload: Offload | None):
    with offload.use(pipe.text_encoder) if offload is not None else contextlib.nullcontext():
        emb = pipe.text_encoder.encode(prompts)
        neg = pipe.text_encoder.empty(len(prompts))
    return emb, neg


def text_to_image(
    pipe: Any, req: Request, offload: Offload | None = None, trace: dict | None = None, progress: bool = False
) -> Tensor:
    """The release's first frame (t2i2v): Flux.1-dev from noise of the seed, one pass per step with the distilled
    guidance, then its 2D autoencoder; float images (B, 3, 1, H, W) in about [-1, 1]."""
    flux, ae = pipe.t2i_generator, pipe.t2i_tokenizer
    if flux is None or ae is None:
        raise InferenceError("t2i2v needs the Flux.1-dev model and its autoencoder (flux1-dev*.safetensors)")
    prompts = req.t2i_prompts or req.prompts
    h, w = req.t2i_size or req.size
    p = flux.config.patch_size
    s = ae.spatial_compression
    shape = (len(prompts), flux.config.latent_channels, 1, p * math.ceil(h / (s * p)), p * math.ceil(w / (s * p)))
    emb, _ = _encode_text(pipe, prompts, offload)
    with offload.use(flux) if offload is not None else contextlib.nullcontext():
        device, dtype = _device_dtype(flux, offload)
        z = sample_distilled(
            _progress(flux, req.sampler.num_steps, progress, "first frame"),
            shape,
            p,
            emb.txt,
            emb.vec,
            req.sampler.num_steps,
            req.t2i_guidance,
            req.sampler.seed,
            shift=req.sampler.shift,
            device=device,
            dtype=dtype,
            trace=trace,
        ).float()
    if trace is not None:
        trace["latent_final"] = z.cpu()
    with offload.use(ae) if offload is not None else contextlib.nullcontext():
        x = from_latents(ae, z, 1)
    if trace is not None:
        trace["output"] = x
    return x


def _progress(model: Any, total: int, enabled: bool, desc: str):
    if not enabled:
        return model
    from tqdm.auto import tqdm  # progress bars only for interactive runs

    bar = tqdm(total=total, desc=desc, unit="step", leave=False)

    def call(*args, **kwargs):
        out = model(*args, **kwargs)
        bar.update()
        if bar.n >= total:
            bar.close()
        return out

    return call


def sample_videos(
    pipe: Any,
    req: Request,
    offload: Offload | None = None,
    trace: dict | None = None,
    progress: bool = False,
    velocity: Any = None,
) -> tuple[Tensor, Tensor]:
    """(latent_final (B, C, t, h, w), video (B, 3, num_frames, H, W) float, not clamped) for one request.

    Args:
        velocity: the callable run per step instead of `pipe.generator` (context-parallel sampling wraps it).
        trace: filled with the tensors the release's pipeline fixtures record (z, timesteps, masks, masked_ref,
            trajectory, model_outputs, denoised, latent_final, output, ref_*; the first frame's under `t2i.`).
    """
    tok, gen = pipe.tokenizer, pipe.generator
    cond_type = req.cond_type
    if cond_type not in COND_TYPES and cond_type != "inpaint":
        raise InferenceError(f"--cond-type must be one of {', '.join(COND_TYPES)}, got {cond_type!r}")
    check_frames(tok, req.num_frames)
    h, w = req.size
    multiple = tok.spatial_compression * gen.config.patch_size
    if h % multiple or w % multiple:
        raise InferenceError(
            f"size {h}x{w}: height and width must be multiples of {multiple} (tokenizer compression x patch size), "
            f"e.g. {max(multiple, h // multiple * multiple)}x{max(multiple, w // multiple * multiple)}"
        )
    b = len(req.prompts)
    shape = (b, gen.config.latent_channels, latent_frames(tok, req.num_frames), h // tok.spatial_compression,
             w // tok.spatial_compression)  # fmt: skip
    refs = req.refs
    if cond_type == "t2i2v":
        t2i_trace = {} if trace is not None else None
        image = text_to_image(pipe, req, offload, t2i_trace, progress)
        png = png_uint8(image)
        req.first_frames = png
        if trace is not None:
            trace.update({f"t2i.{k}": v for k, v in t2i_trace.items()})
            for i, im in enumerate(png):
                trace[f"t2i.png_uint8.{i}"] = torch.from_numpy(im.copy())
        refs = [image_reference(im, req.size) for im in png]
        cond_type = "i2v_head"
    condition = req.condition
    if condition is None and cond_type != "t2v":
        if not refs or all(r is None for r in refs):
            raise InferenceError(f"--cond-type {cond_type} needs a reference (--ref IMAGE or VIDEO)")
        if len(refs) not in (1, b):
            raise InferenceError(f"{len(refs)} references for {b} prompts: give one, or one per prompt")
        refs = list(refs) * (b if len(refs) == 1 else 1)
        with offload.use(tok) if offload is not None else contextlib.nullcontext():
            latents = encode_references(tok, refs, req.ref_seed, trace)
        condition = reference_condition(cond_type, shape, latents)
    cfg = req.sampler
    if cond_type in V2V_TYPES:
        cfg = dataclasses.replace(cfg, temporal_osci=False)  # the release ramps the image scale for i2v only
    emb, neg = _encode_text(pipe, req.prompts, offload)
    if trace is not None and condition is not None:
        trace["masks"], trace["masked_ref"] = condition.mask.float().cpu(), condition.masked_ref.float().cpu()
    with offload.use(gen) if offload is not None else contextlib.nullcontext():
        device, dtype = _device_dtype(gen, offload)
        model = velocity if velocity is not None else gen
        z = sample(
            _progress(model, cfg.num_steps, progress, "sampling"),
            cfg,
            shape,
            gen.config.patch_size,
            emb.txt,
            emb.vec,
            neg.txt,
            neg.vec,
            condition=condition,
            device=device,
            dtype=dtype,
            write_back=req.write_back,
            trace=trace,
        ).float()
    if trace is not None:
        trace["latent_final"] = z.cpu()
    with offload.use(tok) if offload is not None else contextlib.nullcontext():
        video = from_latents(tok, z, req.num_frames, tiling.TilingConfig(progress=progress))
    if trace is not None:
        trace["output"] = video
    return z.cpu(), video


__all__ = [
    "COND_TYPES",
    "I2V_TYPES",
    "V2V_TYPES",
    "InferenceError",
    "InferencePreset",
    "Offload",
    "Request",
    "check_frames",
    "encode_references",
    "from_latents",
    "image_reference",
    "latent_frames",
    "png_uint8",
    "reference_condition",
    "release_size",
    "sample_videos",
    "text_to_image",
    "to_latents",
]
