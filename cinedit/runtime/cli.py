"""Command-line helpers every subsystem's commands use: command groups and the train-command front end."""

from __future__ import annotations

import argparse
import errno
import importlib
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cinedit.configs import PRESETS, ConfigError, config_from_argv
from cinedit.runtime.dist import destroy_distributed


def command_group(prog: str, description: str, modules: list[str]) -> argparse.ArgumentParser:
    """The parser of `cinedit <subsystem>`: each module registers its subcommand(s) with `add_cli(subparsers)`
    and sets `func` (args -> exit code)."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in modules:
        importlib.import_module(name).add_cli(sub)
    return parser


# Errors of the disk rather than of the input: reported in one line (which path, and the space left), exit 1.
DISK_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT}


def disk_error(e: OSError, prog: str = "cinedit") -> str | None:
    """The one line a full disk or a read-only / forbidden output gets, or None for other errors."""
    if e.errno not in DISK_ERRNOS:
        return None
    where = e.filename or "an output file"
    folder = Path(where).parent if e.filename else Path.cwd()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        free = f"; {shutil.disk_usage(folder).free / 2**20:.0f} MiB free on that disk"
    except OSError:
        free = ""
    return f"{prog}: error: cannot write {where}: {e.strerror}{free}. Earlier outputs are intact."


def run_command(func: Callable[[argparse.Namespace], Any], args: argparse.Namespace, prog: str = "cinedit") -> int:
    """Run a parsed command; a disk error (full, read-only) becomes one clear line and exit code 1."""
    try:
        return int(func(args) or 0)
    except OSError as e:
        message = disk_error(e, prog)
        if message is None:
            raise
        print(message, file=sys.stderr)
        return 1


def run_group(parser: argparse.ArgumentParser, argv: list[str] | None) -> int:
    """Parse `argv` with a `command_group` parser and run the chosen subcommand."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv[1:]  # the subcommand's own arguments (a command that relaunches itself needs them)
    return run_command(args.func, args, parser.prog)


def add_train_cli(subparsers: Any, kind: str, fit: Callable[[Any, str], Any], help: str, description: str) -> Any:
    """Register `cinedit <kind> train PRESET_OR_RUN_DIR [--section.field=value ...]` calling `fit(cfg, name)`."""

    def run(args: argparse.Namespace) -> int:
        try:
            cfg, name = config_from_argv(kind, args.args)
            summary = fit(cfg, name)
        except ConfigError as e:
            print(f"cinedit {kind} train: error: {e}", file=sys.stderr)
            return 2
        finally:
            destroy_distributed()
        if summary:
            print(" ".join(f"{k}={v:.4g}" for k, v in sorted(summary.items())))
        return 0

    names = ", ".join(sorted(PRESETS.get(kind, {})))
    p = subparsers.add_parser(
        "train",
        help=help,
        description=f"{description} Presets: {names}; or pass a run directory to re-launch it. Overrides are "
        f"--section.field=value (--help-config lists every field); continue a run with --train.resume=auto; "
        f"torchrun launches `python -m cinedit.{kind}.train` on several processes.",
    )
    p.add_argument(
        "args", nargs=argparse.REMAINDER, metavar="PRESET_OR_RUN_DIR [--section.field=value ...] [--help-config]"
    )
    p.set_defaults(func=run)
    return p


def train_main(kind: str, add_cli: Callable[[Any], Any], argv: list[str] | None = None) -> int:
    """`python -m cinedit.<kind>.train ...`: the same command as `cinedit <kind> train ...`."""
    parser = argparse.ArgumentParser(prog=f"python -m cinedit.{kind}.train")
    add_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["train", *(sys.argv[1:] if argv is None else argv)])
    return run_command(args.func, args, parser.prog)
