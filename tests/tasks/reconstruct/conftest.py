"""Shared fixtures of the reconstruction tests: one torch thread each (see tests/conftest.py)."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _one_torch_thread(one_torch_thread) -> None:
    """Every test here runs on one torch thread."""
