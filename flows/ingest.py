"""Flow: ingest a batch of scanner outputs into their sites' stores."""

from __future__ import annotations

from pathlib import Path

from prefect import flow
from pydantic import Field

from schemas.base import FrozenModel
from schemas.ids import SiteId
from schemas.refs import ScanRef
from schemas.settings import get_settings
from tasks.prefect_tasks import ingest_scan


class IngestRequest(FrozenModel):
    """Which sources to ingest, for which site, into which data root."""

    site_id: SiteId
    sources: tuple[Path, ...] = Field(min_length=1)
    data_root: str | None = Field(default=None, description="Folder or fsspec URL; None: FEDSCAN_DATA_ROOT.")


@flow(name="ingest-scans", flow_run_name="ingest-{request.site_id}", log_prints=False)
def ingest_scans(request: IngestRequest) -> list[ScanRef]:
    """Ingest every source of one site; one task per scan."""
    data_root = request.data_root or get_settings().data_root
    futures = [ingest_scan.submit(src, site_id=request.site_id, data_root=data_root) for src in request.sources]
    return [f.result() for f in futures]
