"""Shared base classes of fedscan's schemas, and the one loader of YAML files into them."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

M = TypeVar("M", bound=BaseModel)


class YamlFileError(ValueError):
    """A YAML file that cannot be read or validated; the message names the file and the key."""


def describe_validation_error(exc: ValidationError, *, limit: int = 3) -> str:
    """The first ``limit`` errors, each as ``location: message`` (an unknown key as ``unknown key 'a.b'``)."""
    parts = []
    for err in exc.errors()[:limit]:
        loc = ".".join(str(part) for part in err["loc"]) or "(top level)"
        parts.append(f"unknown key {loc!r}" if err["type"] == "extra_forbidden" else f"{loc}: {err['msg']}")
    return "; ".join(parts)


def load_yaml_model(model: type[M], path: str | Path, *, what: str, error: type[ValueError] = YamlFileError) -> M:
    """Parse a YAML mapping file into ``model``; a file that cannot be read, is not a mapping or does not
    validate raises ``error`` with one line naming the file (and the key)."""
    p = Path(path)
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise error(f"{p}: cannot read the {what} ({exc})") from exc
    if not isinstance(raw, dict):
        raise error(f"{p}: the {what} must be a YAML mapping, got {type(raw).__name__}")
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise error(f"{p}: invalid {what}: {describe_validation_error(exc)}") from exc


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

    @property
    def reads_labels(self) -> bool:
        """Whether the stage's output depends on the scan's labels under this config: the labels' lineage is then
        one of its inputs, so relabelling a scan makes the stage pending."""
        return False

    def config_hash(self) -> str:
        """First 16 hex digits of the sha256 of the canonical JSON of this config."""
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]
