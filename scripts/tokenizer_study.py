"""Latent-scale study of the `debug` tokenizer preset on the sample data: a few variants, trained one at a time.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/tokenizer_study.py --steps 150 --out runs/tokenizer_study
    OMP_NUM_THREADS=1 .venv/bin/python scripts/tokenizer_study.py --demo --steps 560 --out runs/tokenizer_study_demo

`--demo` trains as `cinedit demo` does (its curated data, warm-up, cosine decay and adversarial tail, seed 42) and
adds the demo's own scores: `cinedit eval recon`'s protocol on the held-out clips (16 frames at stride 2, 64x64,
the whole frame) for the model and the trivial codec, the figures the demo's report compares.

Each variant is `cinedit tokenizer train debug` plus its overrides, for --steps steps with no samples or
checkpoints, evaluated at the end by the trainer itself (held-out L1 / PSNR, `latent/*` statistics of the EMA model
on the held-out clips and on their middle frames as images). On top of that this script scores the same held-out
clips with SSIM (`cinedit.eval.ssim`), measures the latent std of the sample photographs (the images the run trains
on) and scores the trivial codec of `cinedit.demo.tokenizer.baseline` (each 4 frames averaged, area-resized to the
latent's value count, upsampled back). Prints a Markdown table and writes `<out>/study.json`. A variant whose
run folder holds a finished `model/` is not trained again (delete the folder to redo it).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import torch

from cinedit.cli import main as cli_main
from cinedit.configs import load_config
from cinedit.data.buckets import mix_seed
from cinedit.data.dataset import VideoDataset
from cinedit.data.filter import filter_meta
from cinedit.data.meta import read_meta, write_meta
from cinedit.data.sample import build_sample_data
from cinedit.demo.plan import DEFAULT_SEED, TOKENIZER_CROP_SCALE, TOKENIZER_MODEL, tokenizer_schedule
from cinedit.demo.tokenizer import RECON_FRAMES, RECON_SIZE, RECON_STRIDE, baseline, baseline_shape
from cinedit.eval import psnr, ssim
from cinedit.runtime.logs import read_metrics
from cinedit.tokenizer.commands import read_clip
from cinedit.tokenizer.loading import load_pretrained
from cinedit.tokenizer.losses import latent_moments, moments_std
from cinedit.tokenizer.train import split_meta

# name -> overrides of the `debug` preset. The preset is the recipe the study chose (zero-initialised residual
# branches, random windows of up to 2x zoom and flips, L1 + squared error, latent regulariser 1e-2, lr 1e-3, the
# adversarial phase from step 5); each other variant takes one of its parts away or changes one setting.
VARIANTS: dict[str, list[str]] = {
    "debug (the recipe)": [],
    "no windows or flips": ["--data.crop_scale=1", "--data.flip=false"],
    "no squared error": ["--loss.mse_weight=0"],
    "no regulariser": ["--loss.latent_weight=0"],
    "no adversarial phase": ["--disc.start=-1"],
    "lr 2e-3, warm-up 20, cosine": ["--optim.lr=2e-3", "--optim.warmup_steps=20", "--optim.decay=cosine"],
    "lr 1e-3, warm-up 20, cosine": ["--optim.warmup_steps=20", "--optim.decay=cosine"],
    "image share 0.5": ["--train.image_share=0.5"],
    "EMA 0.999": ["--ema.decay=0.999"],
    "windows up to 1.5x": ["--data.crop_scale=1.5"],
    "windows up to 1.25x": ["--data.crop_scale=1.25"],
    "image share 0.1": ["--train.image_share=0.1"],
    "squared error only": ["--loss.l1_weight=0"],
    "the demo's: demo model, windows up to 1.5x": [
        f"--model.preset={TOKENIZER_MODEL}",
        f"--data.crop_scale={TOKENIZER_CROP_SCALE}",
    ],
}


def demo_schedule(steps: int) -> list[str]:
    """The overrides `cinedit demo` trains its tokenizer with (`cinedit.demo.run.tokenizer_argv`), and its seed."""
    return [*tokenizer_schedule(steps), f"--data.seed={DEFAULT_SEED}", f"--train.seed={DEFAULT_SEED}"]


def run_variant(name: str, overrides: list[str], meta: Path, out: Path, steps: int, demo: bool = False) -> Path:
    if (out / "model" / "config.json").is_file():
        print(f"[{name}] reusing {out}", flush=True)
        return out
    argv = ["tokenizer", "train", "debug", f"--data.meta={meta}", f"--train.out_dir={out}", "--train.progress=false"]
    argv += [f"--train.steps={steps}", f"--train.eval_every={steps}", "--train.sample_every=0", "--train.ckpt_every=0"]
    argv += ["--train.overwrite=true", *(demo_schedule(steps) if demo else []), *overrides]
    print(f"[{name}] $ cinedit {' '.join(argv)}", flush=True)
    if cli_main(argv) != 0:
        raise RuntimeError(f"variant {name!r} failed")
    return out


def heldout_clips(cfg: Any) -> list[torch.Tensor]:
    """The trainer's held-out clips (`build_data`'s), (3, T, H, W) in [-1, 1]."""
    _, held = split_meta(read_meta(cfg.data.meta), cfg.data)
    ds, d = VideoDataset(held, cfg.data), cfg.data
    return [ds[(i, d.eval_frames, d.eval_size, d.eval_size, mix_seed(d.seed, i))]["video"] for i in range(len(held))]


@torch.no_grad()
def photo_std(model: Any, cfg: Any) -> float:
    """Latent std of the training photographs at the eval size (square, seeded crops as the trainer reads them)."""
    df = read_meta(cfg.data.meta)
    photos = df[df["num_frames"] == 1].reset_index(drop=True)
    ds, s = VideoDataset(photos, cfg.data), cfg.data.eval_size
    sums = [0.0, 0.0, 0.0]
    for i in range(len(photos)):
        z = model.encode(ds[(i, 1, s, s, mix_seed(cfg.data.seed, i))]["video"][None])
        sums = [a + b for a, b in zip(sums, latent_moments(z))]
    return moments_std(*sums)[1] if sums[0] else float("nan")


@torch.no_grad()
def score(run: Path, clips: list[torch.Tensor]) -> dict[str, float]:
    model = load_pretrained(run / "model").eval()
    cfg = load_config(run)
    last = [r for r in read_metrics(run) if "val/l1" in r][-1]
    x = torch.stack(clips)
    rec = model(x).clamp(-1, 1)
    return {
        "psnr": float(psnr(rec, x).mean()),
        "ssim": float(ssim(rec, x).mean()),
        "val_l1": last["val/l1"],
        "std_video": last["latent/std_video"],
        "std_image": last["latent/std_image"],
        "ratio": last["latent/std_ratio"],
        "mean_video": last["latent/mean_video"],
        "std_photos": photo_std(model, cfg),
        "scaling_factor": 1 / last["latent/std_video"],
    }


@torch.no_grad()
def demo_scores(run: Path) -> dict[str, float]:
    """The demo's held-out figures: each held-out clip read whole (16 frames at stride 2, 64x64), reconstructed by the
    model and by the trivial codec; mean PSNR / SSIM over the clips."""
    cfg, model = load_config(run), load_pretrained(run / "model").eval()
    _, held = split_meta(read_meta(cfg.data.meta), cfg.data)
    sums = dict.fromkeys(("demo_psnr", "demo_ssim", "codec_psnr", "codec_ssim"), 0.0)
    for path in held["path"]:
        x = read_clip(Path(path), RECON_FRAMES, RECON_STRIDE, RECON_SIZE).video
        t, h, w = x.shape[2:]
        shape = baseline_shape(math.prod(model.latent_shape(t, h, w)), t, h, w, model.temporal_compression)
        for key, rec in (("demo", model(x).clamp(-1, 1)), ("codec", baseline(x, shape))):
            sums[f"{key}_psnr"] += float(psnr(rec, x).mean()) / len(held)
            sums[f"{key}_ssim"] += float(ssim(rec, x).mean()) / len(held)
    return sums


def baseline_scores(clips: list[torch.Tensor], run: Path) -> dict[str, float]:
    model = load_pretrained(run / "model")
    x = torch.stack(clips)
    t, h, w = x.shape[2:]
    shape = baseline_shape(math.prod(model.latent_shape(t, h, w)), t, h, w, model.temporal_compression)
    rec = baseline(x, shape)
    return {"psnr": float(psnr(rec, x).mean()), "ssim": float(ssim(rec, x).mean())}


def table(rows: dict[str, dict[str, float]], base: dict[str, float]) -> str:
    demo = all("demo_psnr" in r for r in rows.values())
    head = "| variant | held-out PSNR (dB) | SSIM | val L1 | std video | std image | ratio v/i | std photos | 1/std |"
    head += " demo PSNR / SSIM | codec PSNR / SSIM |" if demo else ""
    lines = [head, "|" + "---|" * (11 if demo else 9)]
    for name, r in rows.items():
        line = (
            f"| {name} | {r['psnr']:.2f} | {r['ssim']:.4f} | {r['val_l1']:.4f} | {r['std_video']:.4g} | "
            f"{r['std_image']:.4g} | {r['ratio']:.3g} | {r['std_photos']:.4g} | {r['scaling_factor']:.3g} |"
        )
        if demo:
            line += f" {r['demo_psnr']:.2f} / {r['demo_ssim']:.3f} | {r['codec_psnr']:.2f} / {r['codec_ssim']:.3f} |"
        lines.append(line)
    lines.append(
        f"| trivial codec (same value count) | {base['psnr']:.2f} | {base['ssim']:.4f} |" + " |" * (8 if demo else 6)
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=150, help="training steps per variant (default 150)")
    p.add_argument("--out", type=Path, default=Path("runs/tokenizer_study"))
    p.add_argument("--only", nargs="*", default=None, help="variant names to run (default all)")
    p.add_argument("--demo", action="store_true", help="train and score as `cinedit demo` does (see above)")
    args = p.parse_args(argv)
    meta = args.out / "sample_data" / "meta.csv"
    if not meta.is_file():
        meta = build_sample_data(args.out / "sample_data", overwrite=True, progress=False)
    if args.demo:  # the demo's curation: clips and photographs of at least 128 px a side
        curated = meta.with_name("meta_filtered.csv")
        if not curated.is_file():
            write_meta(filter_meta(read_meta(meta), min_height=128, min_width=128)[0], curated)
        meta = curated
    rows, clips, last_run = {}, None, None
    for i, (name, overrides) in enumerate(VARIANTS.items()):
        if args.only is not None and name not in args.only:
            continue
        run = run_variant(name, overrides, meta, args.out / f"v{i}_steps{args.steps}", args.steps, args.demo)
        clips = clips if clips is not None else heldout_clips(load_config(run))
        rows[name], last_run = score(run, clips), run
        if args.demo:
            rows[name].update(demo_scores(run))
        print(json.dumps({name: rows[name]}), flush=True)
    if last_run is None:
        print("no variant ran", file=sys.stderr)
        return 2
    base = baseline_scores(clips, last_run)
    (args.out / "study.json").write_text(
        json.dumps({"steps": args.steps, "variants": rows, "baseline": base}, indent=1)
    )
    print(table(rows, base))
    return 0


if __name__ == "__main__":
    sys.exit(main())
