"""What a site keeps of a global model: its own BatchNorm statistics (SiloBN / FedBN) or its locally fine-tuned
model, keyed by the global model's version, in the site's own store (never sent anywhere).

Files: ``<site store>/.site-models/<version>.<kind>.pt`` (a torch ``state_dict``), ``kind`` being ``site`` (the
global weights with the site's re-estimated BatchNorm statistics and FedBN layers, saved after the last round's
evaluation) or ``personal`` (after local fine-tuning). The ClientApp writes them; the diagnose stage reads them.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Mapping
from typing import Literal

import fsspec
import torch

from tasks.extras import require_store_protocol

__all__ = ["SITE_MODELS_DIR", "SiteKind", "load_site_state", "save_site_state"]

SITE_MODELS_DIR = ".site-models"
SiteKind = Literal["site", "personal"]
LOG = logging.getLogger("fedscan.diagnose.site_models")


def _path(store_uri: str, version: str, kind: SiteKind) -> tuple[fsspec.AbstractFileSystem, str]:
    if len(version) != 16 or not all(c in "0123456789abcdef" for c in version):
        raise ValueError(f"{version!r} is not a model version")
    require_store_protocol(store_uri)
    fs, root = fsspec.core.url_to_fs(str(store_uri))
    return fs, f"{root.rstrip('/')}/{SITE_MODELS_DIR}/{version}.{kind}.pt"


def save_site_state(store_uri: str, *, version: str, kind: SiteKind, state: Mapping[str, torch.Tensor]) -> str:
    """Write a site's model state for global model ``version``; returns the file's path."""
    fs, path = _path(store_uri, version, kind)
    buf = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in state.items()}, buf)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    tmp = f"{path}.tmp"
    fs.pipe_file(tmp, buf.getvalue())
    fs.mv(tmp, path)
    return str(path)


def load_site_state(
    store_uri: str, *, version: str, prefer_personal: bool
) -> tuple[SiteKind, dict[str, torch.Tensor]] | None:
    """The site's state for ``version``: the fine-tuned one first when ``prefer_personal``, else its BatchNorm
    statistics; None when the site has neither (it took no part in the run that made the model)."""
    kinds: tuple[SiteKind, ...] = ("personal", "site") if prefer_personal else ("site",)
    for kind in kinds:
        fs, path = _path(store_uri, version, kind)
        try:
            raw = fs.cat_file(path)
        except FileNotFoundError:
            continue
        state = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
        return kind, dict(state)
    return None
