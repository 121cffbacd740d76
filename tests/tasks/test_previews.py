"""Previews are read from stored arrays: the raw-data FBP slice is written once, at reconstruct time."""

from __future__ import annotations

import base64
import io
import re

import numpy as np
import pytest
import torch
from PIL import Image

from schemas.pipeline import PipelineConfig
from schemas.settings import PrivacySettings
from tests.flows.test_pipeline_flows import make_site


def _reconstructed(root, **kwargs):
    from tasks.stages import run_scan_stage

    site = make_site(root, site_id="P", **kwargs)
    scan = site.scans()[0]
    run_scan_stage(scan, "reconstruct", PipelineConfig().reconstruct, device=torch.device("cpu"))
    return scan


def _png_tiles(png: bytes, n: int) -> list[np.ndarray]:
    img = np.asarray(Image.open(io.BytesIO(png)).convert("L"), dtype=np.float32)
    tile = img.shape[0] - 18
    assert img.shape[1] == n * tile
    return [img[18:, i * tile : (i + 1) * tile] for i in range(n)]


def test_reconstruct_writes_the_raw_central_slice_fbp_as_preview_raw(tmp_path):
    from tasks.previews import PREVIEW_RAW
    from tasks.reconstruct.kernels import attenuation_to_hu, fbp

    scan = _reconstructed(tmp_path, rows=4, cols=32, views=90)
    config = PipelineConfig().reconstruct
    rec = scan.stage_record("reconstruct")
    assert rec is not None and set(rec.outputs) == {"volume", PREVIEW_RAW}
    preview = scan.array(PREVIEW_RAW)
    assert preview.shape == (1, 32, 32)
    k = 1  # central of 4 detector rows: the lower middle one
    assert preview.attrs["slice_index"] == k and preview.attrs["units"] == "HU"
    raw = np.asarray(scan.array("projections")[:, k, :], dtype=np.float32)
    expected = attenuation_to_hu(
        np.asarray(fbp(raw[None], scan.manifest.geometry, filter_name=config.filter_name))[0],
        water_attenuation_per_mm=scan.manifest.water_attenuation_per_mm,
    )
    np.testing.assert_allclose(preview[0], expected, rtol=1e-4, atol=1e-2)


def test_previews_and_report_run_no_reconstruction(tmp_path, monkeypatch):
    import tasks.reconstruct.chunked as chunked
    import tasks.reconstruct.kernels as kernels
    from tasks.previews import reconstruction_preview, report_previews

    scan = _reconstructed(tmp_path, rows=3, cols=32, views=90)

    def refuse(*args, **kwargs):
        raise AssertionError("a preview must read stored arrays, not reconstruct")

    for module, name in [(kernels, "fbp"), (chunked, "reconstruct_volume"), (chunked, "_reconstruct_block")]:
        monkeypatch.setattr(module, name, refuse)
    preview = reconstruction_preview(scan)
    assert preview is not None and preview.plaintext
    raw_tile, stored_tile = _png_tiles(preview.png, 2)
    # the tiles show what is stored: raw FBP and the volume's central slice (windowed, resized: correlation)
    for tile, stored in [(raw_tile, scan.array("preview_raw")[0]), (stored_tile, scan.array("volume")[1])]:
        small = np.asarray(Image.fromarray(tile).resize(stored.shape[::-1], Image.Resampling.BILINEAR))
        assert np.corrcoef(small.ravel(), np.clip(stored, -200, 300).ravel())[0, 1] > 0.9
    previews = report_previews(str(tmp_path))
    assert [p.plaintext for p in previews] == [True]  # no surrogate yet: the slice montage only
    assert len(_png_tiles(previews[0].png, 2)) == 2  # raw FBP, FBP (make_site stores no truth)


def test_a_store_reconstructed_before_previews_were_stored_shows_the_stored_slice_only(tmp_path):
    from tasks.previews import PREVIEW_RAW, reconstruction_preview

    scan = _reconstructed(tmp_path, rows=3, cols=32, views=90)
    del scan.group[PREVIEW_RAW]
    preview = reconstruction_preview(scan)
    assert preview is not None
    _png_tiles(preview.png, 1)  # one panel: no FBP is run to make up the missing one


@pytest.mark.parametrize("share", [False, True])
def test_plaintext_previews_leave_only_under_the_opt_in(tmp_path, share):
    from tasks.previews import publishable, reconstruction_preview, surrogate_preview
    from tasks.stages import run_scan_stage

    scan = _reconstructed(tmp_path, rows=3, cols=32, views=90)
    run_scan_stage(scan, "surrogate", PipelineConfig().surrogate, device=torch.device("cpu"))
    policy = PrivacySettings(share_images=share)
    plain, surrogate = reconstruction_preview(scan), surrogate_preview(scan)
    assert plain is not None and surrogate is not None and not surrogate.plaintext
    assert (publishable(plain, policy) is plain) is share
    assert publishable(surrogate, policy) is surrogate
    assert publishable(None, policy) is None
    data = re.search(r"base64,([A-Za-z0-9+/=]+)\)", surrogate.markdown())
    assert data is not None and base64.b64decode(data.group(1)) == surrogate.png


def test_share_images_defaults_off_and_reads_the_environment(monkeypatch):
    from schemas.settings import FedscanSettings

    monkeypatch.delenv("FEDSCAN_PRIVACY__SHARE_IMAGES", raising=False)
    assert FedscanSettings().privacy.share_images is False
    monkeypatch.setenv("FEDSCAN_PRIVACY__SHARE_IMAGES", "true")
    assert FedscanSettings().privacy.share_images is True


@pytest.mark.parametrize(("pixels", "expected"), [(256, 256), (300, 150), (512, 256), (513, 171)])
def test_the_raw_preview_grid_is_at_most_a_tile_over_the_same_field_of_view(pixels, expected):
    import dask.array as da

    from schemas.geometry import Geometry, ReconGrid
    from tasks.previews import PREVIEW_TILE_PX, raw_preview_output

    geometry = Geometry(
        beam="parallel",
        n_views=90,
        n_detector_cols=pixels,
        n_detector_rows=3,
        detector_pitch_mm=1.0,
        grid=ReconGrid(nx_pixels=pixels, ny_pixels=pixels, pixel_size_mm=1.0),
    )
    config = PipelineConfig().reconstruct
    out = raw_preview_output(
        da.zeros((90, 3, pixels), dtype=np.float32),
        geometry,
        config,
        water_attenuation_per_mm=0.0192,
        device=torch.device("cpu"),
    )
    assert out.data.shape == (1, expected, expected)  # lazy: nothing computed
    assert expected <= PREVIEW_TILE_PX
    factor = -(-pixels // PREVIEW_TILE_PX)
    assert abs(expected * factor - pixels) < factor  # the same field of view, to within one coarse pixel
