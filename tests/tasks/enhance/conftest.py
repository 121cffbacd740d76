"""One torch thread for the enhance tests: their convolutions are tiny, and on a shared 2-core machine two OpenMP
threads waiting on each other made a training step ~100x slower than one thread."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
