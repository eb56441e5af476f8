"""The installed `cinedit` command: dispatch, help for every subcommand, clear errors."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cinedit.cli import commands, main

BIN = Path(sys.executable).parent


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "cinedit"), *args], capture_output=True, text=True, timeout=120)


def test_namespace_layout():
    # Every code folder installs under the one `cinedit` namespace.
    for name, folder in [
        ("configs", "configs"),
        ("data", "data"),
        ("tokenizer", "tokenizer"),
        ("generator", "generator"),
        ("eval", "eval"),
        ("runtime", "runtime"),
        ("demo", "demo"),
    ]:
        mod = importlib.import_module(f"cinedit.{name}")
        assert Path(mod.__file__).parent.name == folder
    assert not importlib.util.find_spec("data") or "site-packages" not in str(importlib.util.find_spec("data").origin)


def test_console_script_help():
    res = run("--help")
    assert res.returncode == 0 and "data" in res.stdout and "demo" in res.stdout
    res = run("nonsense")
    assert res.returncode == 2 and "unknown command 'nonsense'" in res.stderr


@pytest.mark.parametrize("cmd", ["index", "filter", "sample", "cache", "bench"])
def test_data_subcommand_help(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main(["data", cmd, "--help"])
    assert e.value.code == 0
    assert cmd in capsys.readouterr().out


def test_every_available_command_has_help():
    for name in commands():
        res = run(name, "--help")
        assert res.returncode == 0, (name, res.stderr[-2000:])


def test_module_entry_point():
    res = subprocess.run(
        [sys.executable, "-m", "cinedit", "--version"], capture_output=True, text=True, env={**os.environ}, timeout=60
    )
    assert res.returncode == 0 and res.stdout.startswith("cinedit ")
