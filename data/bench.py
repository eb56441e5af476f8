"""Decoding benchmark: frames per second for reading a 32-frame 256px clip, the data loader's unit of work."""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from cinedit.data.meta import read_meta
from cinedit.data.video import frame_stride, num_sampled_frames, read_video
from cinedit.runtime.files import write_json


def bench_decode(
    meta: str | Path, num_frames: int = 32, size: tuple[int, int] = (256, 256), repeats: int = 5, stride: int = 0
) -> dict:
    """Time `read_video` (seek, decode, resize-to-fill, crop, to tensor) on every clip long enough for the clip."""
    df = read_meta(meta)
    rows = []
    for r in df.itertuples():
        if r.num_frames <= 1:
            continue
        s = stride or frame_stride(r.fps)
        if num_sampled_frames(r.num_frames, s) < num_frames:
            continue
        rng = np.random.default_rng(0)
        read_video(r.path, num_frames, s, size, rng=rng)  # warm-up: file cache, codec init
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            read_video(r.path, num_frames, s, size, rng=rng, total_frames=r.num_frames)
            times.append(time.perf_counter() - t0)
        med = float(np.median(times))
        rows.append(
            {
                "path": os.path.basename(r.path),
                "source": f"{r.width}x{r.height}@{r.fps:g}",
                "stride": s,
                "median_s": round(med, 4),
                "frames_per_s": round(num_frames / med, 1),
            }
        )
    if not rows:
        raise SystemExit(f"no clip in {meta} has {num_frames} frames at its stride; lower --num-frames or --stride")
    return {
        "benchmark": "decode_clip",
        "num_frames": num_frames,
        "size": list(size),
        "repeats": repeats,
        "torch_threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "clips": rows,
        "mean_frames_per_s": round(float(np.mean([r["frames_per_s"] for r in rows])), 1),
    }


def add_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="measure clip decoding speed (frames/s) on a meta file")
    p.add_argument("meta", help="meta CSV/Parquet, e.g. the sample data's meta.csv")
    p.add_argument("--num-frames", type=int, default=32)
    p.add_argument("--size", type=int, nargs=2, default=[256, 256], metavar=("H", "W"))
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--stride", type=int, default=0, help="0: ceil(fps / 24)")
    p.add_argument("--json", help="also write the result here")
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    res = bench_decode(args.meta, args.num_frames, tuple(args.size), args.repeats, args.stride)
    for r in res["clips"]:
        print(f"{r['path']:<28} {r['source']:<16} stride {r['stride']}  {r['frames_per_s']:>7.1f} frames/s")
    print(f"mean: {res['mean_frames_per_s']} frames/s ({args.num_frames} frames at {args.size[0]}x{args.size[1]})")
    if args.json:
        write_json(args.json, res)
    return 0
