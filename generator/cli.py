"""`cinedit generator ...`: train the MMDiT and sample from it."""

from __future__ import annotations

import argparse
import sys

from cinedit.cli import command_group, run_group

COMMAND_MODULES = [
    "cinedit.generator.train",
    "cinedit.generator.generate",
]


def build_parser() -> argparse.ArgumentParser:
    return command_group("cinedit generator", "The MMDiT video generator.", COMMAND_MODULES)


def main(argv: list[str] | None = None) -> int:
    return run_group(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
