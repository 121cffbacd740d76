"""The enhance task (upstream learned reconstruction) in the federated apps: what differs from the lesion tasks.

* **ClientApp side** (:func:`train`, :func:`evaluate`, :func:`personalise`, called from a branch in
  :mod:`tasks.federated.client_app`): each site builds its training pairs inside the site from its own projection
  scans (:func:`tasks.enhance.fit.site_pairs`: Noise2Inverse view splits or complementary binomial thinning),
  holds out a share of each scan's slices for evaluation, and trains the network of
  :mod:`tasks.enhance.model` with :func:`tasks.enhance.training.train_enhance`. ``local_epochs`` passes over the
  site's training pairs make one round's local steps. Evaluation reports the loss, PSNR and SSIM of the network's
  output against the held-out targets (a split or the remaining-dose image: noisy, so these measure progress, not
  the distance to a clean image) and the same PSNR of the input (``psnr_input_db``). A NaN/inf loss raises with
  :data:`DIVERGED` in the message: Flower turns it into an error reply, the server names the site (WARNING and
  the round record) and its update never leaves the site. Pairs are kept in this process's memory only.
* **ServerApp side** (:class:`EnhanceRoundWriter`): every aggregated round's global model is also written as an
  enhance checkpoint (``round-<k>/enhance.pt``, architecture and grid recorded, loadable by
  :func:`tasks.enhance.model.load_checkpoint`); a round in which every site that answered diverged fails the
  run; only a run that completes copies its last checkpoint to ``enhance-current.pt`` beside the runner's
  ``models/`` and ``runs/`` folders (``<data_root>/models/enhance-current.pt`` for the federated-training flow),
  the path an ``enhance.model_path`` can name.
* **Flow side** (:func:`enhance_sites`): which sites can train (projection scans on the federation's grid), the
  others skipped and named; the grid is taken from the sites when the config leaves it unset.

BatchNorm (``enhance_batchnorm``): the shared keys come from the same :func:`tasks.federated.model.shared_keys` as
for the lesion tasks. With ``local_bn_statistics`` (SiloBN) the running statistics never leave a site: a site
re-estimates them on its training inputs before evaluating the global weights, the server's checkpoints carry
none (metadata ``bn_statistics: site-local``), and the enhance stage re-estimates them on each scan it enhances
(:func:`tasks.enhance.driver.enhance_scan`) — also the policy for a site that never trained. ``fedbn`` is refused
with BatchNorm for this task (no global checkpoint could hold each site's layers). Without BatchNorm (the
default) both settings keep nothing at home.
"""

from __future__ import annotations

import logging
import math
import shutil
import threading
import zlib
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from flwr.app import Context
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from schemas.federation import EnhanceTarget, FailureReason, FederationConfig, RoundRecord
from schemas.stages import PROJECTION_KINDS
from tasks.enhance.fit import FitConfig, site_pairs
from tasks.enhance.model import (
    BN_STATISTICS_KEY,
    Architecture,
    ResidualUNet,
    batches_of,
    enhance_slices,
    recalibrate_statistics,
    save_checkpoint,
)
from tasks.enhance.training import TrainSettings, train_enhance
from tasks.errors import InvalidInputError, TrainingDivergedError
from tasks.federated import client_app as ca
from tasks.federated.model import get_arrays, model_for, set_arrays
from tasks.federated.rounds import RoundWriter
from tasks.storage import SiteStore

__all__ = [
    "CURRENT_CHECKPOINT",
    "DIVERGED",
    "ENHANCE_CHECKPOINT",
    "EnhanceRoundWriter",
    "architecture",
    "enhance_sites",
    "evaluate",
    "personalise",
    "train",
]

LOG = logging.getLogger("fedscan.federated.enhance")
#: In every divergence message a client sends: how the server tells a diverged site from other failures.
DIVERGED = "enhance training diverged"
#: The checkpoint file in each round's model folder, and the run's final one beside the runs.
ENHANCE_CHECKPOINT = "enhance.pt"
CURRENT_CHECKPOINT = "enhance-current.pt"
_CPU = torch.device("cpu")
FloatArray = npt.NDArray[np.float32]


def architecture(cfg: FederationConfig) -> Architecture:
    """The network of a federated enhance run: ``base_channels`` wide, two poolings, BatchNorm when asked."""
    return Architecture(channels=cfg.base_channels, depth=2, norm="batch" if cfg.enhance_batchnorm else "none")


def site_local_statistics(cfg: FederationConfig) -> bool:
    """Whether the network's BatchNorm running statistics stay at each site (SiloBN), so that a checkpoint's
    statistics must be re-estimated where it is used."""
    return cfg.enhance_batchnorm and cfg.local_bn_statistics


def grid_of(cfg: FederationConfig) -> tuple[int, int]:
    """``(ny, nx)`` the run trains for; refuses a config that leaves it unset."""
    if cfg.enhance_grid_ny_px == 0:
        raise InvalidInputError(
            "task 'enhance' needs enhance_grid_ny_px and enhance_grid_nx_px (the federated-training flow sets them "
            "from the sites' scans)"
        )
    return cfg.enhance_grid_ny_px, cfg.enhance_grid_nx_px


def _fit_config(cfg: FederationConfig, scan_id: str) -> FitConfig:
    """One scan's pair settings; its seed (the thinning draws) from the run's seed and the scan id."""
    seed = int(np.random.SeedSequence([cfg.seed, zlib.crc32(scan_id.encode())]).generate_state(1)[0])
    return FitConfig(arch=architecture(cfg), target=cfg.enhance_target.value, seed=seed, scan_ids=[scan_id])


# ------------------------------------------------------------------------------------------------
# The site's pairs (ClientApp side)
# ------------------------------------------------------------------------------------------------
def _trainable(site: SiteStore, cfg: FederationConfig, grid: tuple[int, int] | None) -> tuple[list[str], str]:
    """Scan ids of the site that can give pairs on ``grid`` (None: any), and why there are none."""
    ids: list[str] = []
    kinds = grids = 0
    for scan in site.scans():
        m = scan.manifest
        if m.data_kind not in PROJECTION_KINDS or m.geometry is None:
            continue
        kinds += 1
        if cfg.enhance_target is EnhanceTarget.THINNING and (
            m.i0_photons is None or "counts" not in scan.array_names()
        ):
            continue
        grids += 1
        g = m.geometry.grid
        if grid is not None and (g.ny_pixels, g.nx_pixels) != grid:
            continue
        ids.append(scan.scan_id)
    if ids:
        return ids, ""
    if kinds == 0:
        return ids, "no projection scans (image-only data cannot make training pairs)"
    if grids == 0:
        return ids, "no projection scans with counts and I0 (the thinning target needs them)"
    assert grid is not None
    return ids, f"no projection scan on the {grid[0]}x{grid[1]} grid the federation trains for"


@dataclass(frozen=True)
class _SitePairs:
    site_id: str
    train_x: FloatArray
    train_y: FloatArray
    hold_x: FloatArray
    hold_y: FloatArray


_PAIRS: dict[tuple[str, str], _SitePairs] = {}
_PAIRS_LOCK = threading.Lock()


def _build_site_pairs(store: str, cfg: FederationConfig) -> _SitePairs:
    """Every usable scan's pairs, with ``holdout_fraction`` of each scan's slices (seeded by ``holdout_seed``
    and the scan id) held out: all pairs of a held-out slice, so no held-out target is a training input."""
    site = SiteStore.open(store, mode="r")
    ids, why = _trainable(site, cfg, grid_of(cfg))
    if not ids:
        raise InvalidInputError(f"site {site.site_id!r} has {why}")
    parts: dict[str, list[FloatArray]] = {"tx": [], "ty": [], "hx": [], "hy": []}
    for scan_id in ids:
        x, y = site_pairs(site, _fit_config(cfg, scan_id))
        n = site.scan(scan_id).manifest.geometry.n_detector_rows  # type: ignore[union-attr]
        slice_of = np.arange(x.shape[0]) % n  # Noise2Inverse pairs are split-major; thinning gives one per slice
        rng = np.random.default_rng([cfg.holdout_seed, zlib.crc32(scan_id.encode())])
        n_hold = min(n - 1, max(1, round(cfg.holdout_fraction * n))) if n > 1 else 0
        held = np.isin(slice_of, rng.permutation(n)[:n_hold])
        parts["tx"].append(x[~held])
        parts["ty"].append(y[~held])
        parts["hx"].append(x[held])
        parts["hy"].append(y[held])
    tx, ty, hx, hy = (np.concatenate(parts[k]) for k in ("tx", "ty", "hx", "hy"))
    return _SitePairs(site.site_id, tx, ty, hx, hy)


def _site_data(context: Context, cfg: FederationConfig) -> _SitePairs:
    """The site's pairs, built once per (store, pair-relevant settings) in this process (a Simulation Engine
    actor serves every round from memory; a Deployment Engine ClientApp process builds them per message)."""
    store = ca.site_store_path(context)
    key = (store, f"{cfg.enhance_target}|{grid_of(cfg)}|{cfg.seed}|{cfg.holdout_seed}|{cfg.holdout_fraction}")
    with _PAIRS_LOCK:
        cached = _PAIRS.get(key)
    if cached is not None:
        return cached
    data = _build_site_pairs(store, cfg)
    with _PAIRS_LOCK:
        _PAIRS[key] = data
        while len(_PAIRS) > 4:
            _PAIRS.pop(next(iter(_PAIRS)))
    return data


# ------------------------------------------------------------------------------------------------
# Handlers' work (ClientApp side)
# ------------------------------------------------------------------------------------------------
def _receive(
    arrays: Mapping[str, npt.NDArray[np.float32]], config: Mapping[str, Any], context: Context, cfg: FederationConfig
) -> tuple[torch.nn.Module, list[str], _SitePairs]:
    model, keys = ca._local_model(context, cfg)
    ca._check_server(config, cfg, model, keys)
    set_arrays(model, arrays)
    return model, keys, _site_data(context, cfg)


def _fit(
    model: torch.nn.Module, data: _SitePairs, cfg: FederationConfig, *, epochs: int, generator: torch.Generator
) -> dict[str, float | int]:
    n = int(data.train_x.shape[0])
    settings = TrainSettings(
        steps=epochs * math.ceil(n / cfg.batch_size),
        batch_size=cfg.batch_size,
        learning_rate=cfg.learning_rate,
        proximal_mu=cfg.proximal_mu,  # the starting weights are the global model's: FedProx's anchor
    )
    try:
        result = train_enhance(model, data.train_x, data.train_y, settings=settings, generator=generator, device=_CPU)
    except TrainingDivergedError as exc:
        raise TrainingDivergedError(f"{DIVERGED} at site {data.site_id!r} ({exc}); its update is withheld") from exc
    return {"num-examples": n, "train_loss": float(result.metrics["loss_last"])}


def _site_statistics(model: torch.nn.Module, data: _SitePairs, cfg: FederationConfig) -> None:
    """SiloBN: the global weights get this site's BatchNorm statistics, re-estimated on its training inputs."""
    if site_local_statistics(cfg):
        recalibrate_statistics(model, batches_of(data.train_x, cfg.batch_size), device=_CPU)


def _metrics(model: torch.nn.Module, data: _SitePairs, cfg: FederationConfig) -> dict[str, float | int]:
    """Held-out loss (the training loss's units), PSNR and SSIM of output and input against the targets."""
    n = int(data.hold_x.shape[0])
    if n == 0:
        return {"num-examples": 0}
    out = enhance_slices(model, data.hold_x, batch_size=cfg.batch_size, device=_CPU)
    scale = architecture(cfg).intensity_scale_hu
    target = data.hold_y
    data_range = float(target.max() - target.min()) or 1.0
    ssim = [structural_similarity(t, o, data_range=data_range) for t, o in zip(target, out, strict=True)]
    return {
        "num-examples": n,
        "loss": float(np.mean(((out - target) / scale) ** 2)),
        "psnr_db": float(peak_signal_noise_ratio(target, out, data_range=data_range)),
        "psnr_input_db": float(peak_signal_noise_ratio(target, data.hold_x, data_range=data_range)),
        "ssim": float(np.mean(ssim)),
    }


def train(
    arrays: Mapping[str, npt.NDArray[np.float32]], config: Mapping[str, Any], context: Context, cfg: FederationConfig
) -> tuple[dict[str, npt.NDArray[np.float32]], dict[str, float | int]]:
    """One round of local training from the global ``arrays``; returns the shared arrays and metrics."""
    model, keys, data = _receive(arrays, config, context, cfg)
    ca._injected_sleep(data.site_id)
    generator = ca._generator(cfg, data.site_id, int(config.get(ca.ROUND, 0)))
    metrics = _fit(model, data, cfg, epochs=cfg.local_epochs, generator=generator)
    ca._save_local(context, model)
    return get_arrays(model, keys), metrics


def evaluate(
    arrays: Mapping[str, npt.NDArray[np.float32]], config: Mapping[str, Any], context: Context, cfg: FederationConfig
) -> dict[str, float | int]:
    """Held-out metrics of the global model on this site's pairs."""
    model, _, data = _receive(arrays, config, context, cfg)
    _site_statistics(model, data, cfg)
    return _metrics(model, data, cfg)


def personalise(
    arrays: Mapping[str, npt.NDArray[np.float32]], config: Mapping[str, Any], context: Context, cfg: FederationConfig
) -> dict[str, float | int]:
    """Fine-tune the final global model on this site only; held-out metrics before (``global_``) and after
    (``personal_``). The fine-tuned weights stay in the node's state; they never leave."""
    model, _, data = _receive(arrays, config, context, cfg)
    _site_statistics(model, data, cfg)
    before = _metrics(model, data, cfg)
    if cfg.personalisation_epochs > 0:
        _fit(model, data, cfg, epochs=cfg.personalisation_epochs, generator=ca._generator(cfg, data.site_id, 10**6))
        _site_statistics(model, data, cfg)
    after = _metrics(model, data, cfg)
    ca._save_local(context, model)
    out: dict[str, float | int] = {"num-examples": before["num-examples"]}
    out.update({f"global_{k}": v for k, v in before.items() if k != "num-examples"})
    out.update({f"personal_{k}": v for k, v in after.items() if k != "num-examples"})
    return out


# ------------------------------------------------------------------------------------------------
# ServerApp side
# ------------------------------------------------------------------------------------------------
class EnhanceRoundWriter(RoundWriter):
    """:class:`RoundWriter` plus the enhance checkpoints, the every-site-diverged failure and the current model."""

    def __init__(self, cfg: FederationConfig, run_config: Mapping[str, Any], run_id: int, signature: str) -> None:
        super().__init__(cfg, run_config, run_id, signature)
        self.grid = grid_of(cfg)
        self.last_checkpoint: Path | None = None

    def save_model(self, server_round: int, arrays: Mapping[str, npt.NDArray[np.float32]]) -> str | None:
        folder = super().save_model(server_round, arrays)
        if folder is None:
            return None
        model = model_for(self.cfg)
        set_arrays(model, arrays)
        assert isinstance(model, ResidualUNet)
        path = Path(folder) / ENHANCE_CHECKPOINT
        save_checkpoint(
            path,
            model,
            grid=self.grid,
            metadata={
                "trained_by": "federated",
                "run_id": self.run_id,
                "round": server_round,
                "target": self.cfg.enhance_target.value,
                "strategy": self.cfg.strategy.value,
                "config_hash": self.cfg.config_hash(),
                # SiloBN: no site's statistics are in the file; the enhance stage re-estimates them per scan
                BN_STATISTICS_KEY: "site-local" if site_local_statistics(self.cfg) else "global",
            },
        )
        self.last_checkpoint = path
        return folder

    def write(self, record: RoundRecord) -> None:
        super().write(record)
        if record.phase != "train" or record.aggregated or record.replies_ok:
            return
        train = [f for f in record.failures if f.phase == "train"]
        diverged = [f for f in train if f.reason is FailureReason.ERROR and DIVERGED in f.detail]
        if diverged and len(diverged) == len(train):
            sites = ", ".join(sorted({f.site for f in diverged}))
            raise TrainingDivergedError(
                f"round {record.round}: every site's enhance training diverged ({sites}); no model saved as current"
            )

    def finish(self, error: BaseException | None) -> None:
        if error is None and self.last_checkpoint is not None and self.models_root is not None:
            current = self.models_root.parent.parent / CURRENT_CHECKPOINT  # beside the runner's models/ and runs/
            tmp = current.with_name(current.name + ".tmp")
            shutil.copyfile(self.last_checkpoint, tmp)
            tmp.replace(current)
            LOG.info("enhance model of run %s saved as current: %s", self.run_id, current)
        super().finish(error)


# ------------------------------------------------------------------------------------------------
# Flow side
# ------------------------------------------------------------------------------------------------
def enhance_sites(
    site_uris: Sequence[str], config: FederationConfig
) -> tuple[list[str], tuple[str, ...], FederationConfig]:
    """The stores that can train the enhance network, the skipped sites (each ``"S: why"``), and ``config``
    with the grid set (unset: the grid most of the sites' usable scans are on).

    Raises
    ------
    InvalidInputError
        Fewer usable sites than ``min_available_clients``; the message names every skipped site and why.
    """
    sites = [(uri, SiteStore.open(uri, mode="r")) for uri in site_uris]
    if config.enhance_grid_ny_px == 0:
        grids: Counter[tuple[int, int]] = Counter()
        for _, site in sites:
            for scan_id in _trainable(site, config, None)[0]:
                g = site.scan(scan_id).manifest.geometry.grid  # type: ignore[union-attr]
                grids[(g.ny_pixels, g.nx_pixels)] += 1
        if grids:
            (ny, nx), _ = grids.most_common(1)[0]
            config = FederationConfig.model_validate(
                {**config.model_dump(), "enhance_grid_ny_px": ny, "enhance_grid_nx_px": nx}
            )
    grid = (config.enhance_grid_ny_px, config.enhance_grid_nx_px) if config.enhance_grid_ny_px else None
    ready: list[str] = []
    skipped: list[str] = []
    for uri, site in sites:
        ids, why = _trainable(site, config, grid)
        if ids and grid is not None:
            ready.append(uri)
        else:
            skipped.append(f"{site.site_id}: {why}")
            LOG.warning("site %s skipped for enhance training: %s", site.site_id, why)
    if len(ready) < config.min_available_clients:
        raise InvalidInputError(
            f"{len(ready)} site(s) can train the enhance network, the run needs {config.min_available_clients} "
            f"(min_available_clients); skipped: {'; '.join(skipped) or 'none'}"
        )
    return ready, tuple(skipped), config
