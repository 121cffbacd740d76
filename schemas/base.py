"""Shared base classes of fedscan's schemas."""

from __future__ import annotations

import hashlib
import json

from pydantic import BaseModel, ConfigDict


class FrozenModel(BaseModel):
    """Immutable model that refuses unknown fields (every external input is parsed into one)."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class StageConfig(FrozenModel):
    """Configuration of one pipeline stage; its hash keys caching, skipping and provenance."""

    @property
    def enabled(self) -> bool:
        """Whether the stage runs at all under this config (an optional stage's config turns it off); a stage
        that is off is reported ``disabled`` and what it wrote earlier is not read downstream."""
        return True

    def config_hash(self) -> str:
        """First 16 hex digits of the sha256 of the canonical JSON of this config."""
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]
