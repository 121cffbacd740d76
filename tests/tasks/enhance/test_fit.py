"""A site's local fit from its own store, and two rounds of in-process FedAvg over two tiny sites (not Flower):
weights averaged by examples, a diverged site rejected and named, every site diverged → no model."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from tasks.enhance.fit import FitConfig, average_states, fedavg_in_process, fit_enhance, site_pairs
from tasks.enhance.model import Architecture
from tasks.enhance.training import TrainSettings
from tasks.errors import InvalidInputError, TrainingDivergedError
from tasks.storage import SiteStore
from tests.flows.test_pipeline_flows import make_site

CONFIG = FitConfig(arch=Architecture(channels=4, depth=1), settings=TrainSettings(steps=4, batch_size=2), seed=3)


@pytest.fixture(scope="module")
def two_sites(tmp_path_factory: pytest.TempPathFactory) -> list[SiteStore]:
    root = tmp_path_factory.mktemp("fed")
    return [
        make_site(root, site_id="A", rows=2, cols=32, views=32, i0=5e4, seed=0),
        make_site(root, site_id="B", rows=3, cols=32, views=48, i0=5e3, seed=1),  # another view count and dose
    ]


def test_average_states_weights_by_examples() -> None:
    a = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(4)}
    b = {"w": torch.tensor([3.0, 6.0]), "n": torch.tensor(8)}
    avg = average_states([a, b], [1.0, 3.0])
    torch.testing.assert_close(avg["w"], torch.tensor([2.5, 5.0]))
    assert avg["n"].dtype == torch.int64 and int(avg["n"]) == 7
    with pytest.raises(InvalidInputError, match="nothing to average"):
        average_states([], [])


def test_site_pairs_come_from_the_sites_own_scans(two_sites: list[SiteStore], tmp_path: Path) -> None:
    x, y = site_pairs(two_sites[1], CONFIG)
    assert x.shape == y.shape == (2 * 3, 32, 32)  # K = 2 splits x 3 slices
    from tests.tasks.test_stages import add_image_scan

    images_only = SiteStore.create(tmp_path / "H.zarr", site_id="H")
    add_image_scan(images_only, size=32)
    with pytest.raises(InvalidInputError, match="site 'H' has no projection scans"):
        site_pairs(images_only, CONFIG)
    with pytest.raises(InvalidInputError, match="site 'A' has no projection scans with counts"):
        site_pairs(two_sites[0], FitConfig(target="thinning"))  # make_site keeps no counts array


def test_fit_starts_from_the_global_weights(two_sites: list[SiteStore]) -> None:
    pairs = site_pairs(two_sites[0], CONFIG)
    fresh, metrics = fit_enhance(two_sites[0], None, CONFIG, pairs=pairs)
    again, _ = fit_enhance(two_sites[0], fresh, CONFIG, pairs=pairs)
    assert metrics["examples"] == 4 and metrics["steps"] == 4
    assert any(not torch.equal(fresh[k], again[k]) for k in fresh)
    same, _ = fit_enhance(two_sites[0], None, CONFIG, pairs=pairs)
    assert all(torch.allclose(fresh[k], same[k], atol=1e-6) for k in fresh)  # deterministic per seed


def test_two_rounds_of_fedavg_over_two_sites(two_sites: list[SiteStore]) -> None:
    result = fedavg_in_process(two_sites, CONFIG, rounds=2)
    assert [r["round"] for r in result.rounds] == [0, 1] and all(r["sites"] == 2 for r in result.rounds)
    assert result.rejected == []
    assert all(torch.isfinite(v).all() for v in result.state.values() if v.is_floating_point())
    # the last round's aggregate is the example-weighted mean of the two sites' updates from round 1's start
    pairs = [site_pairs(s, CONFIG) for s in two_sites]
    one_round = fedavg_in_process(two_sites, CONFIG, rounds=1, pairs=pairs).state
    updates = [
        fit_enhance(s, one_round, replace(CONFIG, seed=CONFIG.seed * 1000 + 1), pairs=p)[0]
        for s, p in zip(two_sites, pairs, strict=True)
    ]
    expected = average_states(updates, [4.0, 6.0])
    for k in expected:
        torch.testing.assert_close(result.state[k], expected[k], atol=1e-5, rtol=1e-5)


def test_a_diverged_site_is_rejected_by_name_and_all_diverged_is_no_model(two_sites: list[SiteStore]) -> None:
    good = site_pairs(two_sites[0], CONFIG)
    x, _ = site_pairs(two_sites[1], CONFIG)
    poisoned = (x, np.full_like(x, 3e38))  # an infinite loss at B's first step
    result = fedavg_in_process(two_sites, CONFIG, rounds=2, pairs=[good, poisoned])
    assert len(result.rejected) == 2 and all("site 'B'" in r and "loss is inf" in r for r in result.rejected)
    assert all(r["sites"] == 1 for r in result.rounds)
    with pytest.raises(TrainingDivergedError, match="every site diverged"):
        fedavg_in_process(two_sites, CONFIG, rounds=1, pairs=[poisoned, poisoned])
