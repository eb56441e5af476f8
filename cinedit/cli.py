"""The `cinedit` command: dispatches `cinedit SUBSYSTEM ...` to each subsystem's own `cli.py`."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

# subsystem -> (module with `main(argv) -> int`, one-line help)
SUBSYSTEMS = {
    "data": ("cinedit.data.cli", "index, filter and build datasets (sample data included)"),
    "tokenizer": ("cinedit.tokenizer.cli", "Video DC-AE: reconstruct, encode, decode, train"),
    "generator": ("cinedit.generator.cli", "MMDiT: train, sample"),
    "eval": ("cinedit.eval.cli", "reconstruction reports, VBench, benchmarks, parity"),
    "demo": ("cinedit.demo", "run the whole pipeline on the bundled sample data"),
}


def command_group(prog: str, description: str, modules: list[str]) -> argparse.ArgumentParser:
    """The parser of `cinedit <subsystem>`: each module registers its subcommand(s) with `add_cli(subparsers)`
    and sets `func` (args -> exit code)."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in modules:
        importlib.import_module(name).add_cli(sub)
    return parser


def run_group(parser: argparse.ArgumentParser, argv: list[str] | None) -> int:
    """Parse `argv` with a `command_group` parser and run the chosen subcommand."""
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


def available() -> dict[str, tuple[str, str]]:
    """The subsystems whose command module is installed (later subsystems land one by one)."""
    return {k: v for k, v in SUBSYSTEMS.items() if importlib.util.find_spec(v[0]) is not None}


def usage() -> str:
    lines = ["usage: cinedit COMMAND [ARGS...]", "", "commands:"]
    for name, (_, help_) in available().items():
        lines.append(f"  {name:<10} {help_}")
    lines += ["", "`cinedit COMMAND --help` describes each command."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from cinedit import __version__

        print(f"cinedit {__version__}")
        return 0
    cmds = available()
    if argv[0] not in cmds:
        print(f"cinedit: unknown command {argv[0]!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(cmds[argv[0]][0])
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
