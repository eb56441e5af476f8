"""`cinedit eval ...`: parity checks against the reference fixtures (metrics, reports and benchmarks to come)."""

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
            print(f"  {r.name:<40} max abs diff {r.max_abs_diff:.3e}  (atol {r.atol:g}, rtol {r.rtol:g})  {status}")
        failed += not report.ok
    if failed:
        print(f"{failed} of {len(args.fixtures)} fixture(s) failed", file=sys.stderr)
    return 1 if failed else 0


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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
