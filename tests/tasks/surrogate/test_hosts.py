"""The public host pool and the host policies: sizes, ranges, determinism, per-slice independence."""

from __future__ import annotations

import numpy as np
import pytest

from schemas.surrogate import HostPolicy
from tasks.errors import InvalidInputError
from tasks.surrogate.hosts import (
    HOST_NAMES,
    check_labels,
    hosts_for_slices,
    load_host,
    resolve_pool,
    select_host_indices,
)


@pytest.mark.parametrize("name", ["shepp_logan", "ellipses_0", "camera", "astronaut", "text"])
@pytest.mark.parametrize("shape", [(32, 32), (21, 40)])
def test_hosts_render_at_any_size_in_unit_range(name, shape):
    h = load_host(name, shape)
    assert h.shape == shape and h.dtype == np.float32
    assert h.min() == pytest.approx(0.0) and h.max() == pytest.approx(1.0)
    assert h.std() > 0.05  # not a flat image
    assert not h.flags.writeable  # cached: callers cannot corrupt it


def test_pool_hosts_differ():
    stack = np.stack([load_host(n, (24, 24)) for n in HOST_NAMES])
    flat = stack.reshape(len(HOST_NAMES), -1)
    corr = np.corrcoef(flat)
    off = corr[~np.eye(len(HOST_NAMES), dtype=bool)]
    assert off.max() < 0.99


def test_pool_resolution_refuses_empty_and_unknown():
    assert resolve_pool(None) == HOST_NAMES
    with pytest.raises(InvalidInputError, match="empty"):
        resolve_pool(())
    with pytest.raises(InvalidInputError, match="'patient_7'"):
        resolve_pool(("camera", "patient_7"))
    with pytest.raises(InvalidInputError, match="empty"):
        select_host_indices(np.arange(3), policy="fixed", seed=0, site_id="A", n_hosts=0)
    with pytest.raises(InvalidInputError, match="shape"):
        load_host("camera", (1, 5))


def test_fixed_policy_one_host_per_site_depends_on_seed():
    idx = np.arange(50)
    a = select_host_indices(idx, policy=HostPolicy.FIXED, seed=3, site_id="A", n_hosts=19)
    assert np.unique(a).size == 1
    per_site = {int(select_host_indices(idx[:1], policy="fixed", seed=3, site_id=s, n_hosts=19)[0]) for s in "ABCDEFGH"}
    per_seed = {
        int(select_host_indices(idx[:1], policy="fixed", seed=s, site_id="A", n_hosts=19)[0]) for s in range(12)
    }
    assert len(per_site) > 1 and len(per_seed) > 1


def test_random_policy_is_per_slice_and_chunk_invariant():
    idx = np.arange(40)
    whole = select_host_indices(idx, policy="random", seed=7, site_id="B", n_hosts=19)
    parts = np.concatenate(
        [
            select_host_indices(idx[a:b], policy="random", seed=7, site_id="B", n_hosts=19)
            for a, b in [(0, 3), (3, 17), (17, 40)]
        ]
    )
    np.testing.assert_array_equal(whole, parts)
    assert np.unique(whole).size > 5
    other = select_host_indices(idx, policy="random", seed=8, site_id="B", n_hosts=19)
    assert (other != whole).any()


def test_per_class_policy_one_host_per_label():
    labels = np.array([0, 1, 1, 0, 2, 1])
    got = select_host_indices(np.arange(6), policy="per_class", seed=1, site_id="C", n_hosts=19, labels=labels)
    for lab in range(3):
        assert np.unique(got[labels == lab]).size == 1
    assert np.unique(got).size == 3
    with pytest.raises(InvalidInputError, match="needs the slice labels"):
        select_host_indices(np.arange(6), policy="per_class", seed=1, site_id="C", n_hosts=19)


def test_hosts_for_slices_shapes():
    one = hosts_for_slices(np.arange(4), shape=(16, 16), policy="fixed", seed=0, site_id="A")
    assert one.shape == (16, 16)
    many = hosts_for_slices(np.arange(30), shape=(16, 16), policy="random", seed=0, site_id="A")
    assert many.shape == (30, 16, 16)


def test_labels_checked():
    np.testing.assert_array_equal(check_labels([0, 1, 1], n_slices=3), [0, 1, 1])
    np.testing.assert_array_equal(check_labels(np.array([True, False]), n_slices=2), [1, 0])
    with pytest.raises(InvalidInputError, match=r"expected shape \(4,\), got \(3,\)"):
        check_labels([0, 1, 1], n_slices=4)
    with pytest.raises(InvalidInputError, match="slice 1 is nan"):
        check_labels(np.array([0.0, np.nan]), n_slices=2)
    with pytest.raises(InvalidInputError, match="slice 0"):
        check_labels(np.array([-1, 0]), n_slices=2)
