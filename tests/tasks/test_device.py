"""Device resolution's companion: results back to numpy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tasks.device import to_numpy


def test_to_numpy_on_the_cpu_is_the_tensors_own_memory_and_dtype() -> None:
    t = torch.arange(6, dtype=torch.float64).reshape(2, 3)
    a = to_numpy(t)
    assert a.dtype == np.float64
    assert np.shares_memory(a, t.numpy())
    with_grad = torch.ones(3, requires_grad=True) * 2.0  # needs detaching before numpy
    np.testing.assert_array_equal(to_numpy(with_grad), [2.0, 2.0, 2.0])


@pytest.mark.gpu
def test_to_numpy_from_a_gpu_lands_in_page_locked_memory_that_stays_valid() -> None:
    t = torch.randn(64, 128, device="cuda")
    expected = t.cpu().numpy().copy()
    a = to_numpy(t)
    assert a.dtype == np.float32
    assert torch.from_numpy(a).is_pinned()
    del t
    for _ in range(3):  # later same-sized results must not reuse the buffer the array still holds
        b = to_numpy(torch.zeros(64, 128, device="cuda"))
        assert not np.shares_memory(a, b)
    np.testing.assert_array_equal(a, expected)
