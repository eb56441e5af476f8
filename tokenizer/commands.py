"""`cinedit tokenizer reconstruct | encode | decode`: run a tokenizer on your own videos and images.

The tokenizer (`--ckpt`) is a model folder or a release file: the Video DC-AE, the HunyuanVideo VAE
(`hunyuan_vae.safetensors`) or the Flux AE (`flux1-dev-ae.safetensors`, frame by frame). Inputs are a video or
image file, a folder (searched recursively) or a meta file (.csv / .parquet). With one input file `--out` is the
output file; otherwise it is a folder that mirrors the input names. Frames are read at full frame rate
(`--stride` to subsample) and trimmed to what the tokenizer takes (`--max-frames` caps them): a multiple of 4
for the DC-AE, 1 + 4k for the causal HunyuanVideo VAE, any count for the Flux AE. Sizes must be multiples of
its spatial factor (32 for the DC-AE, 8 for the others), or pass `--size H W` (resize-to-fill + centre crop) or
`--pad` (replicate-pad, crop back afterwards). Large inputs are tiled automatically (the HunyuanVideo VAE tiles
as its reference does: `--tiling` switches it, `--tile-size` sets its tile). Existing outputs are kept unless
`--overwrite`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor
from tqdm import tqdm

from cinedit.data.index import find_media
from cinedit.data.meta import SUFFIXES, read_meta
from cinedit.data.video import (
    IMAGE_EXTS,
    VIDEO_EXTS,
    MediaError,
    is_image,
    num_sampled_frames,
    probe,
    read_video,
    to_uint8,
    write_video,
)
from cinedit.runtime.dist import resolve_device
from cinedit.runtime.files import atomic_path
from cinedit.tokenizer.loading import Tokenizer, load_tokenizer, tokenizer_hash
from cinedit.tokenizer.metrics import psnr, ssim
from cinedit.tokenizer.tiling import TilingConfig
from cinedit.tokenizer.tiling import decode as tiled_decode
from cinedit.tokenizer.tiling import encode as tiled_encode

LATENT_EXT = ".safetensors"
CKPT_REQUIRED = (
    "--ckpt is required: a model folder written by `cinedit tokenizer train` / save_pretrained, or a released "
    "tokenizer file (the Video DC-AE's, hunyuan_vae.safetensors or flux1-dev-ae.safetensors)"
)
DEFAULT_TILE = 256
WRITE_CHUNK_FRAMES = 8  # frames converted to uint8 at a time when writing
# What `encode_latents` (the generator's latents) computes from the unscaled latent z, by tokenizer kind.
LATENT_RULES = {"dcae": "z / scaling_factor", "hunyuan_vae": "scaling_factor * (z - shift_factor)"}
LATENT_RULES["flux_ae"] = LATENT_RULES["hunyuan_vae"]


class InputError(ValueError):
    """An input this command cannot use; the message says how to fix it."""


@dataclass
class Clip:
    """One input, read and ready for the model."""

    path: Path
    video: Tensor  # (1, 3, T, H', W') in [-1, 1], H' and W' padded to the tokenizer's multiple if asked
    fps: float  # of the frames read (source fps / stride); 0 for images
    height: int  # before padding
    width: int


def find_inputs(src: str | os.PathLike, latents: bool = False) -> tuple[list[Path], bool]:
    """The files named by `src` and whether `src` named a single file: media files, or with `latents` the latent
    files a folder holds (what `encode` wrote into it)."""
    src = Path(src)
    if src.is_dir():
        if latents:
            files = sorted(p for p in src.rglob(f"*{LATENT_EXT}") if not any(q.startswith(".") for q in p.parts))
        else:
            files = find_media(src)
        if not files:
            what = f"{LATENT_EXT} latent files" if latents else "video or image files"
            raise InputError(f"{src}: no {what} found (searched recursively)")
        return files, False
    if not src.is_file():
        raise InputError(f"{src}: no such file or folder")
    if src.suffix.lower() in SUFFIXES:
        return [Path(p) for p in read_meta(src)["path"]], False
    if src.suffix.lower() not in VIDEO_EXTS | IMAGE_EXTS | {LATENT_EXT}:
        raise InputError(f"{src}: not a video, image or meta file (by its extension {src.suffix!r})")
    return [src], True


def output_names(inputs: list[Path], root: Path | None, out: Path, suffix_for) -> list[Path]:
    """Where each input of a folder or meta file goes under `out`: its path relative to `root` (the input folder, or
    the folder all the meta file's paths share), named `NAME.EXT` + the output suffix unless EXT already is it
    (`clip.mp4` -> `clip.mp4`, `clip.webm` -> `clip.webm.mp4`, `clip.mp4` -> `clip.mp4.safetensors`; a latent file
    drops its `.safetensors` first). So `a/video.mp4` and `b/video.mp4`, or `clip.mp4` and `clip.mkv`, never share an
    output; two inputs that still would (by their names alone) are refused."""
    absolute = [Path(os.path.abspath(p)) for p in inputs]  # not resolve(): a symlinked file keeps its own name
    base = Path(os.path.abspath(root)) if root is not None else Path(os.path.commonpath([p.parent for p in absolute]))
    outs = []
    for src, full in zip(inputs, absolute):
        rel = full.relative_to(base) if full.is_relative_to(base) else Path(src.name)
        if rel.suffix == LATENT_EXT:
            rel = rel.with_suffix("")
        suffix = suffix_for(src)
        outs.append(out / (rel if rel.suffix.lower() == suffix else rel.with_name(rel.name + suffix)))
    seen: dict[Path, Path] = {}
    for src, dst in zip(inputs, outs):
        if dst in seen:
            raise InputError(f"{seen[dst]} and {src} would both be written to {dst}; rename one of them")
        seen[dst] = src
    return outs


def read_clip(
    path: Path,
    max_frames: int | None = None,
    stride: int = 1,
    size: tuple[int, int] | None = None,
    pad: bool = False,
    multiple: int = 32,
    frame_multiple: int = 4,
    causal: bool = False,
) -> Clip:
    """Read one input for the tokenizer: frames trimmed to a multiple of `frame_multiple` (1 + a multiple when
    `causal`), sizes checked or padded to multiples of `multiple`."""
    info = probe(path)
    if info.is_image:
        video, fps = read_video(path, size=size), 0.0
    else:
        avail = num_sampled_frames(info.num_frames, stride)
        t = min(avail, max_frames) if max_frames else avail
        t = 1 + (t - 1) // frame_multiple * frame_multiple if causal and t > 0 else t - t % frame_multiple
        least = frame_multiple + 1 if causal else frame_multiple
        if t < least:
            rule = f"1 + {frame_multiple}k frames for this causal tokenizer" if causal else f"{frame_multiple}k frames"
            raise InputError(
                f"{path}: {avail} frame(s) at stride {stride}; a video needs at least {least} ({rule}; "
                f"use an image file for single frames)"
            )
        video = read_video(path, num_frames=t, stride=stride, size=size, start=0, total_frames=info.num_frames)
        fps = info.fps / stride
    _, _, h, w = video.shape
    ph, pw = -h % multiple, -w % multiple
    if ph or pw:
        if not pad:
            raise InputError(
                f"{path}: {h}x{w} is not a multiple of {multiple}; pass --size H W (multiples of {multiple}, e.g. "
                f"{max(multiple, h - h % multiple)} {max(multiple, w - w % multiple)}) or --pad to pad and crop back"
            )
        video = F.pad(video[None], (0, pw, 0, ph, 0, 0), mode="replicate")[0]
    return Clip(path, video[None], fps, h, w)


def read_for(model: Tokenizer, path: Path, args: argparse.Namespace, max_frames: int | None = None) -> Clip:
    """Read one input with the frame and size rules of `model` (its `latent_shape` has the last word)."""
    clip = read_clip(
        path,
        max_frames if max_frames is not None else args.max_frames,
        args.stride,
        tuple(args.size) if args.size else None,
        args.pad,
        multiple=model.spatial_compression,
        frame_multiple=model.temporal_compression,
        causal=model.causal,
    )
    try:
        model.latent_shape(*clip.video.shape[2:])
    except ValueError as e:
        raise InputError(f"{path}: {e}") from None
    return clip


def tiling_for(args: argparse.Namespace, model: Tokenizer, progress: bool = True) -> TilingConfig:
    """The DC-AE tiler's config from `--tiling`, `--tile-size` and `--tile-frames`; a tokenizer that tiles itself
    takes the flags into its own config instead (and the returned config goes unused)."""
    enabled = {"auto": None, "on": True, "off": False}[args.tiling]
    if getattr(model, "native_tiling", False):
        configure_native_tiling(model, args.tiling, args.tile_size)
        return TilingConfig(enabled=enabled, progress=progress)
    tile = args.tile_size or DEFAULT_TILE
    return TilingConfig(spatial_tile=tile, temporal_tile=args.tile_frames, enabled=enabled, progress=progress)


def configure_native_tiling(model: Tokenizer, tiling: str, tile_size: int | None) -> None:
    """Apply `--tiling on|off` and `--tile-size` to a tokenizer that tiles itself (a config with `spatial_tiling`);
    `auto` keeps its config. The DC-AE's tiles come from the TilingConfig instead."""
    config = model.config
    if not getattr(model, "native_tiling", False) or not hasattr(config, "spatial_tiling"):
        return
    if tiling != "auto":
        config.spatial_tiling = tiling == "on"
    if tile_size:
        config.tile_sample_size = tile_size
    config.validate()  # a tile size the reference's scheme cannot stitch is refused here, with the sizes it takes


def write_frames(path: Path, video: Tensor, fps: float) -> Path:
    """An image (T = 1, written as PNG unless the path says .mp4) or an mp4, atomically. H.264 needs even sides: a
    video of odd height or width (a `--pad` input cropped back) gets its last row / column repeated."""
    # A few frames at a time: to_uint8 on the whole clip holds two float copies of it at once.
    frames = np.concatenate(
        [to_uint8(video[:, i : i + WRITE_CHUNK_FRAMES]) for i in range(0, video.shape[1], WRITE_CHUNK_FRAMES)]
    )
    if frames.shape[0] == 1 and path.suffix.lower() != ".mp4":
        with atomic_path(path) as tmp:
            Image.fromarray(frames[0]).save(tmp)
        return path
    h, w = frames.shape[1:3]
    if h % 2 or w % 2:
        frames = np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    return write_video(path, frames, fps if fps > 0 else 24.0)


def save_latent(path: Path, latent: Tensor, meta: dict) -> Path:
    """Latent (C, t, h, w) with string metadata, as safetensors, atomically."""
    with atomic_path(path) as tmp:
        save_file({"latent": latent.contiguous().cpu()}, str(tmp), metadata={k: str(v) for k, v in meta.items()})
    return path


def load_latent(path: Path) -> tuple[Tensor, dict]:
    """A latent file written by `encode`: (latent (C, t, h, w), metadata)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if "latent" not in f.keys():
                raise InputError(f"{path}: no `latent` tensor; latent files come from `cinedit tokenizer encode`")
            return f.get_tensor("latent"), meta
    except (OSError, SafetensorError) as e:
        raise InputError(f"{path}: not a latent file written by `cinedit tokenizer encode` ({e})") from None


def _latent_frames(path: Path) -> int | None:
    """The frame count in a latent file's metadata (reads no tensor), or None."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return int((f.metadata() or {}).get("num_frames", 0)) or None
    except (OSError, SafetensorError, ValueError):
        return None


def _run(args: argparse.Namespace, work) -> int:
    """Shared driver: resolve inputs and outputs, skip existing ones, report bad inputs, exit code."""
    out = Path(args.out)
    try:
        inputs, single = find_inputs(args.input, latents=args.command == "decode")
        if single and out.is_dir():
            raise InputError(
                f"--out {out} is a folder; with one input --out names the output file (e.g. "
                f"{out / (inputs[0].stem + args.suffix_for(inputs[0]))})"
            )
        if not single and out.exists() and not out.is_dir():
            raise InputError(f"--out {out} is a file; with several inputs --out names a folder")
        root = Path(args.input) if Path(args.input).is_dir() else None
        outputs = [out] if single else output_names(inputs, root, out, args.suffix_for)
        if not args.ckpt:
            raise InputError(CKPT_REQUIRED)
        model = load_tokenizer(args.ckpt, resolve_device(args.device))
        tiling = tiling_for(args, model)
    except (InputError, FileNotFoundError, ValueError) as e:
        print(f"cinedit tokenizer {args.command}: error: {e}", file=sys.stderr)
        return 2
    if single and out.exists() and not args.overwrite:
        print(f"cinedit tokenizer {args.command}: error: {out} exists; pass --overwrite to replace it", file=sys.stderr)
        return 2
    failed = 0
    for src, dst in tqdm(list(zip(inputs, outputs)), desc=args.command, unit="file", disable=single or args.quiet):
        if not single and dst.exists() and not args.overwrite:
            print(f"{dst} exists, kept (pass --overwrite to redo it)")
            continue
        try:
            with torch.no_grad():
                print(work(model, tiling, src, dst))
        except (InputError, MediaError, ValueError) as e:
            failed += 1
            print(f"cinedit tokenizer {args.command}: error: {e}", file=sys.stderr)
    if failed and single:
        return 2
    if failed:
        print(f"{failed} of {len(inputs)} input(s) failed", file=sys.stderr)
        return 1
    return 0


def reconstruct(model: Tokenizer, clip: Clip, tiling: TilingConfig) -> tuple[Tensor, Tensor]:
    """Encode + decode a clip (tiled when large): (reconstruction, reference), both cropped back, float on the CPU."""
    p = next(model.parameters())
    x = clip.video.to(p.device, p.dtype)
    rec = tiled_decode(model, tiled_encode(model, x, tiling), tiling, num_frames=x.shape[2])
    del x  # the clip itself stays alive (clip.video): on the CPU x is it, not a copy
    # Cropped and clamped in place: no second full-clip float copy (720p x 64 frames is ~0.7 GB a copy).
    return rec[..., : clip.height, : clip.width].float().cpu().clamp_(-1, 1), clip.video[
        ..., : clip.height, : clip.width
    ]


def _as_uint8_if_exact(video: Tensor) -> Tensor:
    """(1, 3, T, H, W) in [-1, 1] as uint8 codes when that is lossless (frames read from 8-bit files are), else as is:
    a quarter of the memory for the reference while the clip is decoded."""
    codes = torch.cat([((c + 1) * 127.5).round_().clamp_(0, 255).to(torch.uint8) for c in video.split(8, dim=2)], 2)
    exact = all(torch.equal(_from_uint8(a), b) for a, b in zip(codes.split(8, dim=2), video.split(8, dim=2)))
    return codes if exact else video


def _from_uint8(v: Tensor) -> Tensor:
    return v.float().div_(127.5).sub_(1.0) if v.dtype == torch.uint8 else v


def _quality(rec: Tensor, ref: Tensor, chunk: int = 8) -> tuple[float, float | None]:
    """PSNR and SSIM (None below 11x11) of one video, per frame averaged over frames, `chunk` frames at a time."""
    t, sums = rec.shape[2], [0.0, 0.0]
    with_ssim = min(rec.shape[-2:]) >= 11  # SSIM's 11x11 window
    for i in range(0, t, chunk):
        a, b = rec[:, :, i : i + chunk], _from_uint8(ref[:, :, i : i + chunk])
        sums[0] += psnr(a, b).item() * a.shape[2]
        if with_ssim:
            sums[1] += ssim(a, b).item() * a.shape[2]
    return sums[0] / t, sums[1] / t if with_ssim else None


def _reconstruct(args: argparse.Namespace) -> int:
    def work(model: Tokenizer, tiling: TilingConfig, src: Path, dst: Path) -> str:
        # As `reconstruct`, holding less: after encoding, the reference is kept as uint8 and the float clip dropped,
        # so a long clip costs its decoded float frames + a quarter as much, not two float copies (+ metric copies).
        clip = read_for(model, src, args)
        p = next(model.parameters())
        frames, h, w, fps = clip.video.shape[2], clip.height, clip.width, clip.fps
        z = tiled_encode(model, clip.video.to(p.device, p.dtype), tiling)
        ref = _as_uint8_if_exact(clip.video[..., :h, :w])
        del clip
        rec = tiled_decode(model, z, tiling, num_frames=frames)[..., :h, :w].float().cpu().clamp_(-1, 1)
        write_frames(dst, rec[0], fps)
        p_db, s = _quality(rec, ref)
        quality = f"PSNR {p_db:.2f} dB" + (f", SSIM {s:.4f}" if s is not None else "")
        return f"{src} -> {dst}: {rec.shape[2]} frame(s) {h}x{w}, {quality}"

    return _run(args, work)


def _encode(args: argparse.Namespace) -> int:
    def work(model: Tokenizer, tiling: TilingConfig, src: Path, dst: Path) -> str:
        clip = read_for(model, src, args)
        z = tiled_encode(model, clip.video.to(next(model.parameters()).device), tiling)[0]
        meta = {
            "format": "cinedit-latent-v1",
            "source": str(src),
            "fps": clip.fps,
            "num_frames": clip.video.shape[2],
            "height": clip.height,
            "width": clip.width,
            "padded_height": clip.video.shape[3],
            "padded_width": clip.video.shape[4],
            "scaling_factor": model.scaling_factor,
            "shift_factor": model.shift_factor,
            "latent_rule": LATENT_RULES.get(model.kind, ""),
            "scaled": False,
            "tokenizer_kind": model.kind,
            "tokenizer_config_hash": tokenizer_hash(model),
            "tokenizer_config": json.dumps(dataclasses.asdict(model.config)),
        }
        save_latent(dst, z, meta)
        factors = f"scaling factor {model.scaling_factor}"
        factors += f", shift {model.shift_factor}" if model.shift_factor else ""
        return f"{src} -> {dst}: latent {tuple(z.shape)} (unscaled; {factors})"

    return _run(args, work)


def _decode(args: argparse.Namespace) -> int:
    def work(model: Tokenizer, tiling: TilingConfig, src: Path, dst: Path) -> str:
        if src.suffix != LATENT_EXT:
            raise InputError(f"{src}: latent files are {LATENT_EXT} files written by `cinedit tokenizer encode`")
        z, meta = load_latent(src)
        want = meta.get("tokenizer_config_hash")
        if want and want != tokenizer_hash(model) and not args.force:
            raise InputError(
                f"{src} was encoded by a tokenizer with config hash {want}, --ckpt has {tokenizer_hash(model)}: "
                f"decode with the same tokenizer (or --force)"
            )
        frames = int(meta["num_frames"]) if "num_frames" in meta else None
        rec = tiled_decode(model, z[None].to(next(model.parameters()).device), tiling, num_frames=frames)
        h, w = int(meta.get("height", rec.shape[3])), int(meta.get("width", rec.shape[4]))
        rec = rec[..., :h, :w].float().cpu().clamp(-1, 1)
        write_frames(dst, rec[0], float(meta.get("fps", 0) or 0))
        return f"{src} -> {dst}: {rec.shape[2]} frame(s) {h}x{w}"

    return _run(args, work)


def _common(p: argparse.ArgumentParser, reads_media: bool) -> None:
    p.add_argument("input", metavar="IN", help="a file, a folder or a meta file (.csv / .parquet)")
    p.add_argument("--out", required=True, help="output file (one input) or folder (several)")
    p.add_argument("--ckpt", help="tokenizer: our model folder or the released single safetensors file")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--tiling", choices=["auto", "on", "off"], default="auto", help="default: tile large inputs")
    p.add_argument(
        "--tile-size", type=int, default=None, help="spatial tile in pixels (default 256; HunyuanVAE: its config's)"
    )
    p.add_argument("--tile-frames", type=int, default=32, help="temporal tile in frames (default 32)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    if reads_media:
        p.add_argument("--max-frames", type=int, default=None, help="read at most this many frames")
        p.add_argument("--stride", type=int, default=1, help="temporal stride in source frames (default 1)")
        p.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), help="resize-to-fill + centre crop")
        p.add_argument(
            "--pad", action="store_true", help="pad sizes to the tokenizer's multiple (DC-AE 32, others 8), crop back"
        )


def add_cli(sub: argparse._SubParsersAction) -> None:
    """Register `reconstruct`, `encode` and `decode`."""
    specs = [
        ("reconstruct", _reconstruct, True, "encode + decode, write the result, print PSNR / SSIM"),
        ("encode", _encode, True, "write latents (+ fps, size, frame count, tokenizer hash) as safetensors"),
        ("decode", _decode, False, "decode latent files written by `encode` back to video"),
    ]
    for name, func, reads_media, help_ in specs:
        p = sub.add_parser(name, help=help_, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
        _common(p, reads_media)
        if name == "decode":
            p.add_argument("--force", action="store_true", help="decode even if the tokenizer config hash differs")
        suffix = {
            "encode": lambda s: LATENT_EXT,
            "decode": lambda s: ".png" if _latent_frames(s) == 1 else ".mp4",
        }.get(name, lambda s: ".png" if is_image(s) else ".mp4")
        p.set_defaults(func=func, suffix_for=suffix, command=name)


__all__ = [
    "InputError",
    "add_cli",
    "find_inputs",
    "output_names",
    "load_latent",
    "configure_native_tiling",
    "read_clip",
    "read_for",
    "tiling_for",
    "reconstruct",
    "save_latent",
]
