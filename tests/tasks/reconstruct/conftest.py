"""Shared fixtures of the reconstruction tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """Run each test on one intra-op thread, restoring the setting after.

    The test arrays are tiny; on a shared, oversubscribed 2-core machine every parallel region of
    torch's OpenMP pool waits milliseconds for a descheduled peer thread, which made a 1-second test
    take 10 seconds without changing any result.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
