"""One torch thread for every enhance test (see tests/conftest.py: tiny convolutions on a shared 2-core machine)."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _one_torch_thread(one_torch_thread) -> None:
    """Every test here runs on one torch thread."""
