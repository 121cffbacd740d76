"""Reconstruction benchmark: fedscan FBP/SART vs ASTRA (CPU; CUDA where present) and scikit-image iradon.

The same sinograms (exact line integrals of an analytic Shepp–Logan phantom, or ASTRA's projection of
``--image``) are reconstructed by every tool; quality is PSNR/SSIM against the ground-truth image
(skimage.metrics), speed is seconds per slice, fedscan on a block of slices (as the pipeline runs it),
the peers slice by slice. Also: forward-projection agreement with ASTRA on a smooth image, the FLOPs
per slice of fedscan's FBP back-projection and the fraction of this machine's sgemm peak it reaches.

    python benchmarks/reconstruct.py [--quick] [--json out.json] [--image img.npy --pixel-mm 0.8]
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.ndimage import gaussian_filter
from skimage.metrics import peak_signal_noise_ratio, structural_similarity
from skimage.transform import iradon

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import best_time, on_threads, parse_args, print_table, sgemm_flops_per_s, write_json
from schemas.geometry import Geometry, ReconGrid
from tasks import phantoms
from tasks.reconstruct.kernels import FilterName, fbp, forward_project, sart

try:
    import astra
except ImportError:  # pragma: no cover - astra is a dev dependency
    astra = None


def quality(image: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    data_range = float(truth.max() - truth.min())
    return {
        "psnr_db": float(peak_signal_noise_ratio(truth, image.astype(np.float32), data_range=data_range)),
        "ssim": float(structural_similarity(truth, image.astype(np.float32), data_range=data_range)),
    }


def astra_geometry(g: Geometry) -> tuple[Any, Any]:
    vol = astra.create_vol_geom(g.grid.ny_pixels, g.grid.nx_pixels)
    angles = np.deg2rad(g.view_angles_deg())
    if not g.is_fan:
        return vol, astra.create_proj_geom(
            "parallel", g.detector_pitch_mm / g.grid.pixel_size_mm, g.n_detector_cols, angles
        )
    pix = g.grid.pixel_size_mm  # ASTRA works in pixel units
    assert g.source_to_isocenter_mm is not None  # fan beam
    assert g.source_to_detector_mm is not None
    sid, sdd = g.source_to_isocenter_mm / pix, g.source_to_detector_mm / pix
    return vol, astra.create_proj_geom("fanflat", g.detector_pitch_mm / pix, g.n_detector_cols, angles, sid, sdd - sid)


def astra_project(image: np.ndarray, g: Geometry, projector: str) -> np.ndarray:
    vol, pg = astra_geometry(g)
    pid = astra.create_projector(projector, pg, vol)
    try:
        sid, sino = astra.create_sino(np.ascontiguousarray(image[::-1]), pid)  # ASTRA's y axis is flipped
        astra.data2d.delete(sid)
    finally:
        astra.projector.delete(pid)
    return sino.astype(np.float32) * g.grid.pixel_size_mm


def astra_reconstruct(
    sino: np.ndarray, g: Geometry, algorithm: str, *, iterations: int = 1, filter_type: str | None = None
) -> np.ndarray:
    vol, pg = astra_geometry(g)
    cuda = algorithm.endswith("_CUDA")
    pid = None if cuda else astra.create_projector("linear" if not g.is_fan else "line_fanflat", pg, vol)
    sino_id = astra.data2d.create("-sino", pg, sino / g.grid.pixel_size_mm)
    rec_id = astra.data2d.create("-vol", vol)
    cfg = astra.astra_dict(algorithm)
    cfg.update(ProjectionDataId=sino_id, ReconstructionDataId=rec_id)
    if pid is not None:
        cfg["ProjectorId"] = pid
    if filter_type is not None:
        cfg["FilterType"] = filter_type
    alg = astra.algorithm.create(cfg)
    try:
        astra.algorithm.run(alg, iterations)
        out = astra.data2d.get(rec_id)[::-1] / g.grid.pixel_size_mm
    finally:
        astra.algorithm.delete(alg)
        astra.data2d.delete([sino_id, rec_id])
        if pid is not None:
            astra.projector.delete(pid)
    return out.astype(np.float32)


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], image=True)
    n, views, block = (256, 360, 4) if args.quick else (512, 720, 16)
    if args.image is not None:
        truth = np.load(args.image).astype(np.float32)
        if truth.ndim != 2 or truth.shape[0] != truth.shape[1]:
            raise SystemExit(f"--image must be a square 2-D array, got shape {truth.shape}")
        n, pix = truth.shape[0], args.pixel_mm
        grid = ReconGrid(nx_pixels=n, ny_pixels=n, pixel_size_mm=pix)
        ellipses = None
    else:
        pix = 1.0
        grid = ReconGrid(nx_pixels=n, ny_pixels=n, pixel_size_mm=pix)
        ellipses = phantoms.shepp_logan(0.95 * n / 2 * pix)
        truth = phantoms.render(ellipses, grid, supersample=4)
    cols = int(1.5 * n)
    cases = {
        "parallel": Geometry(
            beam="parallel",
            n_views=views,
            angular_range_deg=180.0,
            n_detector_cols=cols,
            detector_pitch_mm=pix,
            grid=grid,
        ),
        "fan": Geometry(
            beam="fan",
            n_views=views,
            n_detector_cols=cols,
            detector_pitch_mm=2 * pix,
            source_to_isocenter_mm=2.0 * n * pix,
            source_to_detector_mm=4.0 * n * pix,
            grid=grid,
        ),
    }
    rows: list[dict[str, Any]] = []
    ratios: dict[str, float] = {}
    peak = sgemm_flops_per_s() / 1e9
    has_astra_cuda = astra is not None and astra.use_cuda()
    smooth = gaussian_filter(truth, 2.0)
    for case, g in cases.items():
        if ellipses is not None:
            sino = phantoms.line_integrals(ellipses, g)
        else:
            sino = astra_project(truth, g, "linear" if not g.is_fan else "line_fanflat")
        stack = np.repeat(sino[None], block, axis=0)
        # Forward-projection agreement with ASTRA on a smooth image.
        if astra is not None:
            for projector in ["linear", "strip"] if not g.is_fan else ["line_fanflat", "strip_fanflat"]:
                ours = forward_project(smooth, g)
                theirs = astra_project(smooth, g, projector)
                rel = float(np.linalg.norm(ours - theirs) / np.linalg.norm(theirs))
                rows.append({"case": case, "method": f"forward_project vs astra {projector}", "rel_l2": rel})
                ratios[f"projection_rel_l2_vs_astra_{projector}"] = rel
        filters: tuple[tuple[FilterName, str], ...] = (("ram-lak", "ram-lak"), ("hann", "hann"))
        for filter_name, astra_filter in filters:
            fbp(stack[:1], g, filter_name=filter_name)  # warm-up
            seconds, recon = best_time(lambda: fbp(stack, g, filter_name=filter_name), repeat=2)  # noqa: B023
            per_slice = seconds / block
            one_core, _ = best_time(on_threads(1, lambda: fbp(stack, g, filter_name=filter_name)), repeat=2)  # noqa: B023
            per_slice_one_core = one_core / block
            bp_flops = 2.0 * n * n * views  # one multiply-add per pixel-view (nearest sub-bin sample)
            n_pad = max(64, 1 << math.ceil(math.log2(2 * cols)))
            fft_flops = views * 2 * 5 * n_pad * math.log2(n_pad)
            flops = bp_flops + fft_flops
            row: dict[str, Any] = {
                "case": case,
                "method": f"fedscan fbp {filter_name}",
                "seconds_per_slice": per_slice,
                "seconds_per_slice_1_thread": per_slice_one_core,
                **quality(recon[0], truth),
                "gflop_per_slice": flops / 1e9,
                "gflops": flops / per_slice / 1e9,
                "block": block,
            }
            rows.append(row)
            if case == "parallel" and filter_name == "ram-lak":
                ratios["peak_fraction"] = flops / per_slice / 1e9 / peak
                fedscan_ramlak = row
            if astra is not None and not g.is_fan:
                seconds, theirs = best_time(
                    lambda: astra_reconstruct(sino, g, "FBP", filter_type=astra_filter),  # noqa: B023
                    repeat=2,
                )
                arow: dict[str, Any] = {
                    "case": case,
                    "method": f"astra FBP_CPU {astra_filter}",
                    "seconds_per_slice": seconds,
                    **quality(theirs, truth),
                    "block": 1,
                }
                rows.append(arow)
                if filter_name == "ram-lak":
                    ratios["fbp_speed_vs_astra"] = seconds / fedscan_ramlak["seconds_per_slice"]
                    ratios["fbp_speed_vs_astra_per_core"] = seconds / fedscan_ramlak["seconds_per_slice_1_thread"]
                    ratios["fbp_psnr_minus_astra_db"] = fedscan_ramlak["psnr_db"] - arow["psnr_db"]
                else:
                    ratios["fbp_hann_psnr_minus_astra_db"] = row["psnr_db"] - arow["psnr_db"]
            if has_astra_cuda:
                algorithm = "FBP_CUDA"
                seconds, theirs = best_time(lambda: astra_reconstruct(sino, g, algorithm, filter_type=astra_filter))  # noqa: B023
                rows.append(
                    {
                        "case": case,
                        "method": f"astra {algorithm} {astra_filter}",
                        "seconds_per_slice": seconds,
                        **quality(theirs, truth),
                        "block": 1,
                    }
                )
        if not g.is_fan:
            angles = -np.asarray(g.view_angles_deg())
            seconds, theirs = best_time(
                lambda: iradon(sino.T, theta=angles, filter_name="ramp", circle=False, output_size=n)  # noqa: B023
            )
            rows.append(
                {
                    "case": case,
                    "method": "skimage iradon ramp",
                    "seconds_per_slice": seconds,
                    **quality(theirs.astype(np.float32), truth),
                    "block": 1,
                }
            )
        # Iterative: one SART sweep on the block vs ASTRA SIRT_CPU iterations on one slice.
        # One sweep, no matrix reuse between sweeps: the conservative per-iteration cost (a run of several
        # sweeps reuses what fits in the operator cache).
        sart_block = block
        seconds, recon = best_time(lambda: sart(stack[:sart_block], g, iterations=1, relaxation=0.9))  # noqa: B023
        one_core, _ = best_time(on_threads(1, lambda: sart(stack[:sart_block], g, iterations=1, relaxation=0.9)))  # noqa: B023
        sart_row: dict[str, Any] = {
            "case": case,
            "method": "fedscan sart (1 sweep)",
            "seconds_per_slice_iteration": seconds / sart_block,
            "seconds_per_slice_iteration_1_thread": one_core / sart_block,
            **quality(recon[0], truth),
            "block": sart_block,
        }
        rows.append(sart_row)
        if astra is not None:
            iters = 2
            seconds, theirs = best_time(lambda: astra_reconstruct(sino, g, "SIRT", iterations=iters))  # noqa: B023
            rows.append(
                {
                    "case": case,
                    "method": f"astra SIRT_CPU ({iters} it)",
                    "seconds_per_slice_iteration": seconds / iters,
                    **quality(theirs, truth),
                    "block": 1,
                }
            )
            prefix = "" if not g.is_fan else "fan_"
            astra_it = seconds / iters
            ratios[f"{prefix}sart_iteration_speed_vs_astra_sirt"] = astra_it / sart_row["seconds_per_slice_iteration"]
            ratios[f"{prefix}sart_iteration_speed_vs_astra_sirt_per_core"] = (
                astra_it / sart_row["seconds_per_slice_iteration_1_thread"]
            )
    meta = {
        "size": n,
        "views": views,
        "detector_cols": cols,
        "block": block,
        "sgemm_gflops": peak,
        "torch_threads": torch.get_num_threads(),
        "device": "cpu",
        "astra_cuda": has_astra_cuda,
    }
    print(
        f"# {n}x{n}, {views} views, {cols} cols, block {block}; sgemm peak {peak:.1f} GFLOP/s, "
        f"{torch.get_num_threads()} torch threads"
    )
    print_table(rows, ratios)
    write_json(args.json, rows, ratios, meta=meta)


if __name__ == "__main__":
    main()
