"""The `cinedit` command: dispatches `cinedit SUBSYSTEM ...` to each subsystem's own `cli.py`."""

from __future__ import annotations

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
