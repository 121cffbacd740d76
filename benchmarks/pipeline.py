"""End-to-end pipeline: wall time, peak memory and Prefect's own overhead for 1, 2, 4, 8 scans per site.

Four runs per size, each in its own process on a fresh copy of the same demo stores (so peak RSS is that
run's own), with the same Dask client and the same two-thread bound on scans in flight:

``prefect``
    The ``nightly`` flow (federated round off, run report on) against a temporary Prefect API started
    beforehand in the same process and warmed by one no-op flow run, as a long-running server would be (a fresh
    server answers its first requests ~3 s late). Its stage tasks render the UI previews and create the
    artifacts; the flow writes ``report.html``.
``direct``
    The named peer: the same stage drivers in a plain loop with no Prefect, doing fedscan's own work product
    too — the same preview images (``tasks.previews``: ``reconstruction_preview``, ``surrogate_preview``) per scan
    and the same ``report.html`` (``publish_run_report``) — which users want whatever the orchestrator. It times
    the previews and the report themselves (``preview_report_s``: the preview calls' seconds summed over the
    scans, plus the report's).
``bare``
    The stage drivers alone (no previews, no report): the peer of the first definition.
``skeleton``
    ``nightly`` again on the stores the ``prefect`` run has just processed, in a fresh server: every stage finds
    itself done and skips, and the previews return the real run's markdown (rendered before the clock starts), so
    the run makes the same task runs, state changes, logs and artifact API calls with no stage work. Its wall
    time is orchestration measured directly rather than as the difference of two noisy totals.

With ``--repeat N`` the modes run N times, interleaved, and each mode's fastest run counts (the machine is shared;
a burst of load from elsewhere only ever slows a run down); every run's wall time is kept in ``wall_s_all``.

``preview_report_fraction`` = the ``direct`` run's ``preview_report_s`` / its wall time, for the largest size
run: what the pictures cost of a whole run (the preview slice itself is computed by the reconstruct stage, in
every mode). ``preview_report_fraction_vs_bare`` = (direct − bare) / direct is the same as a difference of totals.

``orchestration_skeleton_fraction`` = skeleton / prefect (wall) and ``orchestration_skeleton_cpu_fraction`` (the
same in CPU seconds, flow process plus API server) are the direct readings.
``orchestration_overhead_fraction`` = (prefect − direct) / prefect: what orchestration alone (task and flow
runs, states, events, logs, artifact API calls, the server's answers) costs as a fraction of the run, for the
largest size run. ``orchestration_cpu_fraction`` is the same in CPU seconds: the flow process's beyond the direct
peer's, plus the API server's, over the run's total. Each ``prefect`` row splits orchestration's CPU per scan
into the flow's (``flow_cpu_overhead_s_per_scan``) and the server's (``server_cpu_s_per_scan``), beside the stage
work's (``work_cpu_s_per_scan``). ``orchestration_overhead_fraction_vs_bare`` = (prefect − bare) / prefect is the
first definition (it also charges the previews and the report to Prefect). Per size both are in the ``prefect``
row, with the server's own peak RSS (``server_peak_rss_mb``, the Prefect API subprocess) beside the flow
process's.

    python benchmarks/pipeline.py --quick --json pipeline.json
    python benchmarks/pipeline.py --size full --slices 16 --scans-per-site 4 --modes bare,direct
    python benchmarks/pipeline.py --size medium --slices 16 --scans-per-site 1,2,4,8 --cache-dir /tmp/bases
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
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import parse_args, print_table, write_json

MODES = ("bare", "direct", "prefect", "skeleton")


def _warm_up() -> None:
    """One no-op flow with one task against the fresh API: its first answers are slow (server start-up)."""
    from prefect import flow, task

    @task(name="warm-up-task")
    def _noop_task() -> int:
        return 1

    @flow(name="warm-up")
    def _noop_flow() -> int:
        return _noop_task()

    _noop_flow()


def _direct(data_root: str, *, product: bool) -> float:
    """The stage drivers in a plain loop (two scans at a time); with ``product``, previews and the report too.
    Returns the seconds spent in the previews and the report (summed over the scans)."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    import torch

    from flows.pipeline import ScanOutcome
    from schemas.pipeline import PipelineConfig
    from schemas.settings import get_settings
    from schemas.stages import PIPELINE, StageName
    from tasks.cluster import dask_client
    from tasks.pipeline_support import find_scans, publish_run_report
    from tasks.previews import reconstruction_preview, surrogate_preview
    from tasks.stages import run_scan_stage
    from tasks.storage import SiteStore

    config = PipelineConfig()
    lock, spent = threading.Lock(), [0.0]

    def timed(fn: Any, *args: Any) -> None:
        t0 = time.perf_counter()
        fn(*args)
        with lock:
            spent[0] += time.perf_counter() - t0

    def chain(ref: Any) -> ScanOutcome:
        scan = SiteStore.open(ref.store_uri).scan(ref.scan_id)
        previews = {StageName.RECONSTRUCT: reconstruction_preview, StageName.SURROGATE: surrogate_preview}
        stage = PIPELINE[0].name
        try:
            for spec in PIPELINE:  # the registry's chain, as nightly runs it
                stage = spec.name
                run_scan_stage(scan, stage, config.stage_config(stage), device=torch.device("cpu"))
                if product and stage in previews:
                    timed(previews[stage], scan)
        except Exception as exc:  # as nightly: recorded, the other scans go on
            return ScanOutcome(scan=str(ref), ok=False, failed_stage=stage.value, error=str(exc)[:500])
        return ScanOutcome(scan=str(ref), ok=True)

    with dask_client(get_settings().dask), ThreadPoolExecutor(max_workers=2) as pool:  # as nightly's runner
        outcomes = tuple(pool.map(chain, find_scans(data_root)))
    failed = [o for o in outcomes if not o.ok]
    assert not failed, failed
    if product:
        timed(publish_run_report, data_root, outcomes, None)
    return spent[0]


def _cpu_s(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def _children_cpu_s() -> float:
    """CPU seconds used so far by this process's live child processes (the Prefect API server)."""
    import psutil

    total = 0.0
    for child in psutil.Process().children(recursive=True):
        try:
            times = child.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


def _stub_stage_work(data_root: str) -> None:
    """For the ``skeleton`` mode: every stage of every scan is already done (the stages skip themselves), and the
    previews return a constant markdown of the real size (rendered once here, before the clock starts), so what
    is left of ``nightly`` is orchestration alone: the same task runs, states, logs and artifact API calls."""
    import tasks.pipeline_support as support
    import tasks.previews as previews
    from schemas.stages import PIPELINE
    from tasks.pipeline_support import find_scans
    from tasks.storage import SiteStore

    refs = find_scans(data_root)
    for ref in refs:
        done = SiteStore.open(ref.store_uri, mode="r").scan(ref.scan_id)
        missing = [s.name.value for s in PIPELINE if done.stage_record(s.name) is None]
        assert not missing, f"skeleton needs processed stores: {ref} has no {missing}"
    scan = SiteStore.open(refs[0].store_uri).scan(refs[0].scan_id)
    rec_preview = previews.reconstruction_preview(scan)
    sur_preview = previews.surrogate_preview(scan)
    previews.reconstruction_preview = lambda *a, **k: rec_preview
    previews.surrogate_preview = lambda *a, **k: sur_preview
    stub_report = Path(data_root) / "report.html"

    def publish_run_report(root: str, outcomes: Any, federated: Any) -> str:
        from prefect.artifacts import create_markdown_artifact

        stub_report.write_text("skeleton")
        shared = [p for p in (sur_preview,) if p is not None]
        markdown = support.run_summary_markdown(stub_report, outcomes, shared)
        create_markdown_artifact(key="fedscan-run-report", markdown=markdown, description="report")
        return str(stub_report)

    support.publish_run_report = publish_run_report  # type: ignore[assignment]


def _one(mode: str, data_root: str) -> dict[str, float]:
    """Run one mode in this process (called in a child process)."""
    from schemas.pipeline import PipelineConfig

    server_peak_mb = None
    if mode == "skeleton":
        _stub_stage_work(data_root)
    if mode in ("prefect", "skeleton"):
        from prefect.testing.utilities import prefect_test_harness

        from flows.pipeline import NightlyRequest, nightly

        with prefect_test_harness(server_startup_timeout=None):
            _warm_up()
            children0 = _children_cpu_s()
            cpu0, t0 = _cpu_s(resource.RUSAGE_SELF), time.perf_counter()
            report = nightly(NightlyRequest(data_root=data_root, federated=False, report=True, config=PipelineConfig()))
            wall, cpu = time.perf_counter() - t0, _cpu_s(resource.RUSAGE_SELF) - cpu0
            server_cpu = _children_cpu_s() - children0  # the API server's CPU seconds during the run
        assert not report.failed, report.failed
        assert report.report_path is not None
        assert Path(report.report_path).is_file()
        # The API server ran as a child process of this one; it has exited (and been reaped) by now.
        server_peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    else:
        import flows.pipeline  # noqa: F401  (same imports as the prefect mode before the clock starts)

        cpu0, t0 = _cpu_s(resource.RUSAGE_SELF), time.perf_counter()
        pictures_s = _direct(data_root, product=mode == "direct")
        wall, cpu = time.perf_counter() - t0, _cpu_s(resource.RUSAGE_SELF) - cpu0
        if mode == "direct":
            assert (Path(data_root) / "report.html").is_file()
    out = {"wall_s": wall, "cpu_s": cpu, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if mode == "direct":
        out["preview_report_s"] = pictures_s
    if server_peak_mb is not None:
        out["server_peak_rss_mb"] = server_peak_mb
        out["server_cpu_s"] = server_cpu
    return out


def _base(cache: Path, size: str, n_sites: int, n_slices: int, per_site: int, previous: Path | None) -> Path:
    """The demo stores for one size, built once into ``cache`` (deterministic: same arguments, same bytes),
    starting from the previous size's stores (the first scans of each site are the same)."""
    from tasks.demo.build import build_demo_sites

    base = cache / f"{size}-{n_sites}sites-{n_slices}sl-{per_site}"
    if not (base / ".complete").is_file():
        if base.exists():
            shutil.rmtree(base)
        if previous is not None:
            shutil.copytree(previous, base)
        build_demo_sites(base, n_sites=n_sites, scans_per_site=per_site, n_slices=n_slices, seed=0, size=size)
        (base / ".complete").write_text("")
    return base


def _orchestration_ratios(rows: list[dict[str, Any]], sizes: list[int], n_sites: int) -> dict[str, float]:
    """The orchestration keys (module docstring); adds the per-size ones to each ``prefect`` row."""
    ratios: dict[str, float] = {}
    for per_site in sizes:
        by = {r["method"]: r for r in rows if r["scans"] == n_sites * per_site}
        pref = by["prefect"]
        pref["orchestration_overhead_fraction"] = (pref["wall_s"] - by["direct"]["wall_s"]) / pref["wall_s"]
        pref["orchestration_overhead_fraction_vs_bare"] = (pref["wall_s"] - by["bare"]["wall_s"]) / pref["wall_s"]
        pref["overhead_s_per_scan"] = (pref["wall_s"] - by["direct"]["wall_s"]) / (n_sites * per_site)
        # Where orchestration's time goes: CPU seconds per scan in the flow process beyond the direct peer's, and
        # in the API server (on this machine it shares the cores with the stage work).
        pref["flow_cpu_overhead_s_per_scan"] = (pref["cpu_s"] - by["direct"]["cpu_s"]) / (n_sites * per_site)
        pref["server_cpu_s_per_scan"] = pref["server_cpu_s"] / (n_sites * per_site)
        pref["work_cpu_s_per_scan"] = by["direct"]["cpu_s"] / (n_sites * per_site)
        # Orchestration measured directly: the skeleton run makes the same Prefect calls with no stage work.
        skel = by["skeleton"]
        pref["skeleton_fraction"] = skel["wall_s"] / pref["wall_s"]
        pref["skeleton_cpu_fraction"] = (skel["cpu_s"] + skel["server_cpu_s"]) / (pref["cpu_s"] + pref["server_cpu_s"])
        pref["skeleton_s_per_scan"] = skel["wall_s"] / (n_sites * per_site)
    largest = next(r for r in rows if r["method"] == "prefect" and r["scans"] == n_sites * sizes[-1])
    smallest = next(r for r in rows if r["method"] == "prefect" and r["scans"] == n_sites * sizes[0])
    ratios["orchestration_overhead_fraction"] = largest["orchestration_overhead_fraction"]
    ratios["orchestration_overhead_fraction_smallest_run"] = smallest["orchestration_overhead_fraction"]
    ratios["orchestration_overhead_fraction_vs_bare"] = largest["orchestration_overhead_fraction_vs_bare"]
    ratios["orchestration_overhead_fraction_vs_bare_smallest_run"] = smallest["orchestration_overhead_fraction_vs_bare"]
    ratios["orchestration_skeleton_fraction"] = largest["skeleton_fraction"]
    ratios["orchestration_skeleton_fraction_smallest_run"] = smallest["skeleton_fraction"]
    ratios["orchestration_skeleton_cpu_fraction"] = largest["skeleton_cpu_fraction"]
    # The same in CPU seconds (less sensitive to other load than wall time): orchestration's CPU (flow beyond the
    # direct peer, plus the server) over the whole run's.
    orch_cpu = (
        largest["cpu_s"] - next(r for r in rows if r["method"] == "direct" and r["scans"] == largest["scans"])["cpu_s"]
    )
    ratios["orchestration_cpu_fraction"] = (orch_cpu + largest["server_cpu_s"]) / (
        largest["cpu_s"] + largest["server_cpu_s"]
    )
    return ratios


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        print(json.dumps(_one(sys.argv[2], sys.argv[3])))
        return
    import argparse

    extra = argparse.ArgumentParser(add_help=False)
    extra.add_argument("--size", default=None, help="demo grid: tiny | small | medium | full")
    extra.add_argument("--slices", type=int, default=None, help="slices per scan")
    extra.add_argument("--scans-per-site", default=None, help="comma list, e.g. 1,2,4,8")
    extra.add_argument("--cache-dir", type=Path, default=None, help="keep the built demo stores here for reuse")
    extra.add_argument("--repeat", type=int, default=1, help="runs per mode, interleaved; the fastest counts")
    extra.add_argument(
        "--modes", default=",".join(MODES), help="comma list of modes to run (skeleton needs prefect); default all"
    )
    args = parse_args(__doc__ or "", image=False, parents=[extra])
    modes = tuple(m for m in MODES if m in args.modes.split(","))
    unknown = set(args.modes.split(",")) - set(MODES)
    if unknown or not modes or ("skeleton" in modes and "prefect" not in modes):
        raise SystemExit(f"--modes: choose from {', '.join(MODES)} (skeleton needs prefect); got {args.modes!r}")
    sizes = sorted(
        [int(x) for x in args.scans_per_site.split(",")]
        if args.scans_per_site
        else ([1, 2] if args.quick else [1, 2, 4, 8])
    )
    size = args.size or ("tiny" if args.quick else "medium")
    n_sites, n_slices = 3, args.slices or (8 if args.quick else 16)

    rows = []
    env = {
        **os.environ,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    }
    with tempfile.TemporaryDirectory() as tmp:
        cache = args.cache_dir or Path(tmp) / "cache"
        cache.mkdir(parents=True, exist_ok=True)
        previous = None
        for per_site in sizes:
            base = previous = _base(cache, size, n_sites, n_slices, per_site, previous)
            runs: dict[str, list[dict[str, float]]] = {mode: [] for mode in modes}
            for _ in range(max(1, args.repeat)):  # interleaved, so a burst of load on the machine hits every mode
                for mode in modes:
                    work = Path(tmp) / f"{'prefect' if mode == 'skeleton' else mode}-{per_site}"
                    if mode != "skeleton":  # the skeleton reruns nightly on the stores the prefect run processed
                        shutil.copytree(base, work)
                    out = subprocess.run(
                        [sys.executable, __file__, "--child", mode, str(work)],
                        env=env,
                        capture_output=True,
                        text=True,
                    )
                    if out.returncode:
                        sys.stderr.write(out.stderr[-4000:])
                        out.check_returncode()
                    if mode != "prefect" or "skeleton" not in modes:
                        shutil.rmtree(work)
                    runs[mode].append(json.loads(out.stdout.strip().splitlines()[-1]))
                    print(mode, per_site, json.dumps(runs[mode][-1]), flush=True)
            for mode in modes:
                res = min(runs[mode], key=lambda r: r["wall_s"])
                rows.append(
                    {
                        "case": f"{per_site} scans/site ({n_sites * per_site} scans, {size}, {n_slices} slices)",
                        "method": mode,
                        "scans": n_sites * per_site,
                        **res,
                        "s_per_scan": res["wall_s"] / (n_sites * per_site),
                        "runs": len(runs[mode]),
                        "wall_s_all": [round(r["wall_s"], 2) for r in runs[mode]],
                    }
                )
    ratios: dict[str, float] = {}

    def row(method: str, per_site: int) -> dict[str, Any]:
        return next(r for r in rows if r["method"] == method and r["scans"] == n_sites * per_site)

    if "direct" in modes:  # what the previews and the report cost of a whole run, largest size
        direct = row("direct", sizes[-1])
        ratios["preview_report_fraction"] = direct["preview_report_s"] / direct["wall_s"]
        if "bare" in modes:
            ratios["preview_report_fraction_vs_bare"] = (direct["wall_s"] - row("bare", sizes[-1])["wall_s"]) / direct[
                "wall_s"
            ]
    if set(modes) == set(MODES):
        ratios.update(_orchestration_ratios(rows, sizes, n_sites))
    print_table(rows)
    print({k: round(v, 4) for k, v in ratios.items()})
    if args.json:
        write_json(args.json, rows, ratios)


if __name__ == "__main__":
    main()
