"""The stages on Dask worker processes: Dask's default worker environment against fedscan's allocator settings.

A Dask nanny starts each worker process with ``MALLOC_TRIM_THRESHOLD_=65536`` (``distributed.nanny.
pre-spawn-environ``), so that freed memory goes back to the system at once. Setting it also switches off glibc's
adaptive ``mmap`` threshold: every allocation above 128 KiB is then a fresh mapping, and its pages fault in again
on first touch, call after call. fedscan's kernels allocate chunk-sized intermediates (FFT spectra, blocks of
views) many times per task. The ``fedscan`` variant keeps freed memory up to ``MALLOC_TRIM_THRESHOLD_`` = 128 MiB
per heap and serves allocations below ``MALLOC_MMAP_THRESHOLD_`` = 32 MiB from the heap
(:data:`schemas.settings.WORKER_ALLOCATOR_ENVIRON`).

Each run: a fresh copy of the same demo stores; a ``LocalCluster`` of ``--workers`` worker processes with one
thread each, started with the variant's environment; the three stage drivers (denoise, reconstruct, surrogate)
scan after scan, each timed; then every worker's peak RSS. Variants alternate run by run (``--repeat``), and each
stage keeps its fastest run.

Ratio keys: ``speedup_<stage>`` and ``speedup_total`` (Dask's default time / fedscan's), and
``worker_peak_rss_ratio`` (fedscan's largest worker peak RSS / Dask's default's).

    python benchmarks/worker_env.py --quick
    python benchmarks/worker_env.py --size full --slices 16 --scans-per-site 1 --repeat 2 --cache-dir /tmp/bases
"""

from __future__ import annotations

import argparse
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._common import parse_args, print_table, write_json
from schemas.stages import PIPELINE

STAGES = tuple(spec.name.value for spec in PIPELINE)


def _worker_peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_variant(base: Path, environ: dict[str, str], *, workers: int) -> dict[str, float]:
    """Stage wall times (s) over all scans of a fresh copy of ``base``, and the workers' largest peak RSS (MB)."""
    import torch
    from distributed import Client, LocalCluster

    from schemas.pipeline import PipelineConfig
    from tasks.cluster import worker_environ
    from tasks.pipeline_support import find_scans
    from tasks.stages import run_scan_stage
    from tasks.storage import SiteStore

    config = PipelineConfig()
    with tempfile.TemporaryDirectory(prefix="fedscan-workerenv-") as tmp:
        root = Path(tmp) / "data"
        shutil.copytree(base, root)
        with worker_environ(environ):
            cluster = LocalCluster(
                n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None, memory_limit=None
            )
        times = dict.fromkeys(STAGES, 0.0)
        try:
            with Client(cluster) as client:
                seen = client.run(lambda: {k: __import__("os").environ.get(k) for k in environ})
                for got in seen.values():
                    assert got == environ, f"worker environment {got} is not {environ}"
                for ref in find_scans(str(root)):
                    scan = SiteStore.open(ref.store_uri).scan(ref.scan_id)
                    for stage in STAGES:
                        t0 = time.perf_counter()
                        run_scan_stage(scan, stage, config.stage_config(stage), device=torch.device("cpu"))
                        times[stage] += time.perf_counter() - t0
                peak = max(client.run(_worker_peak_rss_mb).values())
        finally:
            cluster.close()
    return {**times, "total": sum(times.values()), "worker_peak_rss_mb": peak}


def main() -> None:
    import dask
    import distributed  # noqa: F401  (registers the nanny defaults read below)

    from schemas.settings import WORKER_ALLOCATOR_ENVIRON

    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--size", default=None, help="demo grid: tiny | small | medium | full")
    parser.add_argument("--slices", type=int, default=None, help="slices per scan")
    parser.add_argument("--scans-per-site", type=int, default=1)
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2, help="worker processes (one thread each)")
    parser.add_argument("--repeat", type=int, default=1, help="runs per variant, alternating; the fastest counts")
    parser.add_argument("--cache-dir", type=Path, default=None, help="keep the built demo stores here for reuse")
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        help="another environment to compare, NAME=KEY:VALUE,KEY:VALUE (repeatable)",
    )
    args = parse_args(__doc__.splitlines()[0], parents=[parser])
    size = args.size or ("small" if args.quick else "medium")
    slices = args.slices or (4 if args.quick else 16)

    from pipeline import _base

    cache = args.cache_dir or Path(tempfile.mkdtemp(prefix="fedscan-workerenv-cache-"))
    cache.mkdir(parents=True, exist_ok=True)
    base = _base(cache, size, args.sites, slices, args.scans_per_site, None)
    dask_trim = str(dask.config.get("distributed.nanny.pre-spawn-environ")["MALLOC_TRIM_THRESHOLD_"])
    variants = {"dask default": {"MALLOC_TRIM_THRESHOLD_": dask_trim}, "fedscan": dict(WORKER_ALLOCATOR_ENVIRON)}
    for spec in args.variant:
        name, _, pairs = spec.partition("=")
        variants[name] = dict(pair.split(":", 1) for pair in pairs.split(","))
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in variants}
    for i in range(args.repeat):
        for name, environ in variants.items():
            result = run_variant(base, environ, workers=args.workers)
            runs[name].append(result)
            print(f"run {i + 1} {name}: " + ", ".join(f"{k} {v:.2f}" for k, v in result.items()), flush=True)
    best = {name: {k: min(r[k] for r in rs) for k in (*STAGES, "total")} for name, rs in runs.items()}
    rows: list[dict[str, Any]] = []
    for name, rs in runs.items():
        row: dict[str, Any] = {"variant": name, **{f"{k}_s": best[name][k] for k in (*STAGES, "total")}}
        row["worker_peak_rss_mb"] = max(r["worker_peak_rss_mb"] for r in rs)
        row["total_s_all"] = [round(r["total"], 2) for r in rs]
        rows.append(row)
    ratios = {f"speedup_{k}": best["dask default"][k] / best["fedscan"][k] for k in (*STAGES, "total")}
    ratios["worker_peak_rss_ratio"] = rows[1]["worker_peak_rss_mb"] / rows[0]["worker_peak_rss_mb"]
    for name in list(variants)[2:]:
        ratios[f"speedup_total_{name}"] = best["dask default"]["total"] / best[name]["total"]
    print(f"{size} grid, {slices} slices, {args.sites} sites x {args.scans_per_site} scans, {args.workers} workers")
    print_table(rows, ratios)
    write_json(args.json, rows, ratios, settings=vars(args) | {"json": str(args.json), "cache_dir": str(cache)})


if __name__ == "__main__":
    main()
