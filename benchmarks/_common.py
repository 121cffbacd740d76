"""Small helpers shared by the benchmarks: the common flags, JSON output and a plain-text table."""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any


def parse_args(
    description: str,
    *,
    image: bool = False,
    argv: Sequence[str] | None = None,
    parents: Sequence[argparse.ArgumentParser] = (),
) -> argparse.Namespace:
    """``--quick``, ``--json PATH`` and, for quality benchmarks, ``--image PATH.npy --pixel-mm MM``.

    ``parents`` (built with ``add_help=False``) add a benchmark's own options to the same parser, so ``--help``
    lists them all and an unknown option is an error.
    """
    parser = argparse.ArgumentParser(description=description, parents=list(parents))
    parser.add_argument("--quick", action="store_true", help="small sizes: under a minute on 2 cores")
    parser.add_argument("--json", type=Path, default=None, help="write rows and ratios to this JSON file")
    if image:
        parser.add_argument("--image", type=Path, default=None, help="2-D attenuation image (1/mm), .npy")
        parser.add_argument("--pixel-mm", type=float, default=1.0, help="pixel size of --image, mm")
    return parser.parse_args(argv)


def best_time(fn: Callable[[], Any], *, repeat: int = 1) -> tuple[float, Any]:
    """Shortest wall time of ``repeat`` calls (seconds) and the last result."""
    best, result = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def on_threads(n: int, fn: Callable[[], Any]) -> Callable[[], Any]:
    """``fn`` run with ``n`` torch intra-op threads (restored afterwards)."""

    def run() -> Any:
        import torch

        before = torch.get_num_threads()
        torch.set_num_threads(n)
        try:
            return fn()
        finally:
            torch.set_num_threads(before)

    return run


def sgemm_flops_per_s(n: int = 2048) -> float:
    """FLOP/s of one ``n × n`` float32 matrix product on torch's current threads, best of 5: the machine's matmul
    peak, a named peer for any kernel's products (MKL's blocked kernels run near what the vector units give)."""
    import torch

    a, b = torch.rand(n, n), torch.rand(n, n)
    seconds, _ = best_time(lambda: a @ b, repeat=5)
    return 2 * n**3 / seconds


def _json_safe(value: Any) -> Any:
    """``value`` with every NaN or infinite float replaced by None (JSON has no such numbers)."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, float | int) and not isinstance(value, bool) and not math.isfinite(value):
        return None
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:  # numpy scalars
        return _json_safe(value.item())
    return value


def write_json(path: Path | None, rows: list[dict[str, Any]], ratios: dict[str, float], **extra: Any) -> None:
    """``{"rows": [...], "ratios": {...}, **extra}`` to ``path`` (nothing when ``path`` is None).

    Strict JSON: a value that is not a finite number (a row a run could not measure) is written as ``null``.
    """
    if path is not None:
        doc = _json_safe({"rows": rows, "ratios": ratios, **extra})
        path.write_text(json.dumps(doc, indent=2, default=float, allow_nan=False) + "\n")


def print_table(rows: list[dict[str, Any]], ratios: dict[str, float] | None = None) -> None:
    """Print rows as an aligned table (columns = union of keys, in first-seen order), then the ratios."""
    columns: list[str] = []
    for row in rows:
        columns += [key for key in row if key not in columns]

    def cell(value: Any) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.4g}"
        return str(value)

    table = [[cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in table)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for r in table:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)))
    for key, value in (ratios or {}).items():
        print(f"{key}: {cell(value)}")
