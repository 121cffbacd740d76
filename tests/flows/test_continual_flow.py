"""The federated flow end to end on the Flower Simulation Engine: the first run registers and promotes a model
whose site state stays at the sites; a rerun on unchanged data trains nothing; a new labelled scan trains again,
warm-started from the promoted model; the diagnose stage then uses the site's fine-tuned model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from schemas.diagnose import DiagnoseConfig
from schemas.federation import FederationConfig
from schemas.stages import StageName, StageState
from tasks.diagnose.site_models import load_site_state
from tasks.federated.data import write_site_surrogates
from tasks.registry import ModelRegistry
from tasks.stages import run_scan_stage
from tasks.storage import SiteStore
from tests.tasks.federated.conftest import make_site, synthetic_scans


def _with_volumes(store) -> None:
    """Give each stand-in scan a volume (what labels are checked against), as ingest would."""
    import dask.array as da

    from tasks.federated.data import StandInSurrogateConfig
    from tasks.storage import StageOutput

    for scan in SiteStore.open(store).scans():
        x = np.asarray(scan.array("surrogate")[...])
        scan.run_stage(
            stage="ingest",
            config=StandInSurrogateConfig(kind="stand-in volume"),
            outputs=[StageOutput("volume", da.from_array(x), ("slice", "y", "x"))],
        )


def _decisions_in_api(since) -> tuple[list[str], list[str]]:
    """The ``fedscan.model.*`` events and the model-decision artifacts the Prefect API holds (polled: the server
    writes events in batches)."""
    import asyncio
    import time
    from datetime import UTC, datetime

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.events.filters import EventFilter, EventNameFilter, EventOccurredFilter
    from prefect.events.worker import EventsWorker

    async def read() -> tuple[list[str], list[str]]:
        async with get_client() as client:
            page = await client.read_events(
                filter=EventFilter(
                    occurred=EventOccurredFilter(since=since, until=datetime.now(UTC)),
                    event=EventNameFilter(prefix=["fedscan.model."]),
                ),
                limit=50,
            )
            arts = await client.read_artifacts(
                artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["fedscan-model-decision"]))
            )
        return [e.event for e in page.events], [str(a.data) for a in arts]

    EventsWorker.drain_all()
    deadline = time.monotonic() + 60
    events, artifacts = asyncio.run(read())
    while not events and time.monotonic() < deadline:
        time.sleep(3)
        events, artifacts = asyncio.run(read())
    return events, artifacts


@pytest.mark.slow
@pytest.mark.integration
def test_continual_training_trains_once_per_new_data_and_warm_starts(tmp_path, prefect_harness):
    from flows.federated import FederatedRequest, federated_training

    root = tmp_path / "data"
    root.mkdir()
    stores = [make_site(root / f"{s}.zarr", s, k, n_scans=3, n_slices=8) for k, s in enumerate("AB")]
    for store in stores:
        _with_volumes(store)
    config = FederationConfig(
        num_rounds=2, local_epochs=1, base_channels=4, personalisation_epochs=1, round_timeout_s=240
    )
    request = FederatedRequest(data_root=str(root), config=config)

    from datetime import UTC, datetime

    since = datetime.now(UTC)
    first = federated_training(request)
    assert first.status == "finished:completed" and first.model["outcome"] == "promoted", first.model
    registry = ModelRegistry.for_data_root(str(root))
    card = registry.current()
    assert card is not None and card.version == first.model["version"] and card.parent is None
    assert {s.site_id for s in card.sites} == {"A", "B"} and all("auc" in s.validation for s in card.sites)
    for store in stores:  # each site kept its own state of the promoted model; nothing of it is in the registry
        assert load_site_state(str(store), version=card.version, prefer_personal=False)[0] == "site"
        assert load_site_state(str(store), version=card.version, prefer_personal=True)[0] == "personal"

    events, artifacts = _decisions_in_api(since)
    assert events == ["fedscan.model.promoted"]
    assert any(f"Model {card.version}: promoted" in a and "| A |" in a for a in artifacts)

    second = federated_training(request)
    assert second.status == "skipped" and "nothing to train" in second.model["reason"]
    assert registry.versions() == [card.version]

    scan = SiteStore.open(stores[0]).scan("scan-0")
    run = run_scan_stage(scan, StageName.DIAGNOSE, DiagnoseConfig(), device=torch.device("cpu"))
    assert run.state is StageState.DONE and run.record.metrics["adaptation"] == "personal"
    assert run.record.metrics["model_version"] == card.version

    write_site_surrogates(
        root / "C.zarr", site_id="C", scans=synthetic_scans(np.random.default_rng(9), n_scans=2, n_slices=8)
    )
    _with_volumes(root / "C.zarr")
    third = federated_training(request)
    assert third.status == "finished:completed"
    newer = registry.card(third.model["version"])
    assert newer.warm_start and newer.parent == card.version
    assert sorted(newer.training_data) == ["A", "B", "C"]
