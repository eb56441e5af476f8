"""Shared fixtures: the sample dataset is built once per test session."""

from __future__ import annotations

import pytest

from cinedit.data.sample import build_sample_data


@pytest.fixture(scope="session")
def sample_data(tmp_path_factory):
    """The real sample dataset (clips + photographs + captions) and its index: (folder, meta path)."""
    root = tmp_path_factory.mktemp("sample_data")
    meta = build_sample_data(root, overwrite=True, progress=False)
    return root, meta
