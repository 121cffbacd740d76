"""Labels and masks: a CSV beside a scan or for a whole site, checked row by row before anything is written."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from flows.cli import app
from tasks.errors import InvalidInputError
from tasks.ingest import ingest
from tasks.labels import attach_labels, is_labelled, require_labelled_sites
from tasks.storage import SiteStore
from tests.tasks.test_ingest_dicom import write_series

PARALLEL = {"geometry": {"beam": "parallel", "angular_range_deg": 180, "detector_pitch_mm": 1.0}}


@pytest.fixture
def site(tmp_path) -> SiteStore:
    return SiteStore.create(tmp_path / "site-a.zarr", site_id="site-a")


def csv_text(rows: list[tuple[str, int | str, int | str]]) -> str:
    return "scan_id,slice,label\n" + "".join(f"{a},{b},{c}\n" for a, b, c in rows)


def projection_scan(tmp_path: Path, site: SiteStore, rng, *, rows: int = 3, cols: int = 8, name: str = "p.npy") -> str:
    src = tmp_path / name
    np.save(src, rng.random((10, rows, cols)).astype("f4"))
    src.with_name(src.name + ".yaml").write_text(yaml.safe_dump(PARALLEL))
    return ingest(src, site=site).scan_id


def lesion_masks(labels: list[int], shape: tuple[int, int]) -> np.ndarray:
    m = np.zeros((len(labels), *shape), dtype=np.uint8)
    for k, lab in enumerate(labels):
        if lab:
            m[k, 1:3, 2:4] = 1
    return m


def test_labels_beside_a_dicom_series_are_attached_on_ingest(tmp_path, site):
    folder = tmp_path / "ct"
    write_series(folder, "CT_small.dcm", 4, step_mm=5.0)
    (folder / "labels.csv").write_text(csv_text([("", 0, 0), ("", 1, 1), ("", 2, 1), ("", 3, 0)]))
    np.save(folder / "masks.npy", lesion_masks([0, 1, 1, 0], (128, 128)))
    res = ingest(folder, site=site)
    scan = site.scan(res.scan_id)
    np.testing.assert_array_equal(scan.array("labels")[...], [0, 1, 1, 0])
    assert scan.array("labels").dtype == np.uint8 and scan.array("lesion_masks").shape == (4, 128, 128)
    assert is_labelled(scan) == (True, True)
    assert scan.stage_record("labels").metrics["lesion_slices"] == 2


def test_bad_labels_beside_a_scan_leave_the_store_untouched(tmp_path, site):
    folder = tmp_path / "ct"
    write_series(folder, "CT_small.dcm", 3, step_mm=5.0)
    (folder / "labels.csv").write_text(csv_text([("", 0, 0), ("", 1, 1), ("", 3, 0)]))
    with pytest.raises(InvalidInputError, match=r"labels.csv: row 4: scan '.*' has slices 0–2; slice 3 does not exist"):
        ingest(folder, site=site)
    assert site.scan_ids() == []


def test_fedscan_label_attaches_updates_and_inspect_shows_it(tmp_path, site, rng):
    a = projection_scan(tmp_path, site, rng, name="a.npy")
    b = projection_scan(tmp_path, site, rng, name="b.npy")
    labels = tmp_path / "site-labels.csv"
    labels.write_text(csv_text([(a, k, int(k == 1)) for k in range(3)]))
    runner = CliRunner()
    out = runner.invoke(app, ["inspect", site.uri])
    assert out.exit_code == 0 and out.output.count("unlabelled") == 2, out.output
    out = runner.invoke(app, ["label", site.uri, str(labels)])
    assert out.exit_code == 0, out.output
    assert f"site-a/{a}: labelled (1 of 3 slices show a lesion)" in out.output
    out = runner.invoke(app, ["inspect", site.uri])
    assert f"scan {a}  line_integrals; parallel-beam" in out.output and out.output.count("unlabelled") == 1
    # an update with masks from a folder of <scan_id>.nii.gz replaces the labels of both scans
    labels.write_text(csv_text([(s, k, int(k == 2)) for s in (a, b) for k in range(3)]))
    masks = tmp_path / "masks"
    masks.mkdir()
    for s in (a, b):
        m = lesion_masks([0, 0, 1], (8, 8))  # (slice, y, x) → NIfTI (x, y, slice)
        nib.save(nib.Nifti1Image(m.transpose(2, 1, 0), np.eye(4)), masks / f"{s}.nii.gz")
    out = runner.invoke(app, ["label", site.uri, str(labels), "--masks", str(masks)])
    assert out.exit_code == 0, out.output
    reopened = SiteStore.open(site.uri)
    for s in (a, b):
        np.testing.assert_array_equal(reopened.scan(s).array("labels")[...], [0, 0, 1])
        np.testing.assert_array_equal(reopened.scan(s).array("lesion_masks")[...], lesion_masks([0, 0, 1], (8, 8)))
    out = runner.invoke(app, ["label", site.uri, str(labels), "--masks", str(masks)])
    assert out.output.count("unchanged") == 2  # the same labels again: nothing rewritten
    assert "labelled + masks" in runner.invoke(app, ["inspect", site.uri]).output


def _refused(site: SiteStore, path: Path, text: str, match: str, masks: Path | None = None) -> None:
    path.write_text(text)
    before = {s: dict(site.scan(s).provenance()) for s in site.scan_ids()}
    with pytest.raises(InvalidInputError, match=match) as info:
        attach_labels(site, path, masks=masks)
    assert len(str(info.value).splitlines()) == 1
    assert {s: dict(site.scan(s).provenance()) for s in site.scan_ids()} == before


def test_each_bad_labels_file_is_refused_naming_the_row(tmp_path, site, rng):
    a = projection_scan(tmp_path, site, rng)
    f = tmp_path / "l.csv"
    _refused(site, f, "id,slice,label\n", r"l.csv: the header must be 'scan_id,slice,label'")
    _refused(site, f, csv_text([(a, 0, 0), (a, 1, 2), (a, 2, 0)]), r"l.csv: row 3: label '2' is not binary")
    _refused(site, f, csv_text([(a, 0, 0), (a, "one", 1)]), r"row 3: slice 'one' is not a whole number")
    _refused(site, f, csv_text([(a, 0, 0), (a, 1, 0), (a, 2, 0), (a, 3, 1)]), r"row 5: .* slice 3 does not exist")
    _refused(site, f, csv_text([(a, 0, 0), (a, 2, 1)]), rf"scan '{a}' has 3 slices; slice 1 has no row")
    _refused(site, f, csv_text([(a, 0, 0), (a, 0, 1)]), r"row 3: slice 0 of .* labelled twice \(also in row 2\)")
    _refused(site, f, csv_text([("DOE_JANE", 0, 0)]), r"row 2: no such scan in site .site-a.$")  # not echoed
    _refused(site, f, csv_text([("", 0, 0)]), r"row 2: scan_id is empty")
    good = csv_text([(a, 0, 0), (a, 1, 1), (a, 2, 0)])
    wrong_shape = tmp_path / "m.npy"
    np.save(wrong_shape, np.zeros((3, 8, 9), np.uint8))
    _refused(site, f, good, r"m.npy: mask of shape \(3, 8, 9\), but scan .* is \(3, 8, 8\)", masks=wrong_shape)
    np.save(wrong_shape, np.full((3, 8, 8), 0.5, np.float32))
    _refused(site, f, good, r"m.npy: mask values must be 0 or 1", masks=wrong_shape)
    np.save(wrong_shape, lesion_masks([0, 0, 1], (8, 8)))  # the lesion is on slice 2, the label on slice 1
    _refused(
        site,
        f,
        good,
        r"row 3: label 1 of slice 1 disagrees with its mask in m.npy .no lesion.; misaligned",
        wrong_shape,
    )
    assert is_labelled(site.scan(a)) == (False, False)


def test_federated_training_needs_a_labelled_site_and_names_them(tmp_path, rng):
    for sid in ("north", "south"):
        s = SiteStore.create(tmp_path / f"{sid}.zarr", site_id=sid)
        projection_scan(tmp_path, s, rng, name=f"{sid}.npy")
    uris = [str(tmp_path / "north.zarr"), str(tmp_path / "south.zarr")]
    with pytest.raises(InvalidInputError, match=r"no site has a labelled scan \(sites: north, south\)"):
        require_labelled_sites(uris)
    north = SiteStore.open(uris[0])
    (scan_id,) = north.scan_ids()
    (tmp_path / "l.csv").write_text(csv_text([(scan_id, k, k % 2) for k in range(3)]))
    attach_labels(north, tmp_path / "l.csv")
    assert require_labelled_sites(uris) == {"north": (scan_id,), "south": ()}


@pytest.mark.parametrize("policy", ["per_class", "fixed"])
def test_relabelling_recomputes_surrogates_only_when_hosts_follow_labels(tmp_path, site, policy):
    import torch

    from schemas.pipeline import PipelineConfig
    from schemas.stages import StageName, StageState, chain_for
    from tasks.stages import pending_stages, run_scan_stage

    folder = tmp_path / "ct"
    write_series(folder, "CT_small.dcm", 4, step_mm=5.0)
    (folder / "labels.csv").write_text(csv_text([("", 0, 0), ("", 1, 1), ("", 2, 1), ("", 3, 0)]))
    scan = site.scan(ingest(folder, site=site).scan_id)
    pipeline = PipelineConfig.model_validate({"surrogate": {"host_policy": policy}})
    configs = {spec.name: pipeline.stage_config(spec.name) for spec in chain_for(scan.manifest.data_kind)}
    surrogate = configs[StageName.SURROGATE]
    cpu = torch.device("cpu")
    assert run_scan_stage(scan, StageName.SURROGATE, surrogate, device=cpu).state is StageState.DONE
    before = np.asarray(scan.array("surrogate")[...])
    assert pending_stages(scan, configs) == []

    relabel = tmp_path / "relabel.csv"
    relabel.write_text(
        csv_text([(scan.scan_id, 0, 1), (scan.scan_id, 1, 1), (scan.scan_id, 2, 1), (scan.scan_id, 3, 0)])
    )
    out = CliRunner().invoke(app, ["label", str(Path(site.uri)), str(relabel)])
    assert out.exit_code == 0, out.output
    assert f"site-a/{scan.scan_id}: labelled (3 of 4 slices" in " ".join(out.output.split())

    stale = pending_stages(scan, configs)
    run = run_scan_stage(scan, StageName.SURROGATE, surrogate, device=cpu)
    after = np.asarray(scan.array("surrogate")[...])
    if policy == "per_class":
        assert stale == [StageName.SURROGATE] and pending_stages(scan, configs) == []
        assert run.state is StageState.DONE and "labels" in run.record.inputs
        assert not np.allclose(after[0], before[0])  # slice 0 changed label, so it changed host
        np.testing.assert_array_equal(after[1:], before[1:])  # the others kept theirs
    else:
        assert stale == [] and run.state is StageState.SKIPPED and "labels" not in run.record.inputs
        np.testing.assert_array_equal(after, before)


def test_the_same_labels_again_leave_per_class_surrogates_done(tmp_path, site):
    import torch

    from schemas.pipeline import PipelineConfig
    from schemas.stages import StageName, chain_for
    from tasks.stages import pending_stages, run_scan_stage

    folder = tmp_path / "ct"
    write_series(folder, "CT_small.dcm", 3, step_mm=5.0)
    (folder / "labels.csv").write_text(csv_text([("", 0, 0), ("", 1, 1), ("", 2, 0)]))
    scan = site.scan(ingest(folder, site=site).scan_id)
    pipeline = PipelineConfig.model_validate({"surrogate": {"host_policy": "per_class"}})
    configs = {s.name: pipeline.stage_config(s.name) for s in chain_for(scan.manifest.data_kind)}
    run_scan_stage(scan, StageName.SURROGATE, configs[StageName.SURROGATE], device=torch.device("cpu"))
    same = tmp_path / "same.csv"
    same.write_text(csv_text([(scan.scan_id, 0, 0), (scan.scan_id, 1, 1), (scan.scan_id, 2, 0)]))
    [(_, result)] = attach_labels(site, same)
    assert result.skipped and pending_stages(scan, configs) == []


def test_federated_training_leaves_out_a_site_without_labelled_scans(tmp_path):
    import torch

    from schemas.stages import StageName
    from schemas.surrogate import SurrogateConfig
    from tasks.pipeline_support import federated_sites
    from tasks.stages import run_scan_stage

    for name, labelled in (("east", True), ("west", False)):
        store = SiteStore.create(tmp_path / "data" / f"{name}.zarr", site_id=name)
        folder = tmp_path / name
        write_series(folder, "CT_small.dcm", 3, step_mm=5.0)
        if labelled:
            (folder / "labels.csv").write_text(csv_text([("", 0, 0), ("", 1, 1), ("", 2, 0)]))
        scan = store.scan(ingest(folder, site=store).scan_id)
        run_scan_stage(scan, StageName.SURROGATE, SurrogateConfig(), device=torch.device("cpu"))
    assert [Path(u).name for u in federated_sites(str(tmp_path / "data"))] == ["east.zarr"]
