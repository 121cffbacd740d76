"""Tests of the tomography kernels on small phantoms: invariants, oracles and peers (ASTRA, scikit-image)."""

from __future__ import annotations

import itertools
import warnings
from functools import partial

import numpy as np
import pytest
import torch

from schemas.geometry import Geometry, ReconGrid
from tasks import phantoms
from tasks.device import resolve_device
from tasks.errors import DeviceUnavailableError, InvalidInputError
from tasks.reconstruct.kernels import (
    attenuation_to_hu,
    back_project,
    fbp,
    forward_project,
    hu_to_attenuation,
    sart,
    sirt,
)

WATER = 0.0192


def psnr(image: np.ndarray, truth: np.ndarray) -> float:
    return float(10 * np.log10(truth.max() ** 2 / np.mean((image - truth) ** 2)))


def parallel(n: int = 48, views: int = 90, cols: int | None = None, **kw) -> Geometry:
    return Geometry(
        beam="parallel",
        n_views=views,
        angular_range_deg=kw.pop("angular_range_deg", 180.0),
        n_detector_cols=cols or int(n * 1.5),
        detector_pitch_mm=kw.pop("detector_pitch_mm", 1.0),
        grid=ReconGrid(nx_pixels=n, ny_pixels=kw.pop("ny", n), pixel_size_mm=kw.pop("pixel_mm", 1.0)),
        **kw,
    )


def fan(n: int = 48, views: int = 120, shape: str = "flat", **kw) -> Geometry:
    return Geometry(
        beam="fan",
        detector_shape=shape,
        n_views=views,
        n_detector_cols=kw.pop("cols", int(n * 1.5)),
        detector_pitch_mm=kw.pop("detector_pitch_mm", 2.0),
        source_to_isocenter_mm=kw.pop("sid", 150.0),
        source_to_detector_mm=kw.pop("sdd", 300.0),
        grid=ReconGrid(nx_pixels=n, ny_pixels=kw.pop("ny", n), pixel_size_mm=kw.pop("pixel_mm", 1.0)),
        **kw,
    )


GEOMETRIES = {
    "parallel": parallel(n=20, views=23, cols=31, ny=17, pixel_mm=1.3, detector_offset_cols=0.3),
    "parallel-fine-detector": parallel(n=16, views=11, cols=50, detector_pitch_mm=0.45),
    "fan-flat": fan(n=20, views=29, ny=14, detector_offset_cols=-1.2),
    "fan-curved": fan(n=20, views=29, shape="curved", angular_range_deg=250.0),
}


@pytest.mark.parametrize("name", GEOMETRIES)
def test_back_project_is_the_adjoint_of_forward_project(name: str) -> None:
    g = GEOMETRIES[name]
    rng = np.random.default_rng(1)
    x = rng.random((3, g.grid.ny_pixels, g.grid.nx_pixels), dtype=np.float32)
    y = rng.random((3, g.n_views, g.n_detector_cols), dtype=np.float32)
    ax_y = float(np.sum(forward_project(x, g).astype(np.float64) * y))
    x_aty = float(np.sum(x.astype(np.float64) * back_project(y, g)))
    assert abs(ax_y - x_aty) / abs(ax_y) < 1e-5


@pytest.mark.parametrize("name", ["parallel", "fan-flat", "fan-curved"])
def test_forward_projection_matches_exact_line_integrals_of_a_smooth_phantom(name: str) -> None:
    g = {
        "parallel": parallel(n=64, views=30),
        "fan-flat": fan(n=64, views=30),
        "fan-curved": fan(n=64, views=30, shape="curved"),
    }[name]
    # A stack of concentric disks: piecewise constant but with small steps, so pixelisation error is small.
    ellipses = tuple(phantoms.Ellipse(WATER / 8, r, 0.8 * r, 3.0, -2.0, 20.0) for r in np.linspace(6.0, 26.0, 8))
    image = phantoms.render(ellipses, g.grid, supersample=8)
    exact = phantoms.line_integrals(ellipses, g)
    sino = forward_project(image, g)
    assert np.linalg.norm(sino - exact) / np.linalg.norm(exact) < 0.01


def test_a_centre_point_gives_a_straight_line_sinogram() -> None:
    g = parallel(n=15, views=36, cols=21)
    image = np.zeros((15, 15), np.float32)
    image[7, 7] = 1.0
    sino = forward_project(image, g)
    assert np.all(np.argmax(sino, axis=1) == 10)
    # Joseph's weight of a pixel is one path step: 1 / max(|cos|, |sin|) pixels, summed over the view.
    theta = np.deg2rad(g.view_angles_deg())
    np.testing.assert_allclose(sino.sum(axis=1), 1 / np.maximum(abs(np.cos(theta)), abs(np.sin(theta))), rtol=1e-5)


def test_an_off_centre_point_traces_the_expected_sinusoid() -> None:
    g = parallel(n=31, views=24, cols=45)
    image = np.zeros((31, 31), np.float32)
    image[15 + 6, 15 - 9] = 1.0  # y = +6 mm, x = -9 mm
    sino = forward_project(image, g)
    theta = np.deg2rad(g.view_angles_deg())
    u = -9 * np.cos(theta) + 6 * np.sin(theta)
    centroid = (sino * np.arange(45)).sum(axis=1) / sino.sum(axis=1) - 22
    # Joseph's footprint is sampled at the ray spacing, so the centroid is right to a fraction of a bin.
    np.testing.assert_allclose(centroid, u, atol=0.25)


@pytest.mark.parametrize(
    ("geometry", "min_psnr"),
    [(parallel(n=64, views=120), 26.0), (fan(n=64, views=180), 26.0), (fan(n=64, views=180, shape="curved"), 26.0)],
    ids=["parallel", "fan-flat", "fan-curved"],
)
def test_fbp_of_a_forward_projection_recovers_the_phantom(geometry: Geometry, min_psnr: float) -> None:
    truth = phantoms.render(phantoms.shepp_logan(30.0), geometry.grid, supersample=4)
    recon = fbp(forward_project(truth, geometry), geometry)
    assert recon.shape == truth.shape
    assert recon.dtype == np.float32
    assert psnr(recon, truth) > min_psnr
    # The mean attenuation inside the brain region is right to 2 %.
    assert abs(recon[28:36, 28:36].mean() / truth[28:36, 28:36].mean() - 1) < 0.02


@pytest.mark.parametrize("shape", ["flat", "curved"])
def test_short_scan_with_parker_weights_matches_the_full_scan(shape: str) -> None:
    full = fan(n=48, views=240, shape=shape)
    span = full.short_scan_min_range_deg + 6.0
    short = fan(n=48, views=160, shape=shape, angular_range_deg=span)
    ellipses = phantoms.shepp_logan(22.0)
    truth = phantoms.render(ellipses, full.grid, supersample=4)
    recon_full = fbp(phantoms.line_integrals(ellipses, full), full)
    recon_short = fbp(phantoms.line_integrals(ellipses, short), short)
    assert psnr(recon_short, truth) > psnr(recon_full, truth) - 1.0
    # Without Parker weights (i.e. reading the short scan as if it were complete) it is far worse.
    no_parker = fbp(
        phantoms.line_integrals(ellipses, short), short.model_copy(update={"angular_range_deg": 360.0, "n_views": 160})
    )
    assert psnr(recon_short, truth) > psnr(no_parker, truth) + 5.0


def test_fan_beam_short_of_the_minimum_range_warns() -> None:
    g = fan(n=32, views=60, angular_range_deg=190.0)
    with pytest.warns(UserWarning, match="short-scan minimum"):
        fbp(np.zeros((60, g.n_detector_cols), np.float32), g)


def test_smoother_filters_pass_less_noise() -> None:
    g = parallel(n=64, views=120)
    noise = np.random.default_rng(7).normal(0, 0.05, (g.n_views, g.n_detector_cols)).astype(np.float32)
    std = {
        f: float(fbp(noise, g, filter_name=f)[16:48, 16:48].std()) for f in ("ram-lak", "shepp-logan", "cosine", "hann")
    }
    assert std["ram-lak"] > std["shepp-logan"] > std["cosine"] > std["hann"] > 0
    assert float(fbp(noise, g, frequency_cutoff=0.5)[16:48, 16:48].std()) < 0.6 * std["ram-lak"]


def test_fbp_agrees_with_scikit_image_iradon_on_a_disk() -> None:
    from skimage.transform import iradon

    n = 63  # odd: scikit-image puts the rotation centre on pixel n // 2
    g = parallel(n=n, views=90, cols=n)
    truth = phantoms.render(phantoms.disk(20.0, centre_mm=(4.0, -3.0)), g.grid, supersample=4)
    sino = phantoms.parallel_line_integrals(phantoms.disk(20.0, centre_mm=(4.0, -3.0)), g)
    ours = fbp(sino, g, filter_name="ram-lak")
    # scikit-image: image rows are y, angles turn the other way, detector along axis 0.
    theirs = iradon(
        sino.T, theta=-np.asarray(g.view_angles_deg()), filter_name="ramp", circle=False, output_size=n
    ).astype(np.float32)
    inside = np.hypot(*np.meshgrid(np.arange(n) - n // 2, np.arange(n) - n // 2)) < 28
    assert np.linalg.norm((ours - theirs)[inside]) / np.linalg.norm(theirs[inside]) < 0.03
    assert abs(psnr(ours, truth) - psnr(theirs, truth)) < 1.0


def _astra_sino(image: np.ndarray, g: Geometry, projector: str, kind: str) -> np.ndarray:
    astra = pytest.importorskip("astra")
    vol = astra.create_vol_geom(g.grid.ny_pixels, g.grid.nx_pixels)
    angles = np.deg2rad(g.view_angles_deg())
    if kind == "parallel":
        pg = astra.create_proj_geom("parallel", g.detector_pitch_mm, g.n_detector_cols, angles)
    else:
        sid, sdd = g.source_to_isocenter_mm, g.source_to_detector_mm
        pg = astra.create_proj_geom("fanflat", g.detector_pitch_mm, g.n_detector_cols, angles, sid, sdd - sid)
    pid = astra.create_projector(projector, pg, vol)
    try:
        # ASTRA's y axis points the other way: flip the rows.
        sid_, sino = astra.create_sino(np.ascontiguousarray(image[::-1]), pid)
        astra.data2d.delete(sid_)
    finally:
        astra.projector.delete(pid)
    return sino.astype(np.float32)


def test_parallel_projection_equals_astras_joseph_projector() -> None:
    g = parallel(n=40, views=30)  # pixel = detector pitch = 1 mm, so ASTRA's units are ours
    image = np.random.default_rng(3).random((40, 40), dtype=np.float32)
    theirs = _astra_sino(image, g, "linear", "parallel")
    ours = forward_project(image, g)
    assert np.linalg.norm(ours - theirs) / np.linalg.norm(theirs) < 1e-4


def test_fan_projection_agrees_with_astra_fanflat_on_a_smooth_image() -> None:
    g = fan(n=48, views=40, cols=80)
    yy, xx = np.mgrid[-23.5:24, -23.5:24]
    image = (np.exp(-((xx - 5) ** 2 + (yy + 3) ** 2) / 150.0) * WATER).astype(np.float32)
    theirs = _astra_sino(image, g, "line_fanflat", "fan")
    ours = forward_project(image, g)
    assert np.linalg.norm(ours - theirs) / np.linalg.norm(theirs) < 0.01


def test_fbp_agrees_with_astra_fbp_on_a_disk() -> None:
    astra = pytest.importorskip("astra")
    g = parallel(n=64, views=90)
    ellipses = phantoms.disk(22.0, centre_mm=(-5.0, 3.0))
    truth = phantoms.render(ellipses, g.grid, supersample=4)
    sino = phantoms.parallel_line_integrals(ellipses, g)
    vol = astra.create_vol_geom(64, 64)
    pg = astra.create_proj_geom("parallel", 1.0, g.n_detector_cols, np.deg2rad(g.view_angles_deg()))
    pid = astra.create_projector("linear", pg, vol)
    sino_id = astra.data2d.create("-sino", pg, sino)
    rec_id = astra.data2d.create("-vol", vol)
    cfg = astra.astra_dict("FBP")
    cfg.update(ProjectorId=pid, ProjectionDataId=sino_id, ReconstructionDataId=rec_id)
    alg = astra.algorithm.create(cfg)
    try:
        astra.algorithm.run(alg)
        theirs = astra.data2d.get(rec_id)[::-1].astype(np.float32)
    finally:
        astra.algorithm.delete(alg)
        astra.data2d.delete([sino_id, rec_id])
        astra.projector.delete(pid)
    ours = fbp(sino, g)
    assert psnr(ours, truth) > psnr(theirs, truth) - 0.2
    assert np.linalg.norm(ours - theirs) / np.linalg.norm(theirs) < 0.05


@pytest.mark.parametrize("method", [sart, sirt])
def test_iterations_decrease_the_data_residual_monotonically(method) -> None:
    g = parallel(n=32, views=40) if method is sirt else fan(n=32, views=40)
    truth = phantoms.render(phantoms.shepp_logan(15.0), g.grid, supersample=2)
    sino = forward_project(truth, g)
    image = np.zeros_like(truth)
    residuals = [float(np.linalg.norm(sino))]
    for _ in range(6):
        image = method(sino, g, iterations=1, relaxation=0.9, initial=image)
        residuals.append(float(np.linalg.norm(forward_project(image, g) - sino)))
    assert all(b < a for a, b in itertools.pairwise(residuals))
    assert residuals[-1] < 0.2 * residuals[0]
    assert image.min() >= 0  # nonnegative by default


def test_sart_converges_towards_the_phantom() -> None:
    g = parallel(n=32, views=48)
    truth = phantoms.render(phantoms.shepp_logan(15.0), g.grid, supersample=2)
    sino = forward_project(truth, g)
    assert psnr(sart(sino, g, iterations=5), truth) > psnr(sart(sino, g, iterations=1), truth) + 2.0


def test_zero_iterations_return_the_start_image() -> None:
    g = parallel(n=16, views=10)
    start = np.random.default_rng(0).random((2, 16, 16), dtype=np.float32)
    out = sirt(np.zeros((2, 10, 24), np.float32), g, iterations=0, initial=start)
    np.testing.assert_array_equal(out, start)


def test_kernels_do_not_mutate_inputs_and_keep_the_array_kind() -> None:
    g = parallel(n=16, views=10)
    x = np.random.default_rng(0).random((2, 16, 16), dtype=np.float32)
    x_copy = x.copy()
    sino = forward_project(x, g)
    assert isinstance(sino, np.ndarray)
    assert sino.shape == (2, 10, 24)
    np.testing.assert_array_equal(x, x_copy)
    t = torch.from_numpy(sino.copy())
    out = fbp(t, g)
    assert isinstance(out, torch.Tensor)
    assert out.dtype == torch.float32
    assert torch.equal(t, torch.from_numpy(sino))
    np.testing.assert_allclose(out.numpy(), fbp(sino, g), rtol=1e-6, atol=1e-7)
    # 2-D in, 2-D out; slices are independent.
    np.testing.assert_allclose(forward_project(x[1], g), sino[1], rtol=1e-6)


def test_sinogram_shape_mismatch_names_expected_and_got() -> None:
    g = parallel(n=16, views=10)
    with pytest.raises(InvalidInputError, match=r"expected \(\.\.\., 10, 24\).*got \(\.\.\., 12, 24\)"):
        fbp(np.zeros((1, 12, 24), np.float32), g)
    with pytest.raises(InvalidInputError, match="images shape"):
        forward_project(np.zeros((1, 16, 15), np.float32), g)


def test_non_finite_sinogram_is_refused_naming_slice_and_view() -> None:
    g = parallel(n=16, views=10)
    sino = np.zeros((3, 10, 24), np.float32)
    sino[2, 7, 5] = np.nan
    for method in (fbp, back_project):
        with pytest.raises(InvalidInputError, match="slice 2, view 7, column 5"):
            method(sino, g)
    with pytest.raises(InvalidInputError, match="slice 2, view 7"):
        sart(sino, g, iterations=1)


def test_detector_too_narrow_warns_by_how_many_mm() -> None:
    g = parallel(n=32, views=10, cols=20)  # covers 10 mm of a 16 mm inscribed radius
    sino = np.zeros((10, 20), np.float32)
    for reconstruct in (fbp, partial(sirt, iterations=0), partial(sart, iterations=0)):
        with pytest.warns(UserWarning, match=r"6\.00 mm short"):
            reconstruct(sino, g)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the adjoint is an operator, not a reconstruction: no warning
        back_project(sino, g)


def test_bad_options_are_refused() -> None:
    g = parallel(n=16, views=10)
    sino = np.zeros((10, 24), np.float32)
    with pytest.raises(InvalidInputError, match="filter_name"):
        fbp(sino, g, filter_name="butterworth")  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError, match="frequency_cutoff"):
        fbp(sino, g, frequency_cutoff=1.5)
    with pytest.raises(InvalidInputError, match="relaxation"):
        sirt(sino, g, iterations=1, relaxation=2.5)
    with pytest.raises(InvalidInputError, match="iterations"):
        sart(sino, g, iterations=-1)


def test_hu_round_trip() -> None:
    hu = np.array([-1000.0, 0.0, 1000.0, 40.0], np.float32)
    mu = hu_to_attenuation(hu, water_attenuation_per_mm=WATER)
    np.testing.assert_allclose(mu, [0.0, WATER, 2 * WATER, 1.04 * WATER], rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(attenuation_to_hu(mu, water_attenuation_per_mm=WATER), hu, atol=1e-3)
    t = attenuation_to_hu(torch.tensor([WATER]), water_attenuation_per_mm=WATER)
    assert isinstance(t, torch.Tensor)
    assert abs(float(t[0])) < 1e-3
    with pytest.raises(InvalidInputError, match="water_attenuation_per_mm"):
        hu_to_attenuation(hu, water_attenuation_per_mm=0.0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is present here")
def test_cuda_request_without_cuda_raises_device_unavailable() -> None:
    with pytest.raises(DeviceUnavailableError, match="no CUDA device"):
        resolve_device("cuda")
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(InvalidInputError, match="device must be"):
        resolve_device("tpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_results_match_the_cpu() -> None:
    cuda = resolve_device("cuda")
    for g in (parallel(n=48, views=60), fan(n=48, views=60, shape="curved")):
        truth = phantoms.render(phantoms.shepp_logan(22.0), g.grid, supersample=2)
        sino_cpu = forward_project(truth, g)
        sino_gpu = forward_project(torch.from_numpy(truth), g, device=cuda)
        assert sino_gpu.device.type == "cuda"
        np.testing.assert_allclose(sino_gpu.cpu().numpy(), sino_cpu, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(fbp(sino_gpu, g).cpu().numpy(), fbp(sino_cpu, g), rtol=1e-3, atol=1e-4)
        bp_gpu = back_project(torch.from_numpy(sino_cpu), g, device=cuda).cpu().numpy()
        np.testing.assert_allclose(bp_gpu, back_project(sino_cpu, g), rtol=1e-4, atol=1e-3)
        np.testing.assert_allclose(
            sirt(sino_gpu, g, iterations=3).cpu().numpy(), sirt(sino_cpu, g, iterations=3), rtol=1e-3, atol=1e-4
        )


def test_warnings_are_quiet_for_a_well_posed_geometry() -> None:
    g = parallel(n=16, views=10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fbp(np.zeros((10, 24), np.float32), g)
