"""Fixtures shared by every test module."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models run several times faster on one intra-op thread (no spinning on busy cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _seed():
    """Adapters are initialised from the global RNG: fix it so every test is deterministic."""
    torch.manual_seed(0)
