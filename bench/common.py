"""Shared helpers for the benchmark scripts: the environment record, timing on the CPU, the
JSON result file, the printed table and the markdown tables."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from tabulate import tabulate

RESULTS = Path(__file__).resolve().parent / "results"

# The benchmarked models are small: one intra-op thread is faster than two spinning threads,
# and much faster when anything else is running. SPEQ_THREADS overrides.
torch.set_num_threads(int(os.environ.get("SPEQ_THREADS", "1")))


def environment() -> dict[str, Any]:
    """What the numbers depend on: versions, device, threads, and the load when they were taken."""
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception:
        env["triton"] = None
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda
    return env


def time_cpu_us(
    fn: Callable[[], object], *, min_time_s: float = 0.2, min_reps: int = 5, warmup: int = 2
) -> float:
    """Median wall-clock microseconds of ``fn()`` over at least ``min_reps`` calls and
    ``min_time_s`` seconds, after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_reps or time.perf_counter() - start < min_time_s:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e6 * statistics.median(times)


def write_json(path: Path, payload: Mapping[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return path


def table(rows: Sequence[Mapping[str, Any]], columns: Mapping[str, str]) -> str:
    """A table of ``rows`` with ``columns`` mapping row keys to headers (units in the header)."""
    body = [[row.get(key) for key in columns] for row in rows]
    return tabulate(body, headers=list(columns.values()), floatfmt=".2f", missingval="-")


def markdown_table(rows: Sequence[Sequence[str]], headers: Sequence[str]) -> str:
    """A GitHub markdown table of cells already formatted as text (kept exactly as given: no
    number parsing or reformatting)."""
    return tabulate(rows, headers=list(headers), tablefmt="github", disable_numparse=True)
