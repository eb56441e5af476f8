"""The demo's tokenizer steps around training: held-out clips scored before and after training next to a resize
baseline, and the latent scale the generator needs.

The held-out clips are the ones the tokenizer trainer holds out (`split_meta`, never trained on). Both models are
scored by `cinedit eval recon` (the numbers in the report); this module adds the baseline, which keeps as many
values per clip as the tokenizer's latent: each group of `temporal_compression` frames averaged into one, and
each of those area-resized to the largest (h, w) at the clip's aspect with 3 * h * w at most the latent's values
per latent frame; it is decoded by trilinear interpolation back to the clip's size.

A tokenizer trained from scratch has no scaling factor (the `demo` preset's is None), so its latents are far from
the unit variance rectified flow assumes. `calibrate` measures their standard deviation on the clips and shapes the
generator trains on and writes the model folder again with `scaling_factor` set to it, as the release's 0.493 is.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shlex
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from cinedit.configs import DataConfig
from cinedit.data.buckets import mix_seed
from cinedit.data.cache import plan_shapes
from cinedit.data.dataset import VideoDataset
from cinedit.data.meta import read_meta, write_meta
from cinedit.data.video import read_video, write_video
from cinedit.eval import figures, psnr, ssim
from cinedit.eval.cli import main as eval_main
from cinedit.eval.recon import pick_frames
from cinedit.runtime.files import write_json
from cinedit.runtime.modelio import CONFIG_NAME
from cinedit.runtime.rng import seed_everything
from cinedit.tokenizer.commands import find_inputs, read_clip, reconstruct
from cinedit.tokenizer.loading import load_pretrained, save_pretrained
from cinedit.tokenizer.model import VideoDCAE
from cinedit.tokenizer.tiling import TilingConfig
from cinedit.tokenizer.train import build_model, split_meta

RECON_SIZE = (64, 64)  # the demo tokenizer's training size
RECON_FRAMES = 16
RECON_STRIDE = 2  # the sample clips are 25 fps; training reads them at ceil(25 / 24) = 2
STRIP_FRAMES = 4


def heldout_meta(cfg: Any, path: Path) -> Path:
    """The tokenizer run's held-out clips as a meta file (written once)."""

    if not path.is_file():
        _, held = split_meta(read_meta(cfg.data.meta), cfg.data)
        write_meta(held, path)
    return path


def init_model(cfg: Any, folder: Path) -> Path:
    """The untrained model the tokenizer run starts from (same preset and seed as its trainer), saved once."""

    if not (folder / CONFIG_NAME).is_file():
        seed_everything(cfg.train.seed)  # as build_trainer does right before build_model
        save_pretrained(build_model(cfg.model), folder)
    return folder


def calibrate(model_dir: Path, dst: Path, meta: Path, tables: list[Any], seed: int) -> dict[str, float]:
    """Write `model_dir` to `dst` with scaling_factor = the std of its latents (once); returns the statistics.

    The latents are those `cinedit data cache` makes of `meta` at each bucket table in `tables` (same shapes, same
    seeded crops).
    """
    stats_path = dst / "latent_stats.json"
    if stats_path.is_file() and (dst / "config.json").is_file():
        print(f"reusing the calibrated tokenizer {dst}")
        return json.loads(stats_path.read_text())
    model = load_pretrained(model_dir).eval()
    df = read_meta(meta)
    dataset = VideoDataset(df, DataConfig(meta=str(meta), seed=seed))
    sums = {"all": [0, 0.0, 0.0], "images": [0, 0.0, 0.0], "videos": [0, 0.0, 0.0]}  # count, sum, sum of squares
    for buckets in tables:
        for i, shape in enumerate(plan_shapes(df, buckets, None, 1, 0)):
            if shape is None:
                continue
            with torch.no_grad():
                z = model.encode(dataset[(i, *shape, mix_seed(seed, i))]["video"][None]).double()
            for key in ("all", "images" if shape[0] == 1 else "videos"):
                acc = sums[key]
                acc[0], acc[1], acc[2] = acc[0] + z.numel(), acc[1] + float(z.sum()), acc[2] + float(z.square().sum())
    stats = {}
    for key, (n, total, squares) in sums.items():
        if n:
            mean = total / n
            stats[key] = {"mean": mean, "std": math.sqrt(max(squares / n - mean * mean, 1e-12)), "values": n}
    std = stats["all"]["std"]
    scaled = VideoDCAE(dataclasses.replace(model.config, scaling_factor=std))
    scaled.load_state_dict(model.state_dict())
    save_pretrained(scaled, dst)
    stats.update(stats["all"])
    write_json(stats_path, stats)
    print(
        f"latent std {std:.4f} (mean {stats['mean']:.4f}) over {stats['values']:,} values: "
        f"{dst} has scaling_factor {std:.4f}"
    )
    return stats


def recon_argv(ckpt: Path, heldout: Path, out: Path, device: str) -> list[str]:
    h, w = RECON_SIZE
    argv = ["recon", str(heldout), "--ckpt", str(ckpt), "--out", str(out), "--size", str(h), str(w)]
    return argv + ["--num-frames", str(RECON_FRAMES), "--stride", str(RECON_STRIDE), "--device", device, "--quiet"]


def recon_eval(ckpt: Path, heldout: Path, out: Path, device: str) -> dict[str, Any]:
    """`cinedit eval recon` of the held-out clips (skipped when its recon.json exists); returns recon.json."""
    result = out / "recon.json"
    if result.is_file():
        print(f"reusing {result}")
    else:
        argv = recon_argv(ckpt, heldout, out, device)
        print(f"$ {shlex.join(['cinedit', 'eval', *argv])}", flush=True)
        if eval_main(argv) == 2 or not result.is_file():
            raise RuntimeError(f"`cinedit eval recon` failed for {ckpt} (see above)")
    return json.loads(result.read_text())


def baseline_shape(latent_values: int, num_frames: int, height: int, width: int, temporal: int) -> tuple[int, int, int]:
    """(t, h, w) of the baseline's RGB clip: t = num_frames / temporal and 3 * t * h * w <= latent_values."""
    t = max(1, num_frames // temporal)
    per_frame = latent_values / (3 * t)  # pixels per kept frame
    s = math.sqrt(per_frame / (height * width))
    h, w = max(1, math.floor(height * s)), max(1, math.floor(width * s))
    # Flooring both sides can leave room for one more row or column.
    if h * (w + 1) <= per_frame:
        w += 1
    elif (h + 1) * w <= per_frame:
        h += 1
    return t, h, w


def baseline(video: Tensor, shape: tuple[int, int, int]) -> Tensor:
    """(b, 3, T, H, W) in [-1, 1] -> area-downsampled to (t, h, w) and trilinearly upsampled back, clamped."""
    small = F.adaptive_avg_pool3d(video.float(), shape)
    return F.interpolate(small, size=video.shape[2:], mode="trilinear", align_corners=False).clamp(-1, 1)


def compare(heldout: Path, init: Path, final: Path, ev_dir: Path, strips: Path) -> dict[str, Any]:
    """Start / end / baseline figures (`ev_dir/compare.json`) and the reconstruction strips PNG."""
    result = ev_dir / "compare.json"
    if result.is_file() and strips.is_file():
        print(f"reusing {result}")
        return json.loads(result.read_text())

    models = {"start": load_pretrained(init).eval(), "end": load_pretrained(final).eval()}
    tok = models["end"]
    tiling = TilingConfig(progress=False)
    clips, panels, arithmetic = [], [], None
    for path in find_inputs(heldout)[0]:
        clip = read_clip(path, RECON_FRAMES, RECON_STRIDE, RECON_SIZE)
        x = clip.video  # (1, 3, T, H, W)
        t, h, w = x.shape[2:]
        latent = tok.latent_shape(t, h, w)
        shape = baseline_shape(math.prod(latent), t, h, w, tok.temporal_compression)
        with torch.no_grad():
            recs = {k: reconstruct(m, clip, tiling)[0] for k, m in models.items()}
        recs["baseline"] = baseline(x, shape)
        scores = {k: {"psnr": psnr(r, x).item(), "ssim": ssim(r, x).item()} for k, r in recs.items()}
        clips.append({"path": str(path), "frames": t, "height": h, "width": w, **scores})
        arithmetic = {
            "clip": [3, t, h, w],
            "pixels": 3 * t * h * w,
            "latent": list(latent),
            "latent_values": math.prod(latent),
            "baseline": [3, *shape],
            "baseline_values": 3 * math.prod(shape),
        }
        ref, _, err = pick_frames(x, recs["end"], STRIP_FRAMES)
        rows = [("original", list(ref))]
        for key, label in (("start", "untrained"), ("end", "trained"), ("baseline", "baseline")):
            rows.append((f"{label} {scores[key]['psnr']:.1f} dB", list(pick_frames(x, recs[key], STRIP_FRAMES)[1])))
        rows.append(("|trained err| x4", list(figures.error_map(err, gain=4.0))))
        title = f"{Path(path).name}: {t} frames at {h}x{w} (held out, never trained on)"
        panels.append(figures.image_grid(rows, title, cell_height=96, label_width=150))
    figures.save_png(figures.stack(panels), strips)
    mean = {k: {m: sum(c[k][m] for c in clips) / len(clips) for m in ("psnr", "ssim")} for k in recs}
    doc = {"clips": clips, "mean": mean, "arithmetic": arithmetic}
    write_json(result, doc)
    return doc


def reference_clips(sources: list[str], dests: list[Path], size: tuple[int, int], frames: int, fps: float) -> None:
    """Real clips as the generator is trained on them (stride 2, resized to fill `size`, `frames` frames) as mp4,
    written once."""

    for src, dst in zip(sources, dests):
        if not dst.is_file():
            write_video(dst, read_video(src, num_frames=frames, stride=RECON_STRIDE, size=size, start=0), fps)
