"""End-to-end pipeline: wall time, peak memory and Prefect's own overhead for 1, 2, 4, 8 scans per site.

The named peer is the same stage drivers called in a plain Python loop with the same Dask client and no Prefect
(``direct``); the ``prefect`` row runs the ``nightly`` flow (federated round off) against a temporary Prefect API
started once beforehand. ``orchestration_overhead_fraction`` = (prefect − direct) / prefect, per run size.
Each (mode, size) runs in its own process on a fresh copy of the demo stores, so peak RSS is that run's own.

    python benchmarks/pipeline.py --quick --json pipeline.json
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import parse_args, print_table, write_json


def _one(mode: str, data_root: str) -> dict[str, float]:
    """Run one mode in this process (called in a child process)."""
    from schemas.pipeline import PipelineConfig
    from schemas.settings import get_settings
    from tasks.cluster import dask_client
    from tasks.drivers import denoise_scan, reconstruct_scan, surrogate_scan
    from tasks.pipeline_support import find_scans
    from tasks.storage import SiteStore

    config = PipelineConfig()
    if mode == "prefect":
        from prefect.testing.utilities import prefect_test_harness

        from flows.pipeline import NightlyRequest, nightly

        with prefect_test_harness(server_startup_timeout=None):
            t0 = time.perf_counter()
            report = nightly(NightlyRequest(data_root=data_root, federated=False, report=False, config=config))
            wall = time.perf_counter() - t0
        assert not report.failed, report.failed
    else:
        from concurrent.futures import ThreadPoolExecutor

        def chain(ref: object) -> None:
            scan = SiteStore.open(ref.store_uri).scan(ref.scan_id)  # type: ignore[attr-defined]
            denoise_scan(scan, config.denoise)
            reconstruct_scan(scan, config.reconstruct)
            surrogate_scan(scan, config.surrogate)

        t0 = time.perf_counter()
        with dask_client(get_settings().dask), ThreadPoolExecutor(max_workers=2) as pool:  # as nightly's runner
            list(pool.map(chain, find_scans(data_root)))
        wall = time.perf_counter() - t0
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"wall_s": wall, "peak_rss_mb": peak_mb}


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        print(json.dumps(_one(sys.argv[2], sys.argv[3])))
        return
    import argparse

    extra = argparse.ArgumentParser(add_help=False)
    extra.add_argument("--size", default=None, help="demo grid: tiny | small | medium | full")
    extra.add_argument("--slices", type=int, default=None, help="slices per scan")
    extra.add_argument("--scans-per-site", default=None, help="comma list, e.g. 1,2,4,8")
    known, rest = extra.parse_known_args()
    args = parse_args(__doc__ or "", image=False, argv=rest)
    sizes = (
        [int(x) for x in known.scans_per_site.split(",")]
        if known.scans_per_site
        else ([1, 2] if args.quick else [1, 2, 4, 8])
    )
    size = known.size or ("tiny" if args.quick else "small")
    n_sites, n_slices = 3, known.slices or (8 if args.quick else 16)
    from tasks.demo.build import build_demo_sites

    rows = []
    env = {
        **os.environ,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    }
    with tempfile.TemporaryDirectory() as tmp:
        for per_site in sizes:
            base = Path(tmp) / f"base-{per_site}"
            build_demo_sites(base, n_sites=n_sites, scans_per_site=per_site, n_slices=n_slices, seed=0, size=size)
            for mode in ("direct", "prefect"):
                work = Path(tmp) / f"{mode}-{per_site}"
                shutil.copytree(base, work)
                out = subprocess.run(
                    [sys.executable, __file__, "--child", mode, str(work)],
                    env=env,
                    capture_output=True,
                    text=True,
                    check=True,
                )
                res = json.loads(out.stdout.strip().splitlines()[-1])
                rows.append(
                    {
                        "case": f"{per_site} scans/site ({n_sites * per_site} scans, {size})",
                        "method": mode,
                        "scans": n_sites * per_site,
                        **res,
                        "s_per_scan": res["wall_s"] / (n_sites * per_site),
                    }
                )
    ratios: dict[str, float] = {}
    fractions = []
    for per_site in sizes:
        direct = next(r for r in rows if r["method"] == "direct" and r["scans"] == n_sites * per_site)
        pref = next(r for r in rows if r["method"] == "prefect" and r["scans"] == n_sites * per_site)
        frac = (pref["wall_s"] - direct["wall_s"]) / pref["wall_s"]
        pref["orchestration_overhead_fraction"] = frac
        fractions.append(frac)
    ratios["orchestration_overhead_fraction"] = fractions[-1]  # the largest run
    ratios["orchestration_overhead_fraction_smallest_run"] = fractions[0]
    print_table(rows)
    print({k: round(v, 4) for k, v in ratios.items()})
    if args.json:
        write_json(args.json, rows, ratios)


if __name__ == "__main__":
    main()
