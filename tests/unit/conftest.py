"""Shared fixtures of the unit tests."""

from __future__ import annotations

import pytest


@pytest.fixture
def one_thread():
    """2 shared CPU cores: torch's second thread spin-waits against the other test runs (10× slower)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
