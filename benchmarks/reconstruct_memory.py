"""Peak memory of reconstructing scans of 128 and 512 slices through the chunked driver (Zarr → Dask → FBP).

The named peer is the same driver on a 4x shorter scan: if memory is bounded by the block, the growth of the
process's peak RSS while the whole volume is computed and written does not grow with the number of slices
(``peak_growth_512_over_128`` near 1); a driver that loaded the scan whole would grow with it. The working set
of one block is the FBP back-projection's view chunk (about 6 M matrix entries plus the upsampled bins of a
16-slice block), times the Dask threads running side by side.

    python benchmarks/reconstruct_memory.py [--quick] [--json out.json]
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import parse_args, print_table, write_json

BLOCK = 16


def _child(store: str, slices: int, views: int, cols: int, n: int) -> dict[str, float]:
    import dask.array as da
    import numpy as np
    import zarr

    from schemas.geometry import Geometry, ReconGrid
    from schemas.settings import DaskSettings
    from tasks.cluster import dask_client
    from tasks.reconstruct.chunked import reconstruct_volume
    from tasks.storage import write_missing_chunks

    grid = ReconGrid(nx_pixels=n, ny_pixels=n, pixel_size_mm=1.0)
    g = Geometry(
        beam="parallel",
        n_views=views,
        angular_range_deg=180.0,
        n_detector_rows=slices,
        n_detector_cols=cols,
        detector_pitch_mm=1.0,
        grid=grid,
    )
    projections = da.from_zarr(zarr.open_array(f"{store}/projections", mode="r"))
    out = zarr.create_array(
        f"{store}/volume", shape=(slices, n, n), chunks=(BLOCK, n, n), dtype="float32", overwrite=True
    )
    volume = reconstruct_volume(projections, g, slice_block=BLOCK)
    with dask_client(DaskSettings()):  # as a flow runs it: an in-process LocalCluster, one thread per core
        volume[:BLOCK].compute()  # warm-up: operator, FFT plans, imports
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        write_missing_chunks(out, volume)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    written = zarr.open_array(f"{store}/volume", mode="r")
    assert bool(np.isfinite(written[slices - 1]).all())
    return {"rss_before_mb": base, "rss_peak_mb": peak}


def main() -> None:
    if len(sys.argv) == 7 and sys.argv[1] == "--child":
        print(json.dumps(_child(sys.argv[2], *(int(a) for a in sys.argv[3:7]))))
        return
    args = parse_args(__doc__.splitlines()[0])
    views, cols, n = (180, 96, 64) if args.quick else (360, 384, 256)
    import numpy as np
    import zarr

    rows: list[dict[str, Any]] = []
    mb = 1024 * 1024
    for slices in (128, 512):
        with tempfile.TemporaryDirectory() as tmp:
            arr = zarr.create_array(
                f"{tmp}/projections", shape=(views, slices, cols), chunks=(32, 64, cols), dtype="float32"
            )
            rng = np.random.default_rng(0)
            for r0 in range(0, slices, 64):  # written slab by slab: the parent never holds the scan either
                arr[:, r0 : r0 + 64] = rng.random((views, 64, cols), dtype=np.float32)
            res = json.loads(
                subprocess.run(
                    [sys.executable, __file__, "--child", tmp, str(slices), str(views), str(cols), str(n)],
                    capture_output=True,
                    text=True,
                    check=True,
                )
                .stdout.strip()
                .splitlines()[-1]
            )
        rows.append(
            {
                "case": f"{slices} slices, {views} views x {cols} cols -> {n}^2, block {BLOCK}",
                "method": "reconstruct_volume + write_missing_chunks (FBP, LocalCluster)",
                "projections_mb": views * slices * cols * 4 / mb,
                "volume_mb": slices * n * n * 4 / mb,
                "block_plus_output_mb": views * BLOCK * cols * 4 / mb + BLOCK * n * n * 4 / mb,
                "peak_rss_growth_mb": res["rss_peak_mb"] - res["rss_before_mb"],
            }
        )
    short, long_ = rows
    ratios = {
        "peak_growth_512_over_128": long_["peak_rss_growth_mb"] / max(short["peak_rss_growth_mb"], 1.0),
        "peak_growth_512_over_projections": long_["peak_rss_growth_mb"] / long_["projections_mb"],
    }
    print_table(rows, ratios)
    write_json(args.json, rows, ratios)


if __name__ == "__main__":
    main()
