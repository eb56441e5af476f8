"""`cinedit tokenizer ...`: train the Video DC-AE, and reconstruct / encode / decode with it."""

from __future__ import annotations

import argparse
import sys

from cinedit.cli import command_group, run_group

COMMAND_MODULES = [
    "cinedit.tokenizer.train",
    "cinedit.tokenizer.commands",
]


def build_parser() -> argparse.ArgumentParser:
    return command_group("cinedit tokenizer", "The Video DC-AE tokenizer.", COMMAND_MODULES)


def main(argv: list[str] | None = None) -> int:
    return run_group(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
