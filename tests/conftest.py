"""Shared fixtures: the sample dataset is built once per test session."""

from __future__ import annotations

import pytest
import torch

from cinedit.data.sample import build_sample_data


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
