"""The diagnose stage's driver: ``surrogate`` → ``predictions`` (per-slice lesion probabilities; for the
segmentation task also ``prediction_map``, per-pixel), one Dask task per block of slices, batched forward passes
inside each, CPU or CUDA, written chunk by chunk through :meth:`~tasks.storage.ScanStore.run_stage`.

The model is the registry's promoted one (:func:`resolve_config` pins its sha256 into the stage config, so a newly
promoted model re-diagnoses each scan once, and a scan with no promoted model is ``not-applicable``), loaded with
this site's own state of it (tasks/diagnose/site_models.py): its fine-tuned model after local fine-tuning, else
its BatchNorm statistics from the run, else — for a model whose BatchNorm statistics stay at the sites and a site
that took no part — statistics re-estimated on the site's own training surrogates. Provenance names the model.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from typing import Any

import dask.array as da
import numpy as np
import numpy.typing as npt
import torch
from dask.base import tokenize
from torch import nn

from schemas.diagnose import DiagnoseConfig
from schemas.federation import FederatedTask
from schemas.registry import ModelCard
from schemas.stages import StageName
from tasks.diagnose.kernels import check_model_fits, inference_model, score_slices, slice_scores
from tasks.diagnose.site_models import load_site_state, save_site_state
from tasks.drivers import DEVICE_METRIC, Metrics
from tasks.errors import InvalidInputError
from tasks.federated.data import SURROGATE_ARRAY
from tasks.previews import Preview
from tasks.registry import ModelRegistry, registry_uri
from tasks.storage import ScanStore, SiteStore, StageOutput, StageResult

__all__ = ["PREDICTIONS", "PREDICTION_MAP", "diagnose_preview", "diagnose_scan", "resolve_config", "site_model"]

PREDICTIONS = "predictions"
PREDICTION_MAP = "prediction_map"

_MODELS: dict[tuple[str, str, str], tuple[nn.Module, str]] = {}
_MODELS_LOCK = threading.Lock()

LOG = logging.getLogger("fedscan.diagnose")


def data_root_of(site: SiteStore) -> str:
    """The folder (or URL) holding a site's store: where the registry lives by default."""
    uri = site.uri.rstrip("/")
    return uri.rsplit("/", 1)[0] if "/" in uri else "."


def _registry(site: SiteStore, config: DiagnoseConfig) -> ModelRegistry:
    return ModelRegistry(config.registry_uri or registry_uri(data_root_of(site)))


def resolve_config(scan: ScanStore, config: DiagnoseConfig) -> DiagnoseConfig | None:
    """``config`` with the model to use pinned (its sha256 and registry), or None when there is no model: no
    promoted one (and none pinned). A config that already names a sha256 is returned as it is."""
    if config.model_sha256 is not None:
        return config
    registry = _registry(scan.site, config)
    if config.model_version is not None:
        card: ModelCard | None = registry.card(config.model_version)
    else:
        card = registry.current()
    if card is None:
        return None
    if config.model_version is None and SURROGATE_ARRAY in scan.array_names():
        size = tuple(int(n) for n in scan.array(SURROGATE_ARRAY).shape[-2:])
        if size != tuple(card.input_size):  # the promoted model is not one for this scan: no model, not a failure
            LOG.warning(
                "%s: no diagnosis: the promoted model %s takes %dx%d surrogates, this scan's are %dx%d",
                f"{scan.site.site_id}/{scan.scan_id}",
                card.version,
                card.input_size[0],
                card.input_size[1],
                size[0],
                size[1],
            )
            return None
    return DiagnoseConfig.model_validate(
        {**config.model_dump(), "model_sha256": card.sha256, "registry_uri": registry.uri}
    )


def site_model(
    site: SiteStore, card: ModelCard, arrays: Mapping[str, npt.NDArray[np.float32]], *, device: torch.device
) -> tuple[nn.Module, str]:
    """The model this site diagnoses with, and how it was adapted: ``personal`` (fine-tuned here), ``site`` (this
    site's BatchNorm statistics from the run), ``recalibrated`` (statistics re-estimated now on the site's training
    surrogates, then kept) or ``global`` (the model needs no site state)."""
    from tasks.federated.data import load_site_data, split_holdout
    from tasks.federated.model import build_model, set_arrays
    from tasks.federated.training import recalibrate_batchnorm

    model = build_model(card.task, base_channels=card.base_channels, seed=0)
    saved = load_site_state(site.uri, version=card.version, prefer_personal=card.local_finetune_epochs > 0)
    if saved is not None:
        kind, state = saved
        model.load_state_dict(state)
        return model.to(device).eval(), kind
    set_arrays(model, arrays)
    if not (card.fedbn or card.local_bn_statistics):
        return model.to(device).eval(), "global"
    try:
        data = load_site_data(site.uri, task=card.task)
    except InvalidInputError as exc:
        raise InvalidInputError(
            f"model {card.version} keeps BatchNorm statistics at the sites, and site {site.site_id!r} has neither "
            f"its own statistics of it nor labelled surrogates to estimate them ({exc})"
        ) from exc
    train, _ = split_holdout(data, fraction=0.25, seed=0) if len(set(data.scan_index.tolist())) > 1 else (data, data)
    model.to(device)
    recalibrate_batchnorm(model, train.images, batch_size=16, device=device)
    save_site_state(site.uri, version=card.version, kind="site", state=model.state_dict())
    return model.eval(), "recalibrated"


def _cached_model(
    site: SiteStore, card: ModelCard, arrays: Mapping[str, npt.NDArray[np.float32]], device: torch.device
) -> tuple[nn.Module, str]:
    key = (card.sha256, site.uri, str(device))
    with _MODELS_LOCK:
        hit = _MODELS.get(key)
        if hit is None:
            model, adaptation = site_model(site, card, arrays, device=device)
            hit = _MODELS[key] = (inference_model(model), adaptation)  # BatchNorm folded: scoring only
            while len(_MODELS) > 8:
                _MODELS.pop(next(iter(_MODELS)))
    return hit


def _score_block(
    block: npt.NDArray[np.float32], *, model: nn.Module, batch_size: int, device: str, per_slice: bool
) -> npt.NDArray[np.float32]:
    p = score_slices(model, block, batch_size=batch_size, device=torch.device(device))
    return slice_scores(p) if per_slice else p


def diagnose_volume(
    surrogate: da.Array,
    model: nn.Module,
    *,
    task: FederatedTask,
    version: str,
    batch_slices: int,
    slice_block: int,
    device: torch.device,
) -> tuple[da.Array, da.Array | None]:
    """Lazy per-slice probabilities ``(n,)`` and, for segmentation, the per-pixel map ``(n, H, W)`` (no I/O)."""
    blocks = surrogate.astype(np.float32).rechunk((slice_block, -1, -1))
    common: dict[str, Any] = {"model": model, "batch_size": batch_slices, "device": str(device), "dtype": np.float32}
    token = tokenize(blocks.name, version, batch_slices, str(device))
    per_slice: da.Array = blocks.map_blocks(
        _score_block, per_slice=True, drop_axis=[1, 2], name=f"diagnose-{token}", **common
    )
    if task is FederatedTask.CLASSIFY:
        return per_slice, None
    pixel_map: da.Array = blocks.map_blocks(_score_block, per_slice=False, name=f"diagnose-map-{token}", **common)
    return per_slice, pixel_map


def diagnose_scan(
    scan: ScanStore,
    config: DiagnoseConfig,
    *,
    source: str = "surrogate",
    inputs: Mapping[str, str],
    device: torch.device,
    force: bool = False,
    progress: Callable[[float], None] | None = None,
) -> StageResult:
    """``surrogate`` → ``predictions`` (and ``prediction_map`` for segmentation), resumable; provenance names the
    model's version and sha256 and how the site adapted it."""
    if config.model_sha256 is None:  # run_scan_stage resolves the config first; a direct call may not have
        resolved = resolve_config(scan, config)
        if resolved is None:
            raise InvalidInputError(f"{scan.where}: there is no promoted model to diagnose with")
        config = resolved
    assert config.model_sha256 is not None
    registry = _registry(scan.site, config)
    card, arrays = registry.load(config.model_sha256[:16])
    if card.sha256 != config.model_sha256:
        raise InvalidInputError(f"registry model {card.version} is not the pinned {config.model_sha256[:16]}")
    surrogate = scan.read(source)
    check_model_fits(
        version=card.version,
        model_task=card.task,
        model_size=card.input_size,
        slice_shape=tuple(surrogate.shape),
        expected_task=config.task,
    )
    model, adaptation = _cached_model(scan.site, card, arrays, device)
    block = min(config.slice_block, max(1, surrogate.shape[0]))
    per_slice, pixel_map = diagnose_volume(
        surrogate,
        model,
        task=card.task,
        version=card.version,
        batch_slices=config.batch_slices,
        slice_block=block,
        device=device,
    )
    attributes: dict[str, Any] = {
        "units": "probability",
        "model_version": card.version,
        "model_sha256": card.sha256,
        "task": card.task.value,
        "threshold": config.threshold,
    }
    n = surrogate.shape[0]

    def metrics(s: ScanStore, seconds: float) -> Metrics:
        probs = np.asarray(s.array(PREDICTIONS)[...], dtype=np.float32)
        return {
            DEVICE_METRIC: device.type,
            "model_version": card.version,
            "model_sha256": card.sha256,
            "task": card.task.value,
            "adaptation": adaptation,
            "flagged_slices": int((probs >= config.threshold).sum()),
            "max_probability": round(float(probs.max()), 4) if probs.size else None,
            "slices_per_s": n / seconds if seconds > 0 else None,
        }

    outputs = [StageOutput(PREDICTIONS, per_slice, ("slice",), (block,), attributes)]
    if pixel_map is not None:
        outputs.insert(
            0,
            StageOutput(PREDICTION_MAP, pixel_map, ("slice", "y", "x"), (block, *surrogate.shape[1:]), attributes),
        )
    return scan.run_stage(
        stage=StageName.DIAGNOSE,
        config=config,
        inputs=inputs,
        outputs=outputs,
        metrics=metrics,
        force=force,
        progress=progress,
    )


def diagnose_preview(scan: ScanStore, *, most: int = 4) -> Preview | None:
    """The flagged slices (up to ``most``, highest first) as surrogate images with their scores: shareable
    (surrogates and numbers only). None when the scan has no predictions."""
    from tasks.artifacts import montage_png

    record = scan.stage_record(StageName.DIAGNOSE)
    if record is None or PREDICTIONS not in scan.array_names():
        return None
    probs = np.asarray(scan.array(PREDICTIONS)[...], dtype=np.float32)
    threshold = float(record.config.get("threshold", 0.5))
    flagged = [int(k) for k in np.argsort(-probs, kind="stable") if probs[k] >= threshold][:most]
    version = str(record.metrics.get("model_version", ""))
    n_flagged = int((probs >= threshold).sum())
    title = f"{scan.site.site_id}/{scan.scan_id}: {n_flagged} of {probs.size} slices flagged"
    if not flagged:
        return None
    surrogate = scan.array("surrogate")
    panels = [(f"slice {k}: p={probs[k]:.2f}", np.asarray(surrogate[k], dtype=np.float32)) for k in flagged]
    return Preview(title, montage_png(panels), plaintext=False, caption=f"Surrogate slices; model {version}.")


def read_prediction(scan: ScanStore) -> dict[str, Any] | None:
    """A scan's stored prediction as plain data (None when its diagnose stage has not completed)."""
    record = scan.stage_record(StageName.DIAGNOSE)
    if record is None or PREDICTIONS not in record.outputs or PREDICTIONS not in scan.array_names():
        return None
    probs = np.asarray(scan.array(PREDICTIONS)[...], dtype=np.float32)
    threshold = float(record.config.get("threshold", 0.5))
    return {
        "site": scan.site.site_id,
        "scan": scan.scan_id,
        "model_version": record.metrics.get("model_version"),
        "model_sha256": record.metrics.get("model_sha256"),
        "task": record.metrics.get("task"),
        "adaptation": record.metrics.get("adaptation"),
        "threshold": threshold,
        "probabilities": [round(float(p), 6) for p in probs],
        "flagged": [int(k) for k in np.flatnonzero(probs >= threshold)],
        "has_probability_map": PREDICTION_MAP in record.outputs,
        "finished_at": record.finished_at.isoformat(),
    }


def print_predictions(data_root: str, scans: list[str] | None, console: Any) -> None:
    """The promoted model and each ``site/scan``'s prediction (``None``: every scan of every site store in the
    local folder ``data_root``), as the demo ends (a rich console)."""
    from tasks.storage import find_site_stores, site_store_uri

    if scans is None:
        scans = [
            f"{site.site_id}/{scan_id}"
            for site in (SiteStore.open(p, mode="r") for p in find_site_stores(data_root))
            for scan_id in site.scan_ids()
        ]

    current = ModelRegistry.for_data_root(data_root).current()
    if current is None:
        console.print("no model is promoted yet: the scans have no prediction")
        return
    console.print(
        f"promoted model {current.version}: {current.task.value}, {current.metric}="
        f"{current.metric_value if current.metric_value is None else round(current.metric_value, 4)}, "
        f"{current.rounds} rounds; card: fedscan models show {current.version} --root {data_root}",
        highlight=False,
    )
    for key in scans:
        site_id, scan_id = key.split("/", 1)
        prediction = read_prediction(SiteStore.open(site_store_uri(data_root, site_id), mode="r").scan(scan_id))
        if prediction is None:
            console.print(f"  {key}: no prediction", highlight=False)
            continue
        console.print(
            f"  {key}: {len(prediction['flagged'])} of {len(prediction['probabilities'])} slices flagged, "
            f"max p={max(prediction['probabilities'], default=0.0):.3f} (model {prediction['model_version']})",
            highlight=False,
        )
