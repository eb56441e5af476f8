"""`cinedit data ...`: index, filter, sample-data, cache and bench commands."""

from __future__ import annotations

import argparse
import sys

from cinedit.cli import command_group, run_group

COMMAND_MODULES = [
    "cinedit.data.index",
    "cinedit.data.filter",
    "cinedit.data.sample",
    "cinedit.data.cache_cmd",
    "cinedit.data.bench",
]


def build_parser() -> argparse.ArgumentParser:
    return command_group("cinedit data", "Build and curate video datasets.", COMMAND_MODULES)


def main(argv: list[str] | None = None) -> int:
    return run_group(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
