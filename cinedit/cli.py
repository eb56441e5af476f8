"""The `cinedit` command: dispatches `cinedit SUBSYSTEM COMMAND ...` to the modules that implement each command.

This is the roof: it names modules of every layer. A command lives in the lowest layer that has what it needs,
so `cinedit data cache` (it needs the tokenizer and the text encoders) is implemented in the generator layer and
only grouped under `data` here. Modules are imported when their group runs, so `cinedit --help` stays fast.
"""

from __future__ import annotations

import importlib
import sys

from cinedit import __version__

# subsystem -> (one-line help, description, modules that each register their subcommand(s) with `add_cli`)
GROUPS = {
    "data": (
        "index, score, filter and build datasets (sample data included)",
        "Build and curate video datasets.",
        [
            "cinedit.data.index",
            "cinedit.data.filter",
            "cinedit.data.score",
            "cinedit.data.sample",
            "cinedit.data.control",
            "cinedit.generator.cache_cmd",
            "cinedit.data.bench",
        ],
    ),
    "tokenizer": (
        "Video DC-AE (and the release's HunyuanVideo VAE, Flux AE): reconstruct, encode, decode, train",
        "The Video DC-AE tokenizer.",
        ["cinedit.tokenizer.train", "cinedit.tokenizer.commands"],
    ),
    "generator": (
        "MMDiT: train, sample, merge-lora",
        "The MMDiT video generator.",
        ["cinedit.generator.train", "cinedit.generator.generate", "cinedit.generator.lora"],
    ),
}
# subsystem -> (module with `main(argv) -> int`, one-line help)
MAINS = {
    "eval": ("cinedit.eval.cli", "reconstruction reports, VBench, benchmarks, parity"),
    "demo": ("cinedit.demo", "run the whole pipeline on the bundled sample data"),
}


def group_main(name: str, argv: list[str] | None = None) -> int:
    """`cinedit <name> ...` for a command group of `GROUPS`."""
    from cinedit.runtime.cli import command_group, run_group  # here, not at the top: keeps `cinedit --help` fast

    _, description, modules = GROUPS[name]
    return run_group(command_group(f"cinedit {name}", description, modules), argv)


def commands() -> dict[str, str]:
    """Every subsystem with its one-line help, in the order `cinedit --help` lists them."""
    return {**{k: v[0] for k, v in GROUPS.items()}, **{k: v[1] for k, v in MAINS.items()}}


def usage() -> str:
    lines = ["usage: cinedit COMMAND [ARGS...]", "", "commands:"]
    for name, help_ in commands().items():
        lines.append(f"  {name:<10} {help_}")
    lines += ["", "`cinedit COMMAND --help` describes each command."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if argv[0] in ("-V", "--version"):
        print(f"cinedit {__version__}")
        return 0
    if argv[0] in GROUPS:
        return group_main(argv[0], argv[1:])
    if argv[0] in MAINS:
        from cinedit.runtime.cli import run_command  # here, not at the top: keeps `cinedit --help` fast

        module = importlib.import_module(MAINS[argv[0]][0])
        return run_command(lambda _: module.main(argv[1:]), None, f"cinedit {argv[0]}")
    print(f"cinedit: unknown command {argv[0]!r}\n\n{usage()}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
