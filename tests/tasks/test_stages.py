"""The stage registry: the chain comes from PIPELINE and the scan's data kind; "done?" is asked of the store once,
before a driver builds any graph; a stage that does not apply is recorded not-applicable, never failed."""

from __future__ import annotations

from pathlib import Path

import dask.array as da
import numpy as np
import pytest
import torch

from schemas.denoise import DenoiseConfig
from schemas.geometry import ReconGrid
from schemas.ingest import IngestConfig
from schemas.manifest import DataKind, ScanManifest
from schemas.pipeline import PipelineConfig
from schemas.stages import PIPELINE, PROJECTION_KINDS, StageName, StageState, chain_for, spec_of
from tasks import stages
from tasks.errors import InvalidInputError, StageIncompleteError
from tasks.storage import SiteStore, StageOutput
from tests.flows.test_pipeline_flows import make_site

CPU = torch.device("cpu")


def add_image_scan(site: SiteStore, scan_id: str = "img-1", *, n: int = 3, size: int = 32) -> None:
    """An image-only scan (HU slices, no projections), written as the ingest of a DICOM series would."""
    grid = ReconGrid(nx_pixels=size, ny_pixels=size, pixel_size_mm=1.0)
    yy, xx = np.mgrid[:size, :size]
    disc = ((yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / 3) ** 2).astype(np.float32)
    volume = np.stack([disc * (40.0 + 10 * k) - 1000.0 * (1 - disc) for k in range(n)]).astype(np.float32)
    scan = site.create_scan(
        ScanManifest(scan_id=scan_id, site_id=site.site_id, data_kind=DataKind.HU_IMAGES, image_grid=grid)
    )
    scan.run_stage(
        stage=StageName.INGEST,
        config=IngestConfig(source_sha256="0" * 64, reader="dicom-series", data_kind=DataKind.HU_IMAGES),
        outputs=[StageOutput("volume", da.from_array(volume, chunks=(n, size, size)), ("slice", "y", "x"))],
    )


def test_every_spec_has_a_driver_and_a_config_section_in_pipeline_order() -> None:
    assert list(stages.STAGES) == [spec.name for spec in PIPELINE]
    config = PipelineConfig()
    for spec in PIPELINE:
        assert isinstance(config.stage_config(spec.name), spec.config_type)
        assert spec_of(spec.name.value) is spec
    with pytest.raises(ValueError, match="unknown stage"):
        spec_of("enhance-typo")


@pytest.mark.parametrize("kind", list(DataKind))
def test_the_chain_is_the_registry_filtered_by_data_kind(kind: DataKind) -> None:
    chain = chain_for(kind)
    assert [s.name for s in chain] == [s.name for s in PIPELINE if kind in s.data_kinds]
    names = [s.name for s in chain]
    if kind in PROJECTION_KINDS:
        assert names == [s.name for s in PIPELINE]  # every stage applies to a scan with projections
    else:
        assert names == [s.name for s in PIPELINE if s.data_kinds == frozenset(DataKind)]
        assert StageName.DENOISE not in names and StageName.RECONSTRUCT not in names
        assert names[-1] is StageName.DIAGNOSE


def test_an_image_only_scan_runs_surrogate_only(tmp_path: Path) -> None:
    site = SiteStore.create(tmp_path / "H.zarr", site_id="H")
    add_image_scan(site)
    scan = site.scan("img-1")
    config = PipelineConfig()
    runs = {
        spec.name: stages.run_scan_stage(scan, spec.name, config.stage_config(spec.name), device=CPU)
        for spec in PIPELINE
    }
    assert runs[StageName.DENOISE].state is StageState.NOT_APPLICABLE
    assert runs[StageName.RECONSTRUCT].state is StageState.NOT_APPLICABLE
    assert runs[StageName.ENHANCE].state is StageState.DISABLED  # optional, off without a model
    assert runs[StageName.SURROGATE].state is StageState.DONE
    assert set(scan.provenance()) == {"ingest", "surrogate"}  # nothing recorded for the stages that do not apply
    assert scan.stage_record("surrogate").inputs == {"ingest": scan.stage_record("ingest").lineage()}
    assert scan.array("surrogate").shape == (3, 32, 32)
    assert np.isfinite(scan.array("surrogate")[...]).all()
    assert "projections_denoised" not in scan.array_names()


def test_done_is_asked_once_before_any_graph_is_built(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    scan = make_site(tmp_path, site_id="Q", rows=2, cols=32, views=90).scans()[0]
    config = PipelineConfig().denoise
    calls: list[str] = []
    real = stages.STAGES[StageName.DENOISE]

    def counting(scan_, config_, **kwargs):
        calls.append(kwargs["source"])
        return real.driver(scan_, config_, **kwargs)

    monkeypatch.setitem(stages.STAGES, StageName.DENOISE, stages.Stage(real.spec, counting))
    first = stages.run_scan_stage(scan, "denoise", config, device=CPU)
    again = stages.run_scan_stage(scan, "denoise", config, device=CPU)
    assert (first.state, again.state) == (StageState.DONE, StageState.SKIPPED)
    assert calls == ["projections"]  # the second run never reached the driver
    other = config.model_copy(update={"threshold_value": 2.0})
    assert stages.run_scan_stage(scan, "denoise", other, device=CPU).state is StageState.DONE  # a new config
    assert len(calls) == 2


def test_reconstruct_reads_the_denoised_projections_once_they_exist(tmp_path: Path) -> None:
    scan = make_site(tmp_path, site_id="R", rows=2, cols=32, views=90).scans()[0]
    config = PipelineConfig()
    assert stages.source_of(scan, spec_of("reconstruct"))[0] == "projections"
    # diagnose has no promoted model to run with here: not pending (it is not-applicable)
    enabled = [s.name for s in PIPELINE if config.stage_config(s.name).enabled and s.name is not StageName.DIAGNOSE]
    assert stages.pending_stages(scan, {s.name: config.stage_config(s.name) for s in PIPELINE}) == enabled
    stages.run_scan_stage(scan, "denoise", config.denoise, device=CPU)
    source, upstream = stages.source_of(scan, spec_of("reconstruct"))
    assert (source, upstream.stage) == ("projections_denoised", "denoise")
    run = stages.run_scan_stage(scan, "reconstruct", config.reconstruct, device=CPU)
    assert run.record is not None and run.record.metrics["source"] == "projections_denoised"
    assert run.record.inputs == {"denoise": scan.stage_record("denoise").lineage()}
    assert stages.pending_stages(scan, {s.name: config.stage_config(s.name) for s in PIPELINE}) == [StageName.SURROGATE]


def test_a_stage_without_its_input_or_with_a_wrong_config_is_refused(tmp_path: Path) -> None:
    site = SiteStore.create(tmp_path / "E.zarr", site_id="E")
    add_image_scan(site)
    scan = site.scan("img-1")
    with pytest.raises(InvalidInputError, match="takes a SurrogateConfig"):
        stages.run_scan_stage(scan, "surrogate", PipelineConfig().denoise, device=CPU)
    grid = ReconGrid(nx_pixels=8, ny_pixels=8, pixel_size_mm=1.0)
    bare = site.create_scan(  # a scan whose ingest never completed: no record, nothing to read
        ScanManifest(scan_id="img-2", site_id="E", data_kind=DataKind.HU_IMAGES, image_grid=grid)
    )
    with pytest.raises(StageIncompleteError, match="reads one of"):
        stages.run_scan_stage(bare, "surrogate", PipelineConfig().surrogate, device=CPU)


class _DenoiseOff(DenoiseConfig):
    """A config that turns its (optional) stage off, as an optional stage's config does."""

    @property
    def enabled(self) -> bool:
        return False


def test_a_disabled_stage_is_reported_and_its_old_output_not_read(tmp_path: Path) -> None:
    scan = make_site(tmp_path, site_id="S", rows=2, cols=32, views=90).scans()[0]
    config = PipelineConfig()
    stages.run_scan_stage(scan, "denoise", config.denoise, device=CPU)  # an earlier run wrote projections_denoised
    off = _DenoiseOff()
    assert stages.run_scan_stage(scan, "denoise", off, device=CPU).state is StageState.DISABLED
    configs = {s.name: config.stage_config(s.name) for s in PIPELINE} | {StageName.DENOISE: off}
    disabled = stages.disabled_stages(configs)
    assert disabled == {"denoise", "enhance"}  # enhance: off by default (no model)
    assert stages.pending_stages(scan, configs) == [StageName.RECONSTRUCT, StageName.SURROGATE]
    run = stages.run_scan_stage(scan, "reconstruct", config.reconstruct, device=CPU, disabled=disabled)
    assert run.record is not None and run.record.metrics["source"] == "projections"  # not the stale denoised one
    assert run.record.inputs == {"ingest": scan.stage_record("ingest").lineage()}
