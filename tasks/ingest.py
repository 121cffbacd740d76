"""Ingest scanner output into a site store: validate, describe (ScanManifest), write Zarr; never modify the source.

Formats are read by :mod:`tasks.sources` (one reader per format in one registry). DICOM images are written as
``volume`` in HU via RescaleSlope/RescaleIntercept; projection data as ``projections`` (and ``counts``).

Identity: scan ids never come from file names, source files are recorded by position and checksum, and their
names go to the site's id map only (:mod:`tasks.identity`); labels must be in the site's allow-list and must not
look like identity; no DICOM header value other than geometry is read.

Bad input leaves the store as it was. Array, TIFF and flat/dark sources are checked in one streaming pass before
anything is written (structure, NaN/inf, negative counts, geometry agreement); DICOM files are checked from their
headers first and their pixels decoded once, while writing: a file that does not decode rolls the new scan back
(:func:`_written_stats`). The write itself is resumable.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import numpy as np
import numpy.typing as npt
from dask.highlevelgraph import HighLevelGraph
from dask.typing import Key
from pydantic import ValidationError

from schemas.base import describe_validation_error, load_yaml_model
from schemas.geometry import Geometry, ReconGrid
from schemas.ids import check_chosen_scan_id
from schemas.ingest import GeometrySpec, IngestConfig, IngestSidecar
from schemas.manifest import DataKind, FlatDarkRecord, ScanManifest, SourceFile
from tasks.errors import AlreadyIngestedError, FedscanError, InvalidInputError
from tasks.flatfield import FlatDark, count_clamped, fields_mean, load_field, normalise_block, prepare_gain
from tasks.identity import SiteIdentity
from tasks.labels import labels_beside, write_labels
from tasks.physics import counts_to_line_integrals
from tasks.sources import READERS, SIDECAR_NAMES, SourceStack, find_sidecar, open_source
from tasks.storage import ScanStore, SiteStore, StageOutput, StageResult, projection_chunks, volume_chunks

__all__ = [
    "SIDECAR_NAMES",
    "SITE_DEFAULTS_NAME",
    "IngestResult",
    "checksum_sources",
    "find_sidecar",
    "find_site_defaults",
    "ingest",
    "load_sidecar",
    "merge_sidecars",
    "open_source",
    "resolve_geometry",
    "validate_values",
]


# ------------------------------------------------------------------------------------------------
# Checks
# ------------------------------------------------------------------------------------------------
def iter_blocks(stack: SourceStack, views_per_block: int) -> Iterator[tuple[int, npt.NDArray[Any]]]:
    n = stack.shape[0]
    for a in range(0, n, views_per_block):
        yield a, stack.read(a, min(n, a + views_per_block))


def validate_values(
    stack: SourceStack,
    data_kind: DataKind,
    *,
    views_per_block: int = 32,
    fields: FlatDark | None = None,
    transmission_floor: float = 1e-5,
) -> dict[str, float]:
    """Stream the source once: refuse NaN/inf and negative counts (naming where), return value stats; with flat
    and dark ``fields``, also how many normalised values will be clamped (``clamped``), in the same pass."""
    lo, hi, total, count, clamped = math.inf, -math.inf, 0.0, 0, 0
    for a, block in iter_blocks(stack, views_per_block):
        block_sum = float(block.sum(dtype=np.float64))
        if block.dtype.kind == "f" and not math.isfinite(block_sum):  # NaN and inf reach the sum: one pass less
            bad = ~np.isfinite(block)
            if bad.any():
                i, r, c = (int(v) for v in np.argwhere(bad)[0])
                raise InvalidInputError(
                    f"{stack.path}: non-finite value ({block[i, r, c]}) at {stack.where(a + i)}, row {r}, col {c}"
                )
        block_lo, block_hi = float(block.min()), float(block.max())
        if data_kind is DataKind.COUNTS and block_lo < 0:
            i, r, c = (int(v) for v in np.argwhere(block < 0)[0])
            raise InvalidInputError(
                f"{stack.path}: negative counts ({block[i, r, c]}) at {stack.where(a + i)}, row {r}, col {c}"
            )
        lo, hi = min(lo, block_lo), max(hi, block_hi)
        total += block_sum
        count += block.size
        if fields is not None:
            clamped += count_clamped(block, fields, floor_fraction=transmission_floor)
    return {"min": lo, "max": hi, "mean": total / max(count, 1), "clamped": clamped}


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def checksum_sources(
    stack: SourceStack, *, extra: tuple[Path, ...] = ()
) -> tuple[tuple[SourceFile, ...], str, tuple[str, ...]]:
    """Per-file sha256 and size, one digest over the files' contents in data order (the idempotency key: names
    are excluded, so the same bytes under other names are the same source), and the files' own names.

    ``extra`` files (flats, darks) are part of the source and follow the data files. The records name each file
    by its position and format suffix (``file-00000.npy``): a file's own name may carry identity, so it is
    returned separately, for the site's id map only.
    """
    base = stack.path if stack.path.is_dir() else stack.path.parent
    records, names = [], []
    combined = hashlib.sha256()
    for i, f in enumerate((*stack.files, *extra)):
        digest = _sha256_file(f)
        name = str(f.relative_to(base)) if f.is_relative_to(base) else f.name
        suffix = f.suffix.lower() if f.suffix.lower() in READERS else ""
        records.append(SourceFile(name=f"file-{i:05d}{suffix}", sha256=digest, size_bytes=f.stat().st_size))
        names.append(name)
        combined.update(f"{digest}\n".encode())
    if stack.reader == "npz":  # which member was read is part of what the source is
        combined.update(f"npz:{stack.extra.get('npz_key', '')}\n".encode())
    return tuple(records), combined.hexdigest(), tuple(names)


# ------------------------------------------------------------------------------------------------
# Sidecars and geometry
# ------------------------------------------------------------------------------------------------
def load_sidecar(path: Path) -> IngestSidecar:
    return load_yaml_model(IngestSidecar, path, what="sidecar", error=InvalidInputError)


def resolve_geometry(spec: GeometrySpec, shape: tuple[int, int, int], *, where: str) -> Geometry:
    """Complete a site's geometry with the sizes of the data; sizes given must match it."""
    views, rows, cols = shape
    for name, given, actual in (
        ("n_views", spec.n_views, views),
        ("n_detector_rows", spec.n_detector_rows, rows),
        ("n_detector_cols", spec.n_detector_cols, cols),
    ):
        if given is not None and given != actual:
            raise InvalidInputError(f"{where}: geometry says {name}={given} but the data has {actual}")
    fields = spec.model_dump(exclude={"n_views", "n_detector_rows", "n_detector_cols", "grid"})
    fields.update(n_views=views, n_detector_rows=rows, n_detector_cols=cols)
    grid = spec.grid
    if grid is None:
        magnification = 1.0
        if spec.source_to_isocenter_mm and spec.source_to_detector_mm:
            magnification = spec.source_to_detector_mm / spec.source_to_isocenter_mm
        grid = ReconGrid(nx_pixels=cols, ny_pixels=cols, pixel_size_mm=spec.detector_pitch_mm / magnification)
    try:
        return Geometry(**fields, grid=grid)
    except ValidationError as exc:
        raise InvalidInputError(f"{where}: impossible geometry: {describe_validation_error(exc)}") from exc


# ------------------------------------------------------------------------------------------------
# Ingest
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class IngestResult:
    scan_id: str
    site_id: str
    store: str
    arrays: tuple[str, ...]
    result: StageResult


def _as_dask(stack: SourceStack, block: int, dtype: np.dtype[Any], *, token: str, marked: bool = False) -> da.Array:
    """The source as a dask array of ``block`` views per chunk, one task per chunk, named by ``token`` (the
    source's content digest and the conversion's parameters): nothing is pickled or hashed to name the tasks.
    ``marked``: read with :attr:`SourceStack.read_marked` (a file that does not decode comes back NaN)."""
    read = stack.read_marked if marked and stack.read_marked is not None else stack.read
    n, rows, cols = stack.shape
    name = f"ingest-{'marked-' if marked else ''}{stack.reader}-{token}"
    starts = range(0, n, block)
    graph: dict[Key, Any] = {(name, k, 0, 0): (read, a, min(n, a + block)) for k, a in enumerate(starts)}
    chunks = (tuple(min(n, a + block) - a for a in starts), (rows,), (cols,))
    arr = da.Array(HighLevelGraph.from_collections(name, graph, dependencies=()), name, chunks, dtype=stack.dtype)
    return arr.astype(dtype, copy=False)


def _written_stats(scan: ScanStore, name: str, stack: SourceStack) -> dict[str, float]:
    """Value stats of the array written by one decoding pass (:attr:`SourceStack.read_marked`), refusing it
    when a view did not decode (NaN) or is not finite: the file is read again alone, so the error names it."""
    arr = scan.read(name)
    bad_views = ~da.isfinite(arr).all(axis=(1, 2))
    bad, lo, hi, total = dask.compute(bad_views, arr.min(), arr.max(), arr.sum(dtype=np.float64))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        view = stack.read(i, i + 1)  # raises InvalidInputError naming the file when it does not decode
        bad_values = np.argwhere(~np.isfinite(view[0]))
        if not bad_values.size:  # it decodes now: the first decode failed for a reason that passed
            raise InvalidInputError(f"{stack.path}: {stack.where(i)} did not decode while writing; ingest it again")
        r, c = (int(v) for v in bad_values[0])
        raise InvalidInputError(
            f"{stack.path}: non-finite value ({view[0, r, c]}) at {stack.where(i)}, row {r}, col {c}"
        )
    return {"min": float(lo), "max": float(hi), "mean": float(total) / max(arr.size, 1), "clamped": 0}


def _roll_back(site: SiteStore, scan_id: str, *, scan_created: bool, source_new: bool) -> None:
    """Remove what a refused ingest wrote: the scan it created and its id-map entry (after the last chunk
    write returned, so nothing is still being written)."""
    if scan_created:
        site.remove_scan(scan_id)
    if source_new:
        SiteIdentity(site).forget_source(scan_id)


#: A site's defaults for every scan in a folder (e.g. ``<incoming>/<site>/``): under each scan's own sidecar.
SITE_DEFAULTS_NAME = "fedscan-site.yaml"


def find_site_defaults(path: Path) -> Path | None:
    """``fedscan-site.yaml`` in the folder that holds the source (file or folder)."""
    candidate = path.parent / SITE_DEFAULTS_NAME
    return candidate if candidate.is_file() else None


def merge_sidecars(base: IngestSidecar | None, over: IngestSidecar | None) -> IngestSidecar | None:
    """``over``'s fields that were set win over ``base``'s; geometry is merged field by field."""
    if base is None or over is None:
        return over if base is None else base
    merged = base.model_dump(exclude_unset=True)
    top = over.model_dump(exclude_unset=True)
    if "geometry" in top and base.geometry is not None and over.geometry is not None:
        top["geometry"] = {
            **base.geometry.model_dump(exclude_unset=True),
            **over.geometry.model_dump(exclude_unset=True),
        }
    merged.update(top)
    return IngestSidecar.model_validate(merged)


def _no_sidecar_error(src: Path) -> InvalidInputError:
    return InvalidInputError(
        f"{src}: nothing says what this array holds and fedscan does not guess; add --data-kind "
        "line_integrals|counts with --beam/--angular-range-deg/--detector-pitch-mm (or --geometry FILE.yaml), "
        f"put {src.name}.yaml beside it, or state a site default in {src.parent / SITE_DEFAULTS_NAME}"
    )


def _field_paths(src: Path, sidecar: IngestSidecar) -> tuple[Path | None, Path | None]:
    base = src if src.is_dir() else src.parent
    return (
        (base / sidecar.flats) if sidecar.flats else None,
        (base / sidecar.darks) if sidecar.darks else None,
    )


def _flat_dark(src: Path, stack: SourceStack, sidecar: IngestSidecar) -> tuple[FlatDark | None, tuple[Path, ...]]:
    """The averaged, checked fields of a source, and the files they came from (part of its digest)."""
    flats_path, darks_path = _field_paths(src, sidecar)
    flat = dark = None
    n_flats = n_darks = 0
    files: list[Path] = []
    if flats_path is not None:
        flat, n_flats = load_field(flats_path, key="flats")
        files.append(flats_path)
    if darks_path is not None:
        dark, n_darks = load_field(darks_path, key="darks")
        files.append(darks_path)
    if stack.reader == "npz" and (flat is None or dark is None):
        with np.load(stack.path, allow_pickle=False) as npz:
            if flat is None and "flats" in npz.files:
                flat, n_flats = fields_mean(np.asarray(npz["flats"]), where=f"{stack.path} (flats)")
            if dark is None and "darks" in npz.files:
                dark, n_darks = fields_mean(np.asarray(npz["darks"]), where=f"{stack.path} (darks)")
    if flat is None:
        if dark is not None:
            raise InvalidInputError(f"{src}: darks without flats; flat-field normalisation needs flats")
        return None, ()
    fields = prepare_gain(
        flat, dark, shape=stack.shape[1:], n_flats=n_flats, n_darks=n_darks, where=str(flats_path or stack.path)
    )
    return fields, tuple(files)


def _normalise_chunk(block: npt.NDArray[Any], *, fields: FlatDark, floor: float) -> npt.NDArray[np.float32]:
    return normalise_block(block, dark=fields.dark, gain=fields.gain, floor_fraction=floor, repair=fields.repair)[0]


def ingest(
    path: str | Path,
    *,
    site: SiteStore,
    sidecar: IngestSidecar | None = None,
    sidecar_path: str | Path | None = None,
    site_defaults: IngestSidecar | None = None,
    scan_id: str | None = None,
) -> IngestResult:
    """Validate one source and write it as a scan of ``site``.

    ``sidecar`` (already parsed, e.g. from CLI flags) wins over ``sidecar_path``, which wins over a
    sidecar found next to the source; the site's defaults (``site_defaults``, else ``fedscan-site.yaml`` in
    the source's folder) lie under it. An array with none of them is refused: its kind is never guessed.
    Raises :class:`AlreadyIngestedError` when the same contents (by checksum, whatever the file names) are
    already a complete scan of this store.
    """
    src = Path(path)
    if scan_id is not None:
        check_chosen_scan_id(scan_id, error=InvalidInputError)
    if sidecar is None:
        found = Path(sidecar_path) if sidecar_path is not None else find_sidecar(src)
        sidecar = load_sidecar(found) if found is not None else None
    if site_defaults is None:
        defaults_path = find_site_defaults(src)
        site_defaults = load_sidecar(defaults_path) if defaults_path is not None else None
    stated = merge_sidecars(site_defaults, sidecar)
    sidecar = stated or IngestSidecar()
    if sidecar.scan_id is not None:
        check_chosen_scan_id(sidecar.scan_id, error=InvalidInputError)
    identity = SiteIdentity(site)
    identity.check_labels(sidecar.labels, where=str(src))
    stack = open_source(src, npz_key=sidecar.npz_key)
    is_images = stack.reader == "dicom-series"
    header_geometry: GeometrySpec | None = stack.extra.get("geometry")  # DICOM-CT-PD: from the private tags
    if not is_images and header_geometry is None and stated is None:
        raise _no_sidecar_error(src)
    data_kind = DataKind.HU_IMAGES if is_images else sidecar.data_kind
    if data_kind is DataKind.HU_IMAGES and not is_images:
        raise InvalidInputError(f"{src}: data_kind hu_images needs a DICOM series")
    if header_geometry is not None:
        if data_kind is not DataKind.LINE_INTEGRALS:
            raise InvalidInputError(f"{src}: DICOM-CT-PD views hold line integrals; drop data_kind {data_kind.value}")
        if sidecar.geometry is not None and sidecar.geometry.grid is not None:  # the site may choose the grid
            header_geometry = header_geometry.model_copy(update={"grid": sidecar.geometry.grid})
    no_fields = is_images or header_geometry is not None
    fields, field_files = (None, ()) if no_fields else _flat_dark(src, stack, sidecar)
    if fields is not None and data_kind is DataKind.COUNTS:
        raise InvalidInputError(
            f"{src}: flats/darks normalise raw projections to line integrals; drop data_kind counts "
            "(i0_photons defaults to the mean flat minus dark)"
        )
    files, source_sha, names = checksum_sources(stack, extra=field_files)
    existing = site.find_source(source_sha)
    if existing is not None:
        raise AlreadyIngestedError(
            f"{src}: already ingested as scan {existing!r} of site {site.site_id!r} (same contents); nothing written",
            scan_id=existing,
        )
    if data_kind is DataKind.COUNTS and sidecar.i0_photons is None:
        raise InvalidInputError(f"{src}: raw counts need i0_photons (unattenuated photons per bin) in the sidecar")
    geometry = None
    if not is_images:
        spec = header_geometry or sidecar.geometry or GeometrySpec()
        geometry = resolve_geometry(spec, stack.shape, where=str(src))
    floor = sidecar.transmission_floor
    # DICOM pixels are decoded once, while writing: their headers were checked on opening, and a file that does
    # not decode is found after the last chunk and the scan rolled back. Other sources are read twice (a read
    # costs less than a write), every value checked before anything is written.
    decode_once = stack.read_marked is not None and fields is None
    stats: dict[str, float] = (
        {} if decode_once else validate_values(stack, data_kind, fields=fields, transmission_floor=floor)
    )
    flat_dark = None
    i0 = sidecar.i0_photons
    if fields is not None:
        flat_dark = FlatDarkRecord(
            n_flats=fields.n_flats,
            n_darks=fields.n_darks,
            clamped_values=int(stats["clamped"]),
            dead_pixels=fields.dead_pixels,
            floor_fraction=floor,
        )
        i0 = i0 if i0 is not None else fields.mean_gain
    sid = scan_id or sidecar.scan_id or identity.keyed_scan_id(source_sha)  # never from the file name
    try:
        manifest = ScanManifest(
            scan_id=sid,
            site_id=site.site_id,
            data_kind=data_kind,
            geometry=geometry,
            image_grid=stack.extra.get("grid"),
            slice_thickness_mm=stack.extra.get("slice_thickness_mm"),
            slice_spacing_mm=stack.extra.get("slice_spacing_mm"),
            flat_dark=flat_dark,
            i0_photons=i0,
            water_attenuation_per_mm=sidecar.water_attenuation_per_mm,
            source_files=files,
            source_sha256=source_sha,
            acquisition_time=sidecar.acquisition_time,
            labels=sidecar.labels,
        )
    except ValidationError as exc:
        raise InvalidInputError(f"{src}: {describe_validation_error(exc)}") from exc
    if is_images:
        n_slices, image_shape = stack.shape[0], stack.shape[1:]
    else:
        assert geometry is not None
        n_slices, image_shape = geometry.n_detector_rows, (geometry.grid.ny_pixels, geometry.grid.nx_pixels)
    labelled = labels_beside(src, scan_id=sid, n_slices=n_slices, image_shape=image_shape)  # checked before writing
    scan_created = sid not in site.scan_ids()
    scan = site.create_scan(manifest)
    source_new = identity.source_of(sid) is None
    identity.record_source(sid, source=str(src), names=names)
    config = IngestConfig(
        source_sha256=source_sha,
        reader=stack.reader,
        data_kind=data_kind,
        transmission_floor=None if fields is None else sidecar.transmission_floor,
    )
    # task names: the contents and every parameter of the conversion (a shared scheduler may hold another
    # ingest of the same files), with nothing pickled or hashed but these few values
    token = f"{source_sha[:32]}-{config.config_hash()}-{sidecar.i0_photons}"
    if is_images:
        chunks = volume_chunks(stack.shape)
        vol = _as_dask(stack, chunks[0], np.dtype(np.float32), token=token, marked=decode_once)
        outputs = [StageOutput("volume", vol, ("slice", "y", "x"), chunks, {"units": "HU"})]
    else:
        chunks = projection_chunks(stack.shape)
        if fields is not None:
            raw = _as_dask(stack, chunks[0], stack.dtype, token=token)
            line = da.map_blocks(
                partial(_normalise_chunk, fields=fields, floor=floor),
                raw,
                dtype=np.float32,
                name=f"ingest-normalise-{token}",
            )
            outputs = [StageOutput("projections", line, ("view", "row", "col"), chunks, {"units": "line integral"})]
        elif data_kind is DataKind.COUNTS:
            assert sidecar.i0_photons is not None
            counts = _as_dask(stack, chunks[0], stack.dtype, token=token)
            i0c, cfloor = sidecar.i0_photons, config.counts_floor
            line = da.map_blocks(
                partial(counts_to_line_integrals, i0_photons=i0c, counts_floor=cfloor),
                counts,
                dtype=np.float32,
                name=f"ingest-counts-{token}",
            )
            outputs = [
                StageOutput("counts", counts, ("view", "row", "col"), chunks, {"units": "photons"}),
                StageOutput("projections", line, ("view", "row", "col"), chunks, {"units": "line integral"}),
            ]
        else:
            line = _as_dask(stack, chunks[0], np.dtype(np.float32), token=token, marked=decode_once)
            outputs = [StageOutput("projections", line, ("view", "row", "col"), chunks, {"units": "line integral"})]

    def metrics(done: ScanStore, _seconds: float) -> dict[str, float | int]:
        values = _written_stats(done, outputs[-1].name, stack) if decode_once else stats
        return {
            "source_min": values["min"],
            "source_max": values["max"],
            "source_mean": values["mean"],
            **(
                {}
                if flat_dark is None
                else {"clamped_values": flat_dark.clamped_values, "dead_pixels": flat_dark.dead_pixels}
            ),
        }

    try:
        result = scan.run_stage(stage="ingest", config=config, outputs=outputs, metrics=metrics)
    except InvalidInputError as exc:
        try:
            _roll_back(site, sid, scan_created=scan_created, source_new=source_new)
        except (FedscanError, OSError) as undo:
            exc.add_note(f"the partly written scan {sid!r} could not be removed: {undo}")
        raise
    if labelled is not None:
        write_labels(scan, labelled)
    return IngestResult(sid, site.site_id, site.uri, tuple(o.name for o in outputs), result)
