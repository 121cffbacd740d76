"""Small references passed between Prefect tasks (never arrays)."""

from __future__ import annotations

from pydantic import Field

from schemas.base import FrozenModel
from schemas.ids import ScanId, SiteId


class ScanRef(FrozenModel):
    """Where one scan lives: a site store (path or fsspec URL) and the scan id inside it."""

    store_uri: str = Field(min_length=1, description="The site's Zarr store (local path or fsspec URL).")
    site_id: SiteId
    scan_id: ScanId

    def __str__(self) -> str:
        return f"{self.site_id}/{self.scan_id}"


class StageReport(FrozenModel):
    """What one stage did to one scan (for flow reports and UI tables)."""

    scan: ScanRef
    stage: str
    skipped: bool = Field(description="True when a complete result with the same config hash existed.")
    config_hash: str
    seconds: float = Field(ge=0)
    chunks_written: int = Field(ge=0)
    chunks_resumed: int = Field(ge=0)
    metrics: dict[str, float | int | str | bool | None] = Field(default_factory=dict)
