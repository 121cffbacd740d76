"""Which compressor should fedscan's Zarr arrays use? Measured, not guessed.

Writes and reads the same arrays with each candidate codec and reports the compression ratio and the
write/read throughput, each as a ratio to the uncompressed store (the named peer) measured in the same run.
Data: simulated CT projections (Poisson counts → float32 line integrals, and the raw uint16 counts) and a
float32 volume, the three kinds of array a site store holds.

    python benchmarks/storage.py --quick --json storage.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import BloscCodec, BloscShuffle, GzipCodec, ZstdCodec

CANDIDATES = {
    "none": None,
    "blosc-lz4-bitshuffle": BloscCodec(cname="lz4", clevel=5, shuffle=BloscShuffle.bitshuffle),
    "blosc-zstd1-bitshuffle": BloscCodec(cname="zstd", clevel=1, shuffle=BloscShuffle.bitshuffle),
    "blosc-zstd5-bitshuffle": BloscCodec(cname="zstd", clevel=5, shuffle=BloscShuffle.bitshuffle),
    "zstd3": ZstdCodec(level=3),
    "gzip5": GzipCodec(level=5),
}


def simulate(views: int, rows: int, cols: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    u = np.linspace(-1, 1, cols)
    theta = np.linspace(0, 2 * np.pi, views, endpoint=False)
    # a smooth, view-dependent body profile (ellipse chord lengths) in line integrals
    a, b = 0.8, 0.55
    r2 = (a * np.cos(theta)[:, None]) ** 2 + (b * np.sin(theta)[:, None]) ** 2
    chord = 2 * a * b * np.sqrt(np.clip(r2 - u[None, :] ** 2, 0, None)) / r2
    p = (4.0 * chord)[:, None, :] * (1 + 0.05 * np.sin(np.arange(rows) / 7.0))[None, :, None]
    i0 = 2e4
    counts = rng.poisson(i0 * np.exp(-p)).astype(np.uint16)
    line = np.log(i0 / np.maximum(counts, 0.5)).astype(np.float32)
    vol = (0.0192 * (1 + 0.02 * rng.standard_normal((rows, cols, cols)))).astype(np.float32)
    return {"projections_f32": line, "counts_u16": counts, "volume_f32": vol}


def measure(data: np.ndarray, codec, root: Path, chunks) -> dict[str, float]:
    path = root / "a.zarr"
    if path.exists():
        shutil.rmtree(path)
    arr = zarr.create_array(
        store=str(path),
        shape=data.shape,
        chunks=chunks,
        dtype=data.dtype,
        compressors=None if codec is None else (codec,),
        fill_value=0,
    )
    t0 = time.perf_counter()
    arr[...] = data
    t_write = time.perf_counter() - t0
    stored = sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and f.name != "zarr.json")
    t0 = time.perf_counter()
    back = zarr.open_array(str(path), mode="r")[...]
    t_read = time.perf_counter() - t0
    assert np.array_equal(back, data)
    mb = data.nbytes / 2**20
    return {"ratio": data.nbytes / stored, "write_mb_s": mb / t_write, "read_mb_s": mb / t_read}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small arrays (seconds)")
    ap.add_argument("--json", type=Path, help="write results here")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    views, rows, cols = (96, 16, 256) if args.quick else (360, 64, 512)
    arrays = simulate(views, rows, cols, seed=0)
    rows_out = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for kind, data in arrays.items():
            chunks = (32, data.shape[1], data.shape[2]) if kind != "volume_f32" else (8, *data.shape[1:])
            for name, codec in CANDIDATES.items():
                best = None
                for _ in range(args.repeats):
                    m = measure(data, codec, root, chunks)
                    best = (
                        m
                        if best is None
                        else {
                            "ratio": m["ratio"],
                            "write_mb_s": max(best["write_mb_s"], m["write_mb_s"]),
                            "read_mb_s": max(best["read_mb_s"], m["read_mb_s"]),
                        }
                    )
                rows_out.append({"case": kind, "method": name, **best})
    # ratios to the uncompressed peer, same run
    peer = {r["case"]: r for r in rows_out if r["method"] == "none"}
    for r in rows_out:
        p = peer[r["case"]]
        r["write_speed_vs_none"] = r["write_mb_s"] / p["write_mb_s"]
        r["read_speed_vs_none"] = r["read_mb_s"] / p["read_mb_s"]
    chosen = "blosc-zstd1-bitshuffle"  # tasks.storage.default_compressors()
    ratios = {f"{chosen}_ratio_{r['case']}": r["ratio"] for r in rows_out if r["method"] == chosen} | {
        f"{chosen}_write_speed_vs_none_{r['case']}": r["write_speed_vs_none"] for r in rows_out if r["method"] == chosen
    }
    print(f"{'case':16} {'method':24} {'ratio':>6} {'write MB/s':>10} {'read MB/s':>10} {'w/none':>7} {'r/none':>7}")
    for r in rows_out:
        print(
            f"{r['case']:16} {r['method']:24} {r['ratio']:6.2f} {r['write_mb_s']:10.0f} {r['read_mb_s']:10.0f} "
            f"{r['write_speed_vs_none']:7.2f} {r['read_speed_vs_none']:7.2f}"
        )
    if args.json:
        args.json.write_text(json.dumps({"rows": rows_out, "ratios": ratios}, indent=2))


if __name__ == "__main__":
    main()
