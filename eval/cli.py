"""`cinedit eval ...`: parity checks against the reference fixtures and benchmarks (reports to come)."""

from __future__ import annotations

import argparse
import sys


def _parity(args: argparse.Namespace) -> int:
    import torch

    from cinedit.eval.parity import FixtureError, check_fixture

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


def _bench(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from cinedit.eval.bench import bench_tokenizer

    res = bench_tokenizer(args.preset, args.frames, args.size, args.batch, args.repeats, args.device, args.dtype)
    print(
        f"tokenizer {res['preset']} ({res['params_m']}M params), input {res['shape']}, {res['device']}, {res['dtype']}"
    )
    for name in ("encode", "decode"):
        r = res[name]
        print(f"  {name}: {r['frames_per_s']} frames/s ({r['median_s']} s per call), peak memory +{r['peak_mb']} MB")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
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
        help="tokenizer encode / decode frames/s and peak memory",
        description="Time the tokenizer's encode and decode on a random clip (median of --repeats after a warm-up) "
        "and report frames/s and the peak memory each adds (CUDA allocator peak, or sampled process RSS on CPU).",
    )
    b.add_argument("--preset", default="f32t4c128", help="tokenizer preset (default: %(default)s)")
    b.add_argument("--frames", type=int, default=8)
    b.add_argument("--size", type=int, default=128, help="square frame side in pixels")
    b.add_argument("--batch", type=int, default=1)
    b.add_argument("--repeats", type=int, default=3)
    b.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    b.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    b.add_argument("--json", help="also write the result here")
    b.set_defaults(func=_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
