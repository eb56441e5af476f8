"""Shared fixtures: the sample dataset is built once per test session; the parity fixtures of ../shared/fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from cinedit.data.sample import build_sample_data

# The reference's parity fixtures, next to the checkout (`../shared/fixtures`). Tests that read them are marked with
# `needs_fixtures(...)`: skipped where the folder is missing, a failure in CI (`CI=true`, exported by .ci/run).
FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures"


def needs_fixtures(*names: str) -> pytest.MarkDecorator:
    """Mark a test that reads the fixtures `names` (file names or globs inside FIXTURES, at least one match each)."""
    if not names:
        raise ValueError("needs_fixtures: name the fixture files the test reads")
    return pytest.mark.parity_fixtures(*names)


def missing_fixtures(*names: str) -> list[str]:
    return [name for name in names if not any(FIXTURES.glob(name))]


def pytest_configure(config):
    config.addinivalue_line("markers", "parity_fixtures(*names): reads these files of ../shared/fixtures")
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers:
        # An xdist worker (`-n N` in pyproject's addopts) shares the cores with the others: more torch threads than
        # free cores make every parallel region wait for a descheduled thread (2x slower conv3d steps on 2 cores).
        # The processes a test starts (torchrun, the CLI) inherit the share through OMP_NUM_THREADS.
        share = max(1, (os.cpu_count() or 1) // int(workers))
        torch.set_num_threads(share)
        os.environ["OMP_NUM_THREADS"] = str(share)


# Modules whose tests take minutes in all (multi-process training, the demo): run first, so that with `-n N` the
# other workers fill the time around them instead of waiting for one of them at the end.
FIRST = ("test_scaleout.py", "test_demo.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(FIRST)))


def pytest_runtest_setup(item):
    for mark in item.iter_markers("parity_fixtures"):
        missing = missing_fixtures(*mark.args)
        if not missing:
            continue
        if os.environ.get("CI") == "true":
            pytest.fail(
                f"../shared/fixtures is missing {', '.join(missing)}: CI must have the parity fixtures "
                f"(looked in {FIXTURES})",
                pytrace=False,
            )
        pytest.skip(f"parity fixtures not found: {', '.join(missing)} in {FIXTURES}")


@pytest.fixture(scope="session")
def sample_data(tmp_path_factory):
    """The real sample dataset (clips + photographs + captions) and its index: (folder, meta path)."""
    root = tmp_path_factory.mktemp("sample_data")
    meta = build_sample_data(root, overwrite=True, progress=False)
    return root, meta


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module's tests (`pytestmark = pytest.mark.usefixtures("one_thread")`)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def train_generator_debug(out: Path, meta: Path, steps: int, *extra: str) -> int:
    """`cinedit generator train debug` on `meta` into `out`, checkpoints every 2 steps, no evaluation."""
    from cinedit.cli import main

    argv = ["generator", "train", "debug", f"--data.meta={meta}", f"--train.out_dir={out}", "--train.progress=false"]
    return main([*argv, f"--train.steps={steps}", "--train.ckpt_every=2", "--train.eval_every=0", *extra])


@pytest.fixture(scope="session")
def debug_generator_run(sample_data, tmp_path_factory) -> Path:
    """A finished 4-step `debug` generator run with checkpoints at steps 2 and 4 (copy it before changing it)."""
    out = tmp_path_factory.mktemp("generator_run") / "run"
    assert train_generator_debug(out, sample_data[1], 4) == 0
    return out
