"""`cinedit generator sample`: text-to-video, image-to-video and video inpainting from a pipeline folder.

Every prompt (`--prompt`, or `--prompts FILE` with one prompt a line, blank lines and `#` comments skipped) gives
one output in `--out DIR`, named `<index>_<slug of the prompt>.mp4` (`.png` for `--num-frames 1`), written at the
pipeline's fps. Each prompt is sampled from the noise of `--seed` alone, so a prompt's output does not depend on its
place in the file and the same seed always gives the same output.

- Size: `--resolution` and `--aspect-ratio` (width:height, e.g. 16:9 or 9:16) pick a bucket size as in training, or
  `--size H W` sets it. `--num-frames` is 1 (an image) or a multiple of the tokenizer's temporal compression (4).
- Image-to-video: `--ref IMAGE` is resized to fill the output and centre-cropped, encoded as one latent frame and
  given as the first (`i2v_head`), last (`i2v_tail`) or both (`i2v_loop`) latent frames; they are kept as given.
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

import torch
from einops import rearrange
from torch import Tensor
from tqdm.auto import tqdm

from cinedit.configs.generator import SamplerConfig
from cinedit.data.buckets import ASPECT_RATIOS, aspect_sizes
from cinedit.data.video import MediaError, is_image, read_image, read_video
from cinedit.generator.conditions import Condition, build_condition, i2v_condition, reference_latent
from cinedit.generator.pipeline import Pipeline, load_pipeline
from cinedit.generator.sampler import sample
from cinedit.runtime.dist import resolve_device
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


def read_prompts(path: str | Path) -> list[str]:
    """Prompts from a text file, one a line; blank lines and lines starting with # are skipped."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"--prompts {path}: no such file (one prompt a line)")
    prompts = [s for s in (line.strip() for line in path.read_text().splitlines()) if s and not s.startswith("#")]
    if not prompts:
        raise InputError(f"--prompts {path}: no prompts (blank lines and # comments are skipped)")
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


@torch.no_grad()
def encode(pipe: Pipeline, x: Tensor, cfg: tiling.TilingConfig | None = None) -> Tensor:
    """Pixels (b, 3, T, H, W) in [-1, 1] -> latents as the generator sees them (scaled), tiled when large."""
    tok = pipe.tokenizer
    p = next(tok.parameters())
    z = tiling.encode(tok, x.to(p.device, p.dtype), cfg)
    return z if tok.scaling_factor is None else z / tok.scaling_factor


@torch.no_grad()
def decode(pipe: Pipeline, z: Tensor, num_frames: int, cfg: tiling.TilingConfig | None = None) -> Tensor:
    """Inverse of `encode`: (b, c, t, h, w) -> float pixels (b, 3, num_frames, H, W) in [-1, 1] on the CPU."""
    tok = pipe.tokenizer
    p = next(tok.parameters())
    z = z.to(p.device, p.dtype)
    if tok.scaling_factor is not None:
        z = z * tok.scaling_factor
    return tiling.decode(tok, z, cfg, num_frames=num_frames).float().clamp(-1, 1).cpu()


def latent_shape(pipe: Pipeline, num_frames: int, height: int, width: int) -> tuple[int, int, int, int, int]:
    """(1, C, t, h, w) of one sample, after checking that the size fits the tokenizer and the generator."""
    tok = pipe.tokenizer
    check_shape(num_frames, height, width, tok.temporal_compression, spatial_multiple(pipe))
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
    z = sample_latents(pipe, prompt, shape, cfg, condition, progress)
    return decode(pipe, z, num_frames, tiling.TilingConfig(progress=progress))[0]


def _fail(msg: object) -> int:
    print(f"cinedit generator sample: error: {msg}", file=sys.stderr)
    return 2


def _check_args(args: argparse.Namespace) -> list[str]:
    """Errors found without loading anything; returns the prompts."""
    if not (args.ckpt or (args.generator and args.tokenizer)):
        raise InputError("--ckpt PIPELINE_DIR is required (or --generator, --tokenizer and --text-encoder)")
    if args.mask and not args.ref_video:
        raise InputError("--mask needs --ref-video (the video to inpaint)")
    if args.ref_video and not args.mask:
        raise InputError("--ref-video needs --mask (white = regenerate, or frames:A-B)")
    for flag, path in (("--ref", args.ref), ("--ref-video", args.ref_video)):
        if path and not Path(path).is_file():
            raise InputError(f"{flag} {path}: no such file")
    if args.overwrite and args.skip_existing:
        raise InputError("--overwrite and --skip-existing contradict each other; pick one")
    return read_prompts(args.prompts) if args.prompts else [args.prompt]


def _condition(pipe: Pipeline, args: argparse.Namespace, size: tuple[int, int]) -> Condition | None:
    if args.ref:
        return image_condition(pipe, read_image(args.ref, size)[None], args.cond_type, args.num_frames)
    if args.ref_video:
        # The training frame rate: ceil(fps / 24) unless --stride says otherwise.
        stride = args.stride or None
        video = read_video(args.ref_video, num_frames=args.num_frames, stride=stride, size=size, start=0)
        if video.shape[1] != args.num_frames:
            raise InputError(f"--ref-video {args.ref_video} is an image; {args.num_frames} frames need a video")
        return inpaint_condition(pipe, video[None], read_mask(args.mask, args.num_frames, size, stride))
    return None


def run_sample(args: argparse.Namespace) -> int:
    """The `sample` subcommand; returns the exit code."""
    try:
        prompts = _check_args(args)
        size = tuple(args.size) if args.size else output_size(args.resolution, args.aspect_ratio)
        out_dir = Path(args.out)
        outputs = [output_path(out_dir, i, p, args.num_frames) for i, p in enumerate(prompts)]
        existing = [p for p in outputs if p.exists()]
        if existing and not (args.overwrite or args.skip_existing):
            names = ", ".join(str(p) for p in existing[:3]) + (" ..." if len(existing) > 3 else "")
            raise InputError(f"{len(existing)} output(s) exist ({names}); pass --overwrite or --skip-existing")
        todo = [(p, o) for p, o in zip(prompts, outputs) if args.overwrite or not o.exists()]
        if not todo:
            print(f"all {len(outputs)} output(s) exist in {out_dir}; nothing to do")
            return 0
        device = resolve_device(args.device)
        pipe = load_pipeline(args.ckpt, args.generator, args.tokenizer, args.text_encoder, device=device)
        dtype = args.dtype if args.dtype != "auto" else ("bf16" if device.type == "cuda" else "fp32")
        pipe.generator.to(DTYPES[dtype])
        if args.size is None:  # the bucket again, at the loaded pipeline's size multiple
            size = output_size(args.resolution, args.aspect_ratio, spatial_multiple(pipe))
        latent_shape(pipe, args.num_frames, *size)
        given = dict(num_steps=args.steps, guidance=args.guidance, guidance_img=args.guidance_img, seed=args.seed)
        cfg = dataclasses.replace(pipe.sampler, **{k: v for k, v in given.items() if v is not None})
        condition = _condition(pipe, args, size)
    except (InputError, MediaError, FileNotFoundError, ValueError) as e:
        return _fail(e)
    for prompt, path in tqdm(todo, desc="prompts", unit="video", disable=args.quiet or len(todo) == 1):
        video = generate(pipe, prompt, args.num_frames, *size, cfg, condition, progress=not args.quiet)
        write_frames(path, video, pipe.fps)
        tqdm.write(f"{path}: {args.num_frames} frame(s) {size[0]}x{size[1]}, seed {cfg.seed}, {cfg.num_steps} steps")
    return 0


def add_cli(sub: argparse._SubParsersAction) -> None:
    """Register `sample`."""
    p = sub.add_parser(
        "sample",
        help="text-to-video, image-to-video and inpainting with a trained pipeline",
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
    p.add_argument("--cond-type", choices=I2V_TYPES, default="i2v_head", help="where --ref goes (default: head)")
    p.add_argument("--resolution", default="256px", help="bucket resolution (default 256px)")
    p.add_argument("--aspect-ratio", default="16:9", help="width:height, e.g. 16:9, 9:16, 1:1 (default 16:9)")
    p.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), help="explicit size instead of the bucket")
    p.add_argument("--num-frames", type=int, default=128, help="1 (an image) or a multiple of 4 (default 128)")
    p.add_argument("--steps", type=int, help="sampling steps (default: the pipeline's, 50 as released)")
    p.add_argument("--guidance", type=float, help="text guidance scale (default: the pipeline's, 7.5)")
    p.add_argument("--guidance-img", type=float, help="image guidance scale (default: the pipeline's, 3.0)")
    p.add_argument("--seed", type=int, help="noise seed (default: the pipeline's, 42)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--ckpt", metavar="PIPELINE_DIR", help="pipeline folder (the `model` folder of a training run)")
    p.add_argument("--generator", metavar="PATH", help="generator folder or release file, replacing the pipeline's")
    p.add_argument("--tokenizer", metavar="PATH", help="tokenizer folder or release file, replacing the pipeline's")
    p.add_argument("--text-encoder", metavar="PRESET", help="text-encoder preset (release, minilm, debug)")
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
