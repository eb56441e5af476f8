"""`cinedit generator ...`: train the MMDiT and sample from it."""

from __future__ import annotations

import argparse
import importlib
import sys

# Modules beside `train` that register subcommands with `add_cli(subparsers)`, once they exist.
OPTIONAL_COMMAND_MODULES = ("cinedit.generator.generate",)  # sample


def build_parser() -> argparse.ArgumentParser:
    from cinedit.generator import train

    parser = argparse.ArgumentParser(prog="cinedit generator", description="The MMDiT video generator.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    modules = [train]
    for name in OPTIONAL_COMMAND_MODULES:
        try:
            modules.append(importlib.import_module(name))
        except ModuleNotFoundError as e:
            if e.name != name:  # the module exists but one of its imports is missing: a real error
                raise
    # Each module registers its own subcommand(s) and sets `func` (args -> exit code).
    for module in modules:
        if hasattr(module, "add_cli"):  # a command module still being written registers nothing yet
            module.add_cli(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
