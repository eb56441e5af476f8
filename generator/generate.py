"""`cinedit generator sample`: text-to-video, image-to-video and video inpainting from a pipeline folder.

Every prompt (`--prompt`, or `--prompts FILE` with one prompt a line, blank lines and `#` comments skipped) gives
one output in `--out DIR`, named `<index>_<slug of the prompt>.mp4` (`.png` for `--num-frames 1`), written at the
pipeline's fps. Each prompt is sampled from the noise of `--seed` alone, so a prompt's output does not depend on its
place in the file and the same seed always gives the same output.

- Size: `--resolution` and `--aspect-ratio` (width:height, e.g. 16:9 or 9:16) pick a bucket size as in training, or
  `--size H W` sets it. `--num-frames` is 1 (an image) or a multiple of the tokenizer's temporal compression (4).
- Image-to-video: `--ref IMAGE` is resized to fill the output and centre-cropped, encoded as one latent frame and
  given as the first (`i2v_head`), last (`i2v_tail`) or both (`i2v_loop`) latent frames; they are kept as given.
- Control: `--control VIDEO --control-kind KIND` (repeatable, one per kind of the adapter) with `--control-adapter DIR`
  (a control run's `model/control_adapter`; default `<ckpt>/control_adapter` when it exists): the control video's
  first `--num-frames` frames (at `--stride`), resized to fill the output and centre-cropped, are encoded by the
  pipeline's tokenizer and steer every step through the adapter's hints, `--control-scale` strong. An adapter
  trained with a reference takes `--ref IMAGE` as its reference frame too.
- Inpainting: `--ref-video VIDEO` (its first `--num-frames` frames, resized to fill and centre-cropped) and `--mask`,
  one of: an image (white = regenerate) applied to every frame; a video of per-frame masks (its first frames); or
  `frames:A-B[,C-D...]`, the (0-based, inclusive) frames to regenerate. A latent pixel is regenerated when any pixel
  it covers (4 frames x 32 x 32 pixels) is, so the regenerated region grows to latent boundaries; the rest of the
  latent video is kept and written back after sampling.

Existing outputs are an error unless `--overwrite` (replace them) or `--skip-existing` (resume a prompts file).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
import sys
from pathlib import Path
from typing import Any

import torch
from einops import rearrange
from torch import Tensor
from tqdm.auto import tqdm

from cinedit.configs.generator import CONTROL_KINDS, SamplerConfig
from cinedit.configs.inference import INFERENCE_PRESETS, InferencePreset
from cinedit.data.buckets import ASPECT_RATIOS, aspect_sizes
from cinedit.data.captions import release_prompt, with_motion_score
from cinedit.data.video import MediaError, is_image, read_image, read_reference, read_video
from cinedit.generator.conditions import Condition, build_condition, i2v_condition, reference_latent
from cinedit.generator.control import ControlAdapter, load_adapter, with_control
from cinedit.generator.inference import (
    COND_TYPES,
    V2V_TYPES,
    InferenceError,
    Offload,
    Request,
    check_frames,
    from_latents,
    release_size,
    sample_videos,
    to_latents,
)
from cinedit.generator.lora import load_loras
from cinedit.generator.math import pack
from cinedit.generator.parallel import ContextParallel
from cinedit.generator.pipeline import Pipeline, load_pipeline
from cinedit.generator.release import is_release_folder, load_release
from cinedit.generator.sampler import sample
from cinedit.runtime.dist import destroy_distributed, init_distributed, resolve_device
from cinedit.tokenizer import tiling
from cinedit.tokenizer.commands import write_frames

I2V_TYPES = ("i2v_head", "i2v_tail", "i2v_loop")
FRAMES_PREFIX = "frames:"
SLUG_LENGTH = 48
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


class InputError(ValueError):
    """An argument or input file this command cannot use; the message says how to fix it."""


def aspect_ratios() -> dict[str, float]:
    """{"W:H" name: h / w} for the bucket table's ratios and their transposes."""
    names = {}
    for w, h in ASPECT_RATIOS:
        names[f"{w:g}:{h:g}"] = h / w
        names[f"{h:g}:{w:g}"] = w / h
    return names


def output_size(resolution: str, aspect_ratio: str, multiple: int = 32) -> tuple[int, int]:
    """(H, W) of the `resolution` bucket (e.g. "256px") at `aspect_ratio` ("W:H", e.g. "16:9")."""
    m = re.fullmatch(r"(\d+)px", resolution)
    if not m or int(m.group(1)) < multiple:
        raise InputError(f"--resolution looks like 256px or 768px (at least {multiple}px), got {resolution!r}")
    known = aspect_ratios()
    ratio = known.get(aspect_ratio)
    if ratio is None:
        try:
            w, h = (float(v) for v in aspect_ratio.split(":"))
            ratio = next(r for r in known.values() if w > 0 and math.isclose(r, h / w, rel_tol=1e-3))
        except (ValueError, StopIteration):
            raise InputError(
                f"unknown aspect ratio {aspect_ratio!r} (width:height); known: {', '.join(known)}; or pass --size H W"
            ) from None
    sizes = aspect_sizes(int(m.group(1)), multiple)
    return sizes[min(sizes, key=lambda r: abs(math.log(r / ratio)))]


def check_shape(num_frames: int, height: int, width: int, temporal: int, multiple: int) -> None:
    """Raise InputError unless the tokenizer and generator can take (num_frames, height, width)."""
    if num_frames < 1 or (num_frames > 1 and num_frames % temporal):
        lo = max(temporal, num_frames // temporal * temporal)
        raise InputError(
            f"--num-frames {num_frames}: the tokenizer takes 1 (an image) or a multiple of {temporal} "
            f"({temporal}, {2 * temporal}, {3 * temporal}, ...); nearest: {lo} or {lo + temporal}"
        )
    if height < multiple or width < multiple or height % multiple or width % multiple:
        raise InputError(
            f"size {height}x{width}: height and width must be positive multiples of {multiple} "
            f"(tokenizer compression x patch size), e.g. {max(multiple, height // multiple * multiple)}x"
            f"{max(multiple, width // multiple * multiple)}"
        )


def read_prompts(path: str | Path, option: str = "--prompts") -> list[str]:
    """Prompts from a text file, one a line; blank lines and lines starting with # are skipped. `option` names the
    file in errors."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{option} {path}: no such file (one prompt a line)")
    prompts = [s for s in (line.strip() for line in path.read_text().splitlines()) if s and not s.startswith("#")]
    if not prompts:
        raise InputError(f"{option} {path}: no prompts (blank lines and # comments are skipped)")
    return prompts


def slug(prompt: str, length: int = SLUG_LENGTH) -> str:
    """A file-name-safe short form of a prompt: lowercase ASCII words joined by '-'."""
    s = re.sub(r"[^a-z0-9]+", "-", prompt.lower())[:length].strip("-")
    return s or "prompt"


def output_path(out_dir: Path, index: int, prompt: str, num_frames: int) -> Path:
    """`<out_dir>/<index>_<slug>.mp4`, or `.png` for a single frame."""
    return out_dir / f"{index:04d}_{slug(prompt)}{'.png' if num_frames == 1 else '.mp4'}"


def _device_dtype(pipe: Pipeline) -> tuple[torch.device, torch.dtype]:
    p = next(pipe.generator.parameters())
    return p.device, p.dtype


def encode(pipe: Pipeline, x: Tensor, cfg: tiling.TilingConfig | None = None) -> Tensor:
    """Pixels (b, 3, T, H, W) in [-1, 1] -> latents as the generator sees them (scaled), tiled when large."""
    return to_latents(pipe.tokenizer, x, cfg=cfg)


def decode(pipe: Pipeline, z: Tensor, num_frames: int, cfg: tiling.TilingConfig | None = None) -> Tensor:
    """Inverse of `encode`: (b, c, t, h, w) -> float pixels (b, 3, num_frames, H, W) in [-1, 1] on the CPU."""
    return from_latents(pipe.tokenizer, z, num_frames, cfg).clamp(-1, 1)


def latent_shape(pipe: Pipeline, num_frames: int, height: int, width: int) -> tuple[int, int, int, int, int]:
    """(1, C, t, h, w) of one sample, after checking that the size fits the tokenizer and the generator."""
    tok = pipe.tokenizer
    try:
        check_frames(tok, num_frames)
    except InferenceError as e:
        raise InputError(str(e)) from None
    check_shape(1, height, width, tok.temporal_compression, spatial_multiple(pipe))
    return (1, *tok.latent_shape(num_frames, height, width))


def spatial_multiple(pipe: Pipeline) -> int:
    """Output sides must be multiples of this: the tokenizer's spatial compression times the patch size."""
    return pipe.tokenizer.spatial_compression * pipe.generator.config.patch_size


def image_condition(pipe: Pipeline, image: Tensor, cond_type: str, num_frames: int) -> Condition:
    """i2v condition from an image (1, 3, 1, H, W): its latent frame given first, last or both (`cond_type`)."""
    if cond_type not in I2V_TYPES:
        raise InputError(f"--cond-type must be one of {', '.join(I2V_TYPES)}, got {cond_type!r}")
    shape = latent_shape(pipe, num_frames, *image.shape[-2:])
    if shape[2] < 2:
        raise InputError(
            f"image-to-video needs at least 2 latent frames (--num-frames {2 * pipe.tokenizer.temporal_compression} "
            f"or more), got --num-frames {num_frames}"
        )
    z = encode(pipe, image)  # (1, C, 1, h, w)
    head = z if cond_type in ("i2v_head", "i2v_loop") else None
    tail = z if cond_type in ("i2v_tail", "i2v_loop") else None
    return i2v_condition(cond_type, reference_latent(shape, head, tail))


def latent_mask(mask: Tensor, spatial: int, temporal: int) -> Tensor:
    """Pixel mask (1, 1, T, H, W) bool -> latent mask (1, 1, t, h, w): True where any covered pixel is True.

    A single-frame mask (T = 1) stays one frame (it broadcasts over the latent frames).
    """
    pt = temporal if mask.shape[2] > 1 else 1
    return rearrange(mask, "b c (t pt) (h ph) (w pw) -> b c t h w (pt ph pw)", pt=pt, ph=spatial, pw=spatial).any(-1)


def inpaint_condition(pipe: Pipeline, video: Tensor, regenerate: Tensor) -> Condition:
    """Condition keeping video (1, 3, T, H, W) except where the pixel mask (1, 1, T|1, H, W) is True (any-rule)."""
    t, h, w = video.shape[2:]
    latent_shape(pipe, t, h, w)
    if regenerate.shape[-2:] != (h, w) or regenerate.shape[2] not in (1, t):
        raise InputError(f"mask of shape {tuple(regenerate.shape[2:])} does not fit a {t}x{h}x{w} video")
    tok = pipe.tokenizer
    regen = latent_mask(regenerate.bool(), tok.spatial_compression, tok.temporal_compression)
    if not regen.any():
        raise InputError("the mask marks nothing to regenerate (white or frames:A-B mark what is regenerated)")
    z = encode(pipe, video)
    return build_condition(z, (~regen).float())


def read_mask(spec: str, num_frames: int, size: tuple[int, int], stride: int | None = None) -> Tensor:
    """Pixel mask (1, 1, T|1, H, W) bool, True = regenerate, from an image, a video (read at `stride`, default
    ceil(fps / 24)) or `frames:A-B[,C-D]`."""
    h, w = size
    if spec.startswith(FRAMES_PREFIX):
        frames = torch.zeros(num_frames, dtype=torch.bool)
        for part in spec[len(FRAMES_PREFIX) :].split(","):
            m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
            a, b = (int(m.group(1)), int(m.group(2) or m.group(1))) if m else (-1, -1)
            if not m or not a <= b < num_frames:
                raise InputError(
                    f"--mask {spec!r}: frame ranges look like frames:0-7 or frames:8-15,24-31, "
                    f"0-based and inclusive, within the {num_frames} output frames"
                )
            frames[a : b + 1] = True
        return frames[None, None, :, None, None].expand(1, 1, num_frames, h, w)
    if not Path(spec).is_file():
        raise InputError(f"--mask {spec}: no such file (an image, a video of masks, or frames:A-B)")
    if is_image(spec):
        px = read_image(spec, size)
    else:
        px = read_video(spec, num_frames=num_frames, stride=stride, size=size, start=0)
    return (px.mean(0) > 0)[None, None]  # brighter than mid-grey = regenerate


@torch.no_grad()
def sample_latents(
    pipe: Pipeline,
    prompt: str,
    shape: tuple[int, int, int, int, int],
    cfg: SamplerConfig | None = None,
    condition: Condition | None = None,
    progress: bool = False,
) -> Tensor:
    """Latents (1, C, t, h, w) for one prompt from the seeded noise of `cfg` (default: the pipeline's settings)."""
    cfg = cfg or pipe.sampler
    device, dtype = _device_dtype(pipe)
    emb, neg = pipe.text_encoder.encode([prompt]), pipe.text_encoder.empty(1)
    bar = tqdm(total=cfg.num_steps, desc="sampling", unit="step", leave=False, disable=not progress)

    def model(*args, **kwargs) -> Tensor:  # the sampler calls the model once per step
        out = pipe.generator(*args, **kwargs)
        bar.update()
        return out

    try:
        z = sample(
            model,
            cfg,
            shape,
            pipe.generator.config.patch_size,
            emb.txt,
            emb.vec,
            neg.txt,
            neg.vec,
            condition=condition,
            device=device,
            dtype=dtype,
        )
    finally:
        bar.close()
    return z.float()


def generate(
    pipe: Pipeline,
    prompt: str,
    num_frames: int,
    height: int,
    width: int,
    cfg: SamplerConfig | None = None,
    condition: Condition | None = None,
    progress: bool = False,
) -> Tensor:
    """One video (3, num_frames, height, width) in [-1, 1] on the CPU: sample latents, decode (tiled when large)."""
    shape = latent_shape(pipe, num_frames, height, width)
    if condition is not None and tuple(condition.masked_ref.shape[2:]) != shape[2:]:
        raise InputError(f"condition latent {tuple(condition.masked_ref.shape)} does not fit the output {shape}")
    req = Request([prompt], num_frames, (height, width), cfg or pipe.sampler, condition=condition)
    return sample_videos(pipe, req, progress=progress)[1][0].clamp(-1, 1)


def _fail(msg: object) -> int:
    print(f"cinedit generator sample: error: {msg}", file=sys.stderr)
    return 2


def _check_args(args: argparse.Namespace) -> list[str]:
    """Errors found without loading anything; returns the prompts."""
    if not (args.ckpt or (args.generator and args.tokenizer)):
        raise InputError(
            "--ckpt is required: a pipeline folder, or a folder with the downloaded release files "
            "(or --generator, --tokenizer and --text-encoder)"
        )
    if args.mask and not args.ref_video:
        raise InputError("--mask needs --ref-video (the video to inpaint)")
    if args.ref_video and not args.mask:
        raise InputError("--ref-video needs --mask (white = regenerate, or frames:A-B)")
    for flag, path in (("--ref", args.ref), ("--ref-video", args.ref_video)):
        if path and not Path(path).is_file():
            raise InputError(f"{flag} {path}: no such file")
    if args.cond_type is None:
        preset = INFERENCE_PRESETS.get(args.preset or "")
        if args.ref:
            args.cond_type = "i2v_head" if is_image(args.ref) else "v2v_head_half"
        else:
            args.cond_type = preset.cond_type if preset else "t2v"
    cond = args.cond_type
    if cond in ("i2v_head", "i2v_tail", "i2v_loop") and args.ref and not is_image(args.ref):
        raise InputError(f"--cond-type {cond} takes an image as --ref; for a video use v2v_head_half / v2v_tail_half")
    if cond in V2V_TYPES and (not args.ref or is_image(args.ref)):
        raise InputError(f"--cond-type {cond} extends a video: pass it as --ref VIDEO")
    if cond in ("t2v", "t2i2v") and args.ref:
        raise InputError(f"--ref given with --cond-type {cond}: pick i2v_head / i2v_tail / i2v_loop or v2v_*_half")
    if args.overwrite and args.skip_existing:
        raise InputError("--overwrite and --skip-existing contradict each other; pick one")
    if args.cp < 1:
        raise InputError(f"--cp must be at least 1, got {args.cp}")
    controls, kinds = args.control or [], args.control_kind or []
    if len(controls) != len(kinds):
        raise InputError(
            f"{len(controls)} --control video(s) and {len(kinds)} --control-kind(s): give each control video its kind"
        )
    if args.control_adapter and not controls:
        raise InputError("--control-adapter needs --control VIDEO --control-kind KIND")
    for path in controls:
        if not Path(path).is_file():
            raise InputError(f"--control {path}: no such file")
    if controls and args.cp > 1:
        raise InputError("--control does not shard the control tokens over processes: leave out --cp")
    return read_prompts(args.prompts) if args.prompts else [args.prompt]


def _preset(args: argparse.Namespace) -> InferencePreset | None:
    """The release preset: --preset, or for a release folder the one its files serve (256px / high_compression)."""
    if args.preset:
        return INFERENCE_PRESETS[args.preset]
    if args.ckpt and is_release_folder(args.ckpt):
        root = Path(args.ckpt)
        hunyuan = (root / "Open_Sora_v2.safetensors").exists() or (root / "hunyuan_vae.safetensors").exists()
        return INFERENCE_PRESETS["256px" if hunyuan else "high_compression"]
    return None


def _motion_score(args: argparse.Namespace, preset: InferencePreset | None) -> str | None:
    value = args.motion_score
    if value is None:
        return None if preset is None or preset.motion_score is None else str(preset.motion_score)
    if value.lower() in ("none", "off"):
        return None
    try:
        float(value)
    except ValueError:
        raise InputError(f"--motion-score takes a number (the release samples with 4) or none, got {value!r}") from None
    return value


def prompt_text(prompt: str, preset: InferencePreset | None, motion_score: str | None) -> str:
    """What the text encoder sees: with a release preset the release's "<prompt>. 24 FPS." and motion score, else
    the prompt with the motion score, if one is asked for."""
    if preset is not None:
        return release_prompt(prompt, preset.fps, motion_score)
    return prompt if motion_score is None else with_motion_score(prompt, motion_score)


def _load(args: argparse.Namespace, preset: InferencePreset | None, device: torch.device) -> Pipeline:
    idle = "cpu" if args.offload else device
    if args.ckpt and is_release_folder(args.ckpt):
        if preset is None:  # unreachable: _preset picks one for a release folder
            raise InputError("a release folder needs --preset")
        return load_release(args.ckpt, preset, device=device, t2i=args.cond_type == "t2i2v", idle_device=idle)
    pipe = load_pipeline(args.ckpt, args.generator, args.tokenizer, args.text_encoder, device=idle)
    if args.cond_type == "t2i2v":
        raise InputError("--cond-type t2i2v needs the release's Flux.1-dev files: pass --ckpt RELEASE_DIR")
    return pipe


def _sampler(args: argparse.Namespace, pipe: Pipeline) -> SamplerConfig:
    given = dict(num_steps=args.steps, guidance=args.guidance, guidance_img=args.guidance_img, seed=args.seed)
    return dataclasses.replace(pipe.sampler, **{k: v for k, v in given.items() if v is not None})


def _size(args: argparse.Namespace, pipe: Pipeline, preset: InferencePreset | None) -> tuple[int, int]:
    multiple = spatial_multiple(pipe)
    if args.size:
        return tuple(args.size)
    resolution = args.resolution or (preset.resolution if preset else "256px")
    aspect = args.aspect_ratio or (preset.aspect_ratio if preset else "16:9")
    if preset is not None:
        return release_size(resolution, aspect, multiple)
    return output_size(resolution, aspect, multiple)


def _request(args, pipe: Pipeline, preset, prompt: str, size, num_frames: int, cfg: SamplerConfig) -> Request:
    cond = args.cond_type
    req = Request([prompt_text(prompt, preset, _motion_score(args, preset))], num_frames, size, cfg, cond_type=cond)
    req.ref_seed = args.ref_seed if args.ref_seed is not None else cfg.seed
    if args.ref_video:
        stride = args.stride or None  # the training frame rate: ceil(fps / 24) unless --stride says otherwise
        video = read_video(args.ref_video, num_frames=num_frames, stride=stride, size=size, start=0)
        if video.shape[1] != num_frames:
            raise InputError(f"--ref-video {args.ref_video} is an image; {num_frames} frames need a video")
        req.condition = inpaint_condition(pipe, video[None], read_mask(args.mask, num_frames, size, stride))
        req.cond_type = "inpaint"
    elif args.ref and cond in V2V_TYPES:
        video = read_video(args.ref, num_frames=num_frames, stride=args.stride or None, size=size, start=0)
        req.refs = [video]
    elif args.ref:
        req.refs = [read_reference(args.ref, size)]
    if cond == "t2i2v":
        flux, ae = pipe.t2i_generator, pipe.t2i_tokenizer
        aspect = args.aspect_ratio or (preset.aspect_ratio if preset else "16:9")
        req.t2i_prompts = [prompt]  # the release gives Flux the prompt without the suffixes
        resolution = args.t2i_resolution or (preset.t2i_resolution if preset else "768px")
        multiple = ae.spatial_compression * flux.config.patch_size
        req.t2i_size = release_size(resolution, aspect, multiple, training=True)
        req.t2i_guidance = preset.t2i_guidance if preset else 4.0
    return req


def control_adapter_path(args: argparse.Namespace) -> Path:
    """--control-adapter, else `<ckpt>/control_adapter` when that folder exists."""
    if args.control_adapter:
        return Path(args.control_adapter)
    default = Path(args.ckpt) / "control_adapter" if args.ckpt else None
    if default is None or not default.is_dir():
        raise InputError(
            "--control needs the control adapter: --control-adapter DIR (a control run's <out_dir>/model/"
            "control_adapter)" + (f"; {default} does not exist" if default is not None else "")
        )
    return default


def control_tokens(
    pipe: Pipeline, adapter: ControlAdapter, videos: dict[str, str], num_frames: int, size, stride: int | None = None
) -> Tensor:
    """Packed control tokens (1, l_img, channels * kinds) for the output shape: each kind's video (`videos`: kind ->
    file) read at the output frames and size, encoded by the pipeline's tokenizer and packed like `img`, in the
    adapter's kind order."""
    want = adapter.config.kinds
    if sorted(videos) != sorted(want):
        raise InputError(f"the control adapter takes the kinds {want}; --control-kind gave {sorted(videos)}")
    tokens = []
    for kind in want:
        path = videos[kind]
        if is_image(path):
            video = read_image(path, size)
        else:
            video = read_video(path, num_frames=num_frames, stride=stride, size=size, start=0)
        if video.shape[1] != num_frames:
            raise InputError(f"--control {path}: {video.shape[1]} frame(s), the output has {num_frames}")
        tokens.append(pack(encode(pipe, video[None]).float(), pipe.generator.config.patch_size))
    return torch.cat(tokens, dim=-1)


def controlled_velocity(pipe: Pipeline, adapter: ControlAdapter, control: Tensor, reference, scale: float):
    """The generator's forward with the adapter's hints (`with_control`), for `sample_videos(velocity=)`."""
    model = pipe.generator

    def velocity(*args, **kwargs):
        p = next(model.parameters())
        adapter.to(p.device)  # follows the generator (--offload moves it for sampling)
        ref = None if reference is None else reference.to(p.device, p.dtype)
        with with_control(model, adapter, control.to(p.device, p.dtype), ref, scale):
            return model(*args, **kwargs)

    return velocity


def _control(args: argparse.Namespace, pipe: Pipeline, num_frames: int, size) -> Any:
    """The velocity callable of `--control` (None without it); loads the adapter onto the generator."""
    if not args.control:
        return None
    adapter = load_adapter(control_adapter_path(args), pipe.generator)
    control = control_tokens(pipe, adapter, dict(zip(args.control_kind, args.control)), num_frames, size,
                             args.stride or None)  # fmt: skip
    reference = None
    if adapter.config.reference:
        if not args.ref or not is_image(args.ref):
            raise InputError("this control adapter was trained with a reference frame: pass it as --ref IMAGE")
        reference = pack(encode(pipe, read_reference(args.ref, size)[None]).float(), pipe.generator.config.patch_size)
    return controlled_velocity(pipe, adapter, control, reference, args.control_scale)


def run_sample(args: argparse.Namespace) -> int:
    """The `sample` subcommand; returns the exit code."""
    try:
        prompts = _check_args(args)
        preset = _preset(args)
        num_frames = args.num_frames or (preset.num_frames if preset else 128)
        out_dir = Path(args.out)
        outputs = [output_path(out_dir, i, p, num_frames) for i, p in enumerate(prompts)]
        existing = [p for p in outputs if p.exists()]
        if existing and not (args.overwrite or args.skip_existing):
            names = ", ".join(str(p) for p in existing[:3]) + (" ..." if len(existing) > 3 else "")
            raise InputError(f"{len(existing)} output(s) exist ({names}); pass --overwrite or --skip-existing")
        todo = [(p, o) for p, o in zip(prompts, outputs) if args.overwrite or not o.exists()]
        if not todo:
            print(f"all {len(outputs)} output(s) exist in {out_dir}; nothing to do")
            return 0
        if args.cp > 1:
            return launch_cp(args)
        device = resolve_device(args.device)
        pipe = _load(args, preset, device)
        load_loras(pipe.generator, args.lora)  # before the dtype cast below, which then covers the adapters too
        dtype = args.dtype if args.dtype != "auto" else ("bf16" if device.type == "cuda" else "fp32")
        for model in (pipe.generator, pipe.t2i_generator):
            if model is not None:
                model.to(DTYPES[dtype])
        size = _size(args, pipe, preset)
        latent_shape(pipe, num_frames, *size)
        cfg = _sampler(args, pipe)
        offload = Offload(device, enabled=args.offload)
        requests = [_request(args, pipe, preset, p, size, num_frames, cfg) for p, _ in todo]
        control = _control(args, pipe, num_frames, size)
    except (InputError, InferenceError, MediaError, FileNotFoundError, ValueError) as e:
        return _fail(e)
    cp = control or context_parallel_velocity(pipe.generator)
    for (_, path), req in tqdm(list(zip(todo, requests)), desc="prompts", unit="video",
                                    disable=args.quiet or len(todo) == 1):  # fmt: skip
        try:
            _, video = sample_videos(pipe, req, offload, progress=not args.quiet, velocity=cp)
        except (InputError, InferenceError, MediaError, ValueError) as e:
            return _fail(e)
        if not is_main_rank():
            continue
        write_frames(path, video[0].clamp(-1, 1), pipe.fps)
        if req.first_frames is not None:
            write_frames(path.with_suffix(".t2i.png"), torch.from_numpy(req.first_frames[0]).permute(2, 0, 1)[:, None]
                         .float().div(127.5).sub(1), pipe.fps)  # fmt: skip
        tqdm.write(f"{path}: {num_frames} frame(s) {size[0]}x{size[1]}, seed {cfg.seed}, {cfg.num_steps} steps")
    return 0


# Context-parallel sampling: `torchrun --nproc-per-node N -m cinedit.generator.generate ARGS` (what `--cp N` runs)
# splits every step's joint sequence over the N processes; rank 0 writes the outputs.


def is_main_rank() -> bool:
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def context_parallel_velocity(model: Any) -> Any:
    """The model's forward with its sequence sharded over the default process group, or None for one process."""
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() < 2:
        return None
    world = torch.distributed.get_world_size()
    cp = ContextParallel(mode="ulysses" if model.config.num_heads % world == 0 else "ring")

    def velocity(*args, **kwargs):
        return cp.forward(model, *args, **kwargs)

    return velocity


def _argv_without_cp(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--cp":
            skip = True
        elif not a.startswith("--cp="):
            out.append(a)
    return out


def launch_cp(args: argparse.Namespace) -> int:
    """Re-run this command under torchrun with `args.cp` processes (the standalone rendezvous, one node)."""
    import subprocess  # only to launch the processes

    argv = _argv_without_cp(list(args.argv))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.cp}",
           "-m", "cinedit.generator.generate", *argv]  # fmt: skip
    print("launching:", " ".join(cmd), file=sys.stderr)
    return subprocess.call(cmd)


def main(argv: list[str] | None = None) -> int:
    """The torchrun entry: `python -m cinedit.generator.generate [sample options]` in every process."""
    parser = argparse.ArgumentParser(prog="cinedit.generator.generate")
    sub = parser.add_subparsers()
    add_cli(sub)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(["sample", *argv])
    args.argv = argv
    if args.cp > 1:
        return _fail("--cp is for the `cinedit generator sample` launcher; under torchrun pass --nproc-per-node")
    info = init_distributed("cpu" if args.device == "cpu" else "auto")
    if info.world_size > 1 and args.device == "auto":
        args.device = str(info.device)
    try:
        return run_sample(args)
    finally:
        destroy_distributed()


def add_cli(sub: argparse._SubParsersAction) -> None:
    """Register `sample`."""
    p = sub.add_parser(
        "sample",
        help="text-to-video, image-to-video, video extension and inpainting with a trained pipeline or the release",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    text = p.add_mutually_exclusive_group(required=True)
    text.add_argument("--prompt", help="one prompt")
    text.add_argument("--prompts", metavar="FILE", help="a text file, one prompt a line (# comments skipped)")
    ref = p.add_mutually_exclusive_group()
    ref.add_argument("--ref", metavar="IMAGE", help="image-to-video: the given frame")
    ref.add_argument("--ref-video", metavar="VIDEO", help="inpainting: the video to edit (with --mask)")
    p.add_argument("--mask", help="inpainting: mask image or video (white = regenerate), or frames:A-B")
    p.add_argument(
        "--stride",
        type=int,
        default=0,
        help="frame stride for --ref-video and a mask video (default 0: ceil(fps / 24), as training reads clips)",
    )
    p.add_argument(
        "--preset",
        choices=sorted(INFERENCE_PRESETS),
        help="the release's inference config (sizes, 129/128 frames, 50 steps, guidance, motion score, fps); "
        "default for a release folder: 256px (high_compression for the DC-AE files)",
    )
    p.add_argument(
        "--cond-type",
        choices=COND_TYPES,
        default=None,
        help="t2v; i2v_head / i2v_tail / i2v_loop (--ref IMAGE); v2v_head_half / v2v_tail_half (--ref VIDEO: keep "
        "its first / last half, generate the rest); t2i2v (the first frame by Flux.1-dev, then i2v_head). "
        "Default: i2v_head with --ref, the preset's otherwise (t2v)",
    )
    p.add_argument(
        "--motion-score",
        metavar="N",
        help="append the release's caption suffix ' N motion score.' (release presets: 4; 'none' to leave it out)",
    )
    p.add_argument(
        "--t2i-resolution",
        help="t2i2v: the resolution Flux makes the first frame at (default: the preset's, 768px as released); it is "
        "then resized and cropped to the video size",
    )
    p.add_argument("--ref-seed", type=int, help="seed of the reference encoding's posterior sample (default: --seed)")
    p.add_argument(
        "--offload",
        action="store_true",
        help="keep only the model in use on the GPU (text encoders, Flux, tokenizer on the CPU when idle)",
    )
    p.add_argument("--cp", type=int, default=1, metavar="N", help="context-parallel sampling over N processes")
    p.add_argument("--resolution", help="resolution (default: the preset's, else 256px)")
    p.add_argument("--aspect-ratio", help="width:height, e.g. 16:9, 9:16, 1:1 (default: the preset's, else 16:9)")
    p.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), help="explicit size instead of the size table")
    p.add_argument(
        "--num-frames",
        type=int,
        help="frames: 1 (an image), a multiple of 4 (DC-AE) or 1 + 4k (HunyuanVAE); default: the preset's (129 / "
        "128), else 128",
    )
    p.add_argument("--steps", type=int, help="sampling steps (default: the pipeline's, 50 as released)")
    p.add_argument("--guidance", type=float, help="text guidance scale (default: the pipeline's, 7.5)")
    p.add_argument("--guidance-img", type=float, help="image guidance scale (default: the pipeline's, 3.0)")
    p.add_argument("--seed", type=int, help="noise seed (default: the pipeline's, 42)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument(
        "--ckpt",
        metavar="DIR",
        help="pipeline folder (the `model` folder of a training run) or a folder with the downloaded release files",
    )
    p.add_argument("--generator", metavar="PATH", help="generator folder or release file, replacing the pipeline's")
    p.add_argument("--tokenizer", metavar="PATH", help="tokenizer folder or release file, replacing the pipeline's")
    p.add_argument("--text-encoder", metavar="PRESET", help="text-encoder preset (release, minilm, debug)")
    p.add_argument(
        "--lora",
        action="append",
        metavar="FILE[:SCALE]",
        help="a LoRA adapter on the generator (`lora.safetensors` of a LoRA run; peft or diffusers keys) at SCALE "
        "(default 1.0); repeatable, the adapters add up",
    )
    p.add_argument(
        "--control",
        action="append",
        metavar="VIDEO",
        help="a control video (`cinedit data control`) steering the output through --control-adapter; repeatable, "
        "one per --control-kind",
    )
    p.add_argument("--control-kind", action="append", choices=CONTROL_KINDS, help="the kind of each --control video")
    p.add_argument(
        "--control-adapter",
        metavar="DIR",
        help="a control run's adapter folder (<out_dir>/model/control_adapter); default <ckpt>/control_adapter",
    )
    p.add_argument("--control-scale", type=float, default=1.0, help="hint strength (default 1.0; 0: no control)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--dtype", choices=["auto", *DTYPES], default="auto", help="generator dtype (auto: bf16 on GPU)")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.add_argument("--skip-existing", action="store_true", help="keep existing outputs, sample the others")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run_sample, command="sample")


__all__ = [
    "InputError",
    "add_cli",
    "aspect_ratios",
    "check_shape",
    "decode",
    "encode",
    "generate",
    "image_condition",
    "inpaint_condition",
    "latent_mask",
    "latent_shape",
    "output_path",
    "output_size",
    "read_mask",
    "read_prompts",
    "run_sample",
    "sample_latents",
    "slug",
]


if __name__ == "__main__":
    sys.exit(main())
