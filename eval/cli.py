"""`cinedit eval ...`: reconstruction reports, VBench, benchmarks and parity checks against the reference fixtures."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from cinedit.eval import bench, recon, vbench
from cinedit.eval.parity import FixtureError, check_fixture
from cinedit.runtime.files import write_json


def _parity(args: argparse.Namespace) -> int:
    torch.manual_seed(0)
    failed = 0
    for path in args.fixtures:
        try:
            report = check_fixture(path, args.atol, args.rtol)
        except (FixtureError, ValueError, RuntimeError) as e:
            print(f"{path}: error: {e}", file=sys.stderr)
            failed += 1
            continue
        print(f"{report.fixture} ({report.component})")
        for r in report.results:
            status = "ok" if r.ok else "FAIL"
            if report.component == "schema":
                print(f"  {r.name:<40} {int(r.max_abs_diff)}  {status}")
            else:
                print(f"  {r.name:<40} max abs diff {r.max_abs_diff:.3e}  (atol {r.atol:g}, rtol {r.rtol:g})  {status}")
        failed += not report.ok
    if failed:
        print(f"{failed} of {len(args.fixtures)} fixture(s) failed", file=sys.stderr)
    return 1 if failed else 0


def _tokenizer_bench(args: argparse.Namespace, preset: str) -> dict:

    res = bench.bench_tokenizer(
        preset, args.frames or 8, args.size or 128, args.batch, args.repeats, args.device, args.dtype, args.compile
    )
    print(
        f"tokenizer {res['preset']} ({res['params_m']}M params), input {res['shape']}, {res['device']}, {res['dtype']}"
    )
    for name in ("encode", "encode_compiled", "decode", "decode_compiled"):
        if name not in res:
            continue
        r = res[name]
        first = f", compile + first call {r['compile_s']} s" if "compile_s" in r else ""
        print(
            f"  {name}: {r['frames_per_s']} frames/s ({r['median_s']} s per call), peak memory +{r['peak_mb']} MB"
            f"{first}"
        )
    return res


def _generator_bench(args: argparse.Namespace, preset: str, with_flux: bool, grid_from_clip: bool) -> dict:
    """Raises ValueError on a bad preset or shape."""

    grid = None
    if grid_from_clip and (args.frames is not None or args.size is not None):
        if args.seq is not None:
            raise ValueError("give --seq or --frames/--size, not both")
        presets = bench.generator_presets()
        if preset not in presets:
            raise ValueError(f"unknown generator preset {preset!r}, expected one of {sorted(presets)}")
        grid = bench.video_grid(presets[preset](), args.frames or 1, args.size or 256)
    seq = 256 if args.seq is None else args.seq
    txt_len = 64 if args.txt_len is None else args.txt_len
    res = bench.bench_generator(
        preset, seq, txt_len, args.batch, args.repeats, args.device, args.dtype, with_flux, grid, args.compile
    )
    print(
        f"generator {preset}, {res['img_tokens']} image tokens (grid {res['grid']}) + {res['txt_tokens']} text "
        f"tokens, batch {res['batch']}, {res['device']}, {res['dtype']}, {res['threads']} threads"
    )
    print(
        f"  training step = {res['step']}; analytic {res['flops']['train_step'] / 1e9:.3f} GFLOP per step "
        f"(3 x forward {res['flops']['forward'] / 1e9:.3f})"
    )
    for name in ("mmdit", "mmdit_compiled", "flux"):
        if name not in res:
            continue
        r = res[name]
        mfu = f", MFU {100 * r['mfu']:.1f}%" if "mfu" in r else ""
        first = f", compile + first step {r['compile_s']} s" if "compile_s" in r else ""
        print(
            f"  {name:<5} ({r['params_m']}M params): {r['median_s']} s/step, {r['tokens_per_s']} tokens/s, "
            f"{r['gflops_per_s']} GFLOP/s{mfu}, peak memory +{r['peak_mb']} MB{first}"
        )
    return res


def _packing_bench(args: argparse.Namespace, preset: str) -> dict:
    res = bench.bench_packing(preset, 16 if args.txt_len is None else args.txt_len, args.repeats, args.device,
                              args.dtype)  # fmt: skip
    print(f"packing vs bucketing, generator {preset}, {res['samples']} samples of {res['shapes']} shapes, "
          f"{res['tokens']} tokens, {res['device']}")  # fmt: skip
    for name in ("packed_varlen", "packed_split", "packed_mask", "bucketed", "padded"):
        if name in res:
            print(f"  {name}: {res[name]['tokens_per_s']} tokens/s ({res[name]['median_s']} s/step)")
    return res


def _bench_args_error(args: argparse.Namespace) -> str:
    """What is wrong with this combination of flags ("" if nothing)."""
    if args.model == "all":
        if args.preset:
            return "--preset names one model's preset; with --model all use --tokenizer-preset / --generator-preset"
    elif args.tokenizer_preset or args.generator_preset:
        return "--tokenizer-preset / --generator-preset apply to --model all; use --preset"
    if args.model == "tokenizer":
        extra = [flag for flag, value in (("--seq", args.seq), ("--txt-len", args.txt_len)) if value is not None]
        extra += ["--with-flux"] if args.with_flux else []
        if extra:
            return f"{', '.join(extra)} only apply to --model generator (or all)"
    return ""


def _bench(args: argparse.Namespace) -> int:
    error = _bench_args_error(args)
    out = Path(args.out) if args.out else None
    existing = [out / n for n in bench.REPORT_FILES if (out / n).exists()] if out else []
    if existing and not args.overwrite:
        error = f"{', '.join(map(str, existing))} exist(s); pass --overwrite to replace them"
    if error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    sections = {}
    try:
        if args.model in ("tokenizer", "all"):
            preset = (args.tokenizer_preset if args.model == "all" else args.preset) or "f32t4c128"
            sections["tokenizer"] = _tokenizer_bench(args, preset)
        if args.model in ("generator", "all"):
            preset = (args.generator_preset if args.model == "all" else args.preset) or "debug"
            with_flux = args.with_flux or args.model == "all"  # the report always has its peer
            sections["generator"] = _generator_bench(args, preset, with_flux, grid_from_clip=args.model == "generator")
        if args.model in ("packing", "all"):
            preset = (args.generator_preset if args.model == "all" else args.preset) or "debug"
            sections["packing"] = _packing_bench(args, preset)
    except (KeyError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        res = sections if args.model == "all" else sections[args.model]
        write_json(args.json, res)
    if out:
        for path in bench.write_report(sections, out):
            print(f"wrote {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cinedit eval", description="Evaluation and numerical parity checks.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser(
        "parity",
        help="replay reference fixtures and compare outputs",
        description="Build the model from each fixture's recorded reference config, load its weights with the "
        "release's key names (strict), run the recorded call, print the max abs difference per output, and exit "
        "non-zero if any output is beyond tolerance (the fixture README's, by variant, unless given).",
    )
    p.add_argument("fixtures", nargs="+", metavar="FIXTURE.json")
    p.add_argument("--atol", type=float, default=None, help="absolute tolerance (default: by fixture variant)")
    p.add_argument("--rtol", type=float, default=None, help="relative tolerance (default: by fixture variant)")
    p.set_defaults(func=_parity)
    b = sub.add_parser(
        "bench",
        help="tokenizer and generator speed and memory (Flux as the peer); a JSON + Markdown report",
        description="--model tokenizer (default): time the tokenizer's encode and decode on a random clip and report "
        "frames/s. --model generator: time one MMDiT training step (forward + backward, no optimizer step) on random "
        "tokens and report tokens/s, analytic FLOPs, achieved FLOP/s, MFU on a known GPU; --with-flux measures "
        "diffusers' FluxTransformer2DModel of the same shape too. --model all: both, Flux included, in one run. "
        "--out DIR writes the report: bench.json (everything measured) and bench.md (device, dtype, shapes, "
        "figures, peer figures). Times are medians of --repeats after a warm-up; peak memory is the CUDA allocator "
        "peak, or sampled process RSS on CPU, where each model runs in its own process.",
    )
    b.add_argument(
        "--model",
        choices=["tokenizer", "generator", "packing", "all"],
        default="tokenizer",
        help="packing: sequence packing vs bucketing on a mixed-shape set (generator preset); all: every one, the "
        "generator with its Flux peer (default tokenizer)",
    )
    b.add_argument(
        "--preset",
        default=None,
        help="tokenizer preset (default f32t4c128) or generator preset: debug (default), mid, 2b, 11b, 11b-dcae",
    )
    b.add_argument(
        "--frames",
        type=int,
        default=None,
        help="clip frames (tokenizer default 8; generator: with --size, sets the token grid, default 1)",
    )
    b.add_argument(
        "--size",
        type=int,
        default=None,
        help="square frame side in pixels (tokenizer default 128; generator: with --frames, default 256)",
    )
    b.add_argument("--seq", type=int, default=None, help="generator: image tokens (default 256)")
    b.add_argument("--txt-len", type=int, default=None, help="generator: text tokens (default 64)")
    b.add_argument("--batch", type=int, default=1)
    b.add_argument("--repeats", type=int, default=3)
    b.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    b.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    b.add_argument(
        "--with-flux", action="store_true", help="generator: also measure diffusers' Flux transformer of the same shape"
    )
    b.add_argument(
        "--compile",
        action="store_true",
        help="also measure the regional torch.compile path (compile_blocks) side by side with eager, and its "
        "compile time",
    )
    b.add_argument("--tokenizer-preset", help="--model all: tokenizer preset (default f32t4c128)")
    b.add_argument("--generator-preset", help="--model all: generator preset (default debug); its tokens: --seq")
    b.add_argument("--json", help="also write the raw result here")
    b.add_argument("--out", metavar="DIR", help="write the report (bench.json + bench.md) into this folder")
    b.add_argument("--overwrite", action="store_true", help="replace an existing report in --out")
    b.set_defaults(func=_bench)
    recon.add_cli(sub)
    vbench.add_cli(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
