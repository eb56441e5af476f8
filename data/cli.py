"""`cinedit data ...`: index, filter, sample-data, cache and bench commands."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    from cinedit.data import bench, cache_cmd, index, sample
    from cinedit.data import filter as filter_

    parser = argparse.ArgumentParser(prog="cinedit data", description="Build and curate video datasets.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # Each module registers its own subcommand and sets `func` (args -> exit code).
    for module in (index, filter_, sample, cache_cmd, bench):
        module.add_cli(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
