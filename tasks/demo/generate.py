"""One demo scan: patient anatomy + lesions → attenuation truth → fedscan's projector → noisy detector.

Randomness: :func:`plan_scan` draws 128 bits from the injected generator; the anatomy, the lesions
and the noise get their own child sequences of ``SeedSequence(entropy)`` (spawn keys 0, 1, 2), and the
noise of slice ``k`` its own grandchild ``(2, k)``. So a scan's bytes do
not depend on how its slices are split into blocks, and the noise-free parts do not depend on
whether noise is drawn.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from schemas.demo import SiteProfile
from schemas.geometry import Geometry, ReconGrid
from tasks.demo.acquisition import simulate_line_integrals
from tasks.demo.anatomy import Patient, render_anatomy, sample_patient, slice_z_mm
from tasks.demo.lesions import Lesion, insert_lesions, place_lesions
from tasks.errors import InvalidInputError

FloatArray = npt.NDArray[np.float32]
#: ``projector(images (slices, ny, nx) 1/mm, geometry) -> (slices, views, cols)`` line integrals.
Projector = Callable[[FloatArray, Geometry], FloatArray]
# Spawn keys of the scan's independent streams (children of SeedSequence(entropy)).
_ANATOMY, _LESIONS, _NOISE = 0, 1, 2


def fedscan_projector(images: FloatArray, geometry: Geometry) -> FloatArray:
    """fedscan's forward projector on the CPU (:func:`tasks.reconstruct.kernels.forward_project`)."""
    import torch

    from tasks.reconstruct.kernels import forward_project

    out = forward_project(images, geometry, device=torch.device("cpu"))
    return np.asarray(out, dtype=np.float32)


@dataclass(frozen=True)
class ScanPlan:
    """Everything random about one scan, drawn up front (small); the arrays follow from it."""

    profile: SiteProfile
    geometry: Geometry
    scan_id: str
    patient: Patient
    lesions: tuple[Lesion, ...]
    entropy: int  # 128 bits drawn from the caller's generator

    @property
    def n_slices(self) -> int:
        return self.geometry.n_detector_rows

    @property
    def z_mm(self) -> npt.NDArray[np.float64]:
        return slice_z_mm(self.n_slices, self.profile.slice_thickness_mm)

    def noise_rng(self, slice_index: int) -> np.random.Generator:
        """The generator of slice ``slice_index``'s detector noise (independent of block splits)."""
        return np.random.default_rng(np.random.SeedSequence(self.entropy, spawn_key=(_NOISE, slice_index)))


@dataclass(frozen=True)
class DemoScan:
    """One simulated scan of one site.

    Attributes
    ----------
    projections : ndarray of float32, shape (views, rows, cols)
        Measured line integrals ``log(I0 / max(counts, floor))`` (noise-free ``log(I0/λ)`` without noise).
    counts : ndarray of float32, shape (views, rows, cols), or None
        Raw detector counts before the floor (kept on request).
    volume_truth : ndarray of float32, shape (slices, ny, nx)
        Attenuation that was projected, 1/mm (lesions included).
    labels : ndarray of uint8, shape (slices,)
        1 where the slice shows a lesion (``masks[k].any()``).
    masks : ndarray of uint8, shape (slices, ny, nx)
        Exact lesion masks.
    """

    site_id: str
    scan_id: str
    geometry: Geometry
    projections: FloatArray
    counts: FloatArray | None
    i0_photons: float
    counts_floor: float
    volume_truth: FloatArray
    labels: npt.NDArray[np.uint8]
    masks: npt.NDArray[np.uint8]
    water_attenuation_per_mm: float
    anatomy: str
    lesions: tuple[Lesion, ...]


@dataclass(frozen=True)
class ScanBlock:
    """Slices ``[start, stop)`` of a scan: truth, masks and the matching detector rows."""

    start: int
    stop: int
    volume_truth: FloatArray  # (stop - start, ny, nx), 1/mm
    masks: npt.NDArray[np.uint8]  # (stop - start, ny, nx)
    projections: FloatArray  # (views, stop - start, cols)
    counts: FloatArray | None  # (views, stop - start, cols)


def plan_scan(
    profile: SiteProfile,
    *,
    n_slices: int,
    grid: ReconGrid,
    rng: np.random.Generator,
    scan_id: str | None = None,
) -> ScanPlan:
    """Draw the patient, the lesions and the noise seed of one scan.

    Parameters
    ----------
    profile : SiteProfile
        The site.
    n_slices : int
        Slices (= detector rows).
    grid : ReconGrid
        Image grid; views and columns follow from ``profile.geometry(grid, n_slices=...)``.
    rng : numpy.random.Generator
        The only source of randomness (128 bits are drawn from it).
    scan_id : str, optional
        Default: ``<site_id>-<first 10 hex digits of the scan's entropy hash>``.
    """
    if n_slices < 1:
        raise InvalidInputError(f"n_slices must be >= 1, got {n_slices}")
    geometry = profile.geometry(grid, n_slices=n_slices)
    words = rng.integers(0, 2**32, size=4, dtype=np.uint64)
    entropy = int(sum(int(w) << (32 * i) for i, w in enumerate(words)))
    anatomy_ss = np.random.SeedSequence(entropy, spawn_key=(_ANATOMY,))
    lesion_ss = np.random.SeedSequence(entropy, spawn_key=(_LESIONS,))
    patient = sample_patient(profile, grid=grid, n_slices=n_slices, rng=np.random.default_rng(anatomy_ss))
    z = slice_z_mm(n_slices, profile.slice_thickness_mm)

    def tissue_at(k: int) -> tuple[FloatArray, npt.NDArray[np.bool_]]:
        return render_anatomy(patient, grid=grid, z_mm=z[k : k + 1])

    lesions = place_lesions(profile, grid=grid, z_mm=z, tissue_at=tissue_at, rng=np.random.default_rng(lesion_ss))
    if scan_id is None:
        scan_id = f"{profile.site_id}-{hashlib.sha256(str(entropy).encode()).hexdigest()[:10]}"
    return ScanPlan(
        profile=profile,
        geometry=geometry,
        scan_id=scan_id,
        patient=patient,
        lesions=lesions,
        entropy=entropy,
    )


def render_truth(plan: ScanPlan, start: int, stop: int) -> tuple[FloatArray, npt.NDArray[np.uint8]]:
    """Attenuation truth (1/mm) and lesion masks of slices ``[start, stop)``, each ``(S, ny, nx)``."""
    from tasks.reconstruct.kernels import hu_to_attenuation

    if not 0 <= start < stop <= plan.n_slices:
        raise InvalidInputError(f"slice range [{start}, {stop}) outside 0..{plan.n_slices}")
    z = plan.z_mm[start:stop]
    grid = plan.geometry.grid
    hu, body = render_anatomy(plan.patient, grid=grid, z_mm=z)
    hu, masks = insert_lesions(hu, body, plan.lesions, grid=grid, z_mm=z, slice_indices=np.arange(start, stop))
    mu = hu_to_attenuation(hu, water_attenuation_per_mm=plan.profile.water_attenuation_per_mm)
    return np.maximum(mu, np.float32(0.0)).astype(np.float32), masks


def iter_scan_blocks(
    plan: ScanPlan,
    *,
    block_slices: int = 8,
    noise: bool = True,
    keep_counts: bool = False,
    projector: Projector | None = None,
) -> Iterator[ScanBlock]:
    """Generate a scan block by block (memory bounded by ``block_slices``).

    Parameters
    ----------
    plan : ScanPlan
    block_slices : int
        Slices per block.
    noise : bool
        Draw photon and electronic noise (False: the expected signal, for checks).
    keep_counts : bool
        Also return the raw counts (only with noise).
    projector : callable, optional
        Default :func:`fedscan_projector`.
    """
    if block_slices < 1:
        raise InvalidInputError(f"block_slices must be >= 1, got {block_slices}")
    project = projector if projector is not None else fedscan_projector
    p = plan.profile
    for start in range(0, plan.n_slices, block_slices):
        stop = min(start + block_slices, plan.n_slices)
        # Every slice goes through the same calls, one slice at a time: a batched projection's sparse product
        # rounds a column differently by its position in the batch on some CPUs (seen on an AVX-512 Xeon), so
        # only a per-slice computation keeps the bytes independent of ``block_slices`` on every machine.
        mus, masks, rows, counts = [], [], [], []
        for k in range(start, stop):
            mu_k, mask_k = render_truth(plan, k, k + 1)
            li, c = simulate_line_integrals(
                project(mu_k, plan.geometry)[0],  # (views, cols)
                i0_photons=p.i0_photons,
                rng=plan.noise_rng(k) if noise else None,
                electronic_noise_counts=p.electronic_noise_counts,
                crosstalk_fraction=p.detector_crosstalk_fraction,
                counts_floor=p.counts_floor,
            )
            mus.append(mu_k)
            masks.append(mask_k)
            rows.append(li)
            if c is not None:
                counts.append(c)
        projections = np.ascontiguousarray(np.stack(rows, axis=1))
        kept = np.ascontiguousarray(np.stack(counts, axis=1)) if keep_counts and counts else None
        yield ScanBlock(
            start=start,
            stop=stop,
            volume_truth=np.concatenate(mus),
            masks=np.concatenate(masks),
            projections=projections,
            counts=kept,
        )


def generate_scan(
    profile: SiteProfile,
    *,
    n_slices: int,
    grid: ReconGrid,
    rng: np.random.Generator,
    scan_id: str | None = None,
    noise: bool = True,
    keep_counts: bool = False,
    block_slices: int = 8,
    projector: Projector | None = None,
) -> DemoScan:
    """Simulate one scan of ``profile``'s site.

    Parameters
    ----------
    profile : SiteProfile
        The site: protocol, dose, population, lesions.
    n_slices : int
        Slices (= detector rows).
    grid : ReconGrid
        Image grid (e.g. ``profile.grid("small")``); views and columns scale with it.
    rng : numpy.random.Generator
        The only source of randomness; same generator state → same bytes.
    scan_id : str, optional
        See :func:`plan_scan`.
    noise, keep_counts, block_slices, projector
        See :func:`iter_scan_blocks`.

    Returns
    -------
    DemoScan
    """
    plan = plan_scan(profile, n_slices=n_slices, grid=grid, rng=rng, scan_id=scan_id)
    return scan_from_plan(plan, noise=noise, keep_counts=keep_counts, block_slices=block_slices, projector=projector)


def scan_from_plan(
    plan: ScanPlan,
    *,
    noise: bool = True,
    keep_counts: bool = False,
    block_slices: int = 8,
    projector: Projector | None = None,
) -> DemoScan:
    """The arrays of a planned scan (see :func:`generate_scan`)."""
    profile = plan.profile
    n_slices = plan.n_slices
    g = plan.geometry
    ny, nx = g.grid.ny_pixels, g.grid.nx_pixels
    truth = np.empty((n_slices, ny, nx), dtype=np.float32)
    masks = np.empty((n_slices, ny, nx), dtype=np.uint8)
    projections = np.empty((g.n_views, n_slices, g.n_detector_cols), dtype=np.float32)
    counts = np.empty_like(projections) if keep_counts and noise else None
    for block in iter_scan_blocks(
        plan, block_slices=block_slices, noise=noise, keep_counts=keep_counts, projector=projector
    ):
        truth[block.start : block.stop] = block.volume_truth
        masks[block.start : block.stop] = block.masks
        projections[:, block.start : block.stop] = block.projections
        if counts is not None and block.counts is not None:
            counts[:, block.start : block.stop] = block.counts
    return DemoScan(
        site_id=profile.site_id,
        scan_id=plan.scan_id,
        geometry=g,
        projections=projections,
        counts=counts,
        i0_photons=profile.i0_photons,
        counts_floor=profile.counts_floor,
        volume_truth=truth,
        labels=np.asarray(masks.reshape(n_slices, -1).any(axis=1), dtype=np.uint8),
        masks=masks,
        water_attenuation_per_mm=profile.water_attenuation_per_mm,
        anatomy=plan.patient.kind.value,
        lesions=plan.lesions,
    )
