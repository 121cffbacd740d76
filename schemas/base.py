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

    def config_hash(self) -> str:
        """First 16 hex digits of the sha256 of the canonical JSON of this config."""
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]
