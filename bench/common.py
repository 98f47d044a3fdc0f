"""Shared helpers for the benchmark scripts: the environment and git record, timing on the CPU,
interleaved rounds and the ratios taken over them (median and spread, with the verdicts "no
difference" and "not applicable (no draft)"), the JSON result file, the printed table and the
markdown tables."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch
from tabulate import tabulate

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parent.parent
PROMPTS = Path(__file__).resolve().parent / "prompts" / "heldout.json"

# The result files' format: update_readme.py renders only this one (older files, written before
# rounds, held-out calibration and sampled runs, are reported as pending a rerun).
FORMAT = "rounds-v1"

NO_DIFFERENCE = "no difference"
NOT_APPLICABLE = "not applicable (no draft)"
UNTIMED_RECORDING = (
    "perfect prediction and oracle (Belady) are bounds, not baselines: each first runs a "
    "recording pass (it needs the run's output before it can run), and that pass is not timed "
    "as part of their work"
)

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
    """Write ``payload`` to ``path`` whole or not at all (a temporary file, then a rename), so a
    run killed while it rewrites its results leaves the previous version, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    os.replace(tmp, path)
    return path


def table(rows: Sequence[Mapping[str, Any]], columns: Mapping[str, str]) -> str:
    """A table of ``rows`` with ``columns`` mapping row keys to headers (units in the header)."""
    body = [[row.get(key) for key in columns] for row in rows]
    return tabulate(body, headers=list(columns.values()), floatfmt=".2f", missingval="-")


def markdown_table(rows: Sequence[Sequence[str]], headers: Sequence[str]) -> str:
    """A GitHub markdown table of cells already formatted as text (kept exactly as given: no
    number parsing or reformatting)."""
    return tabulate(rows, headers=list(headers), tablefmt="github", disable_numparse=True)


# ---------------------------------------------------------------- provenance


def git_state() -> dict[str, Any]:
    """The commit the run was made on (``git rev-parse --short HEAD``) and whether the working
    tree had changes (``dirty``; ``uncommitted`` lists them). Read-only: no index refresh."""

    def git(*cmd: str) -> str | None:
        try:
            return subprocess.run(
                ["git", "--no-optional-locks", *cmd],
                cwd=ROOT,
                capture_output=True,
                text=True,
                check=True,
            ).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return None

    status = git("status", "--porcelain")
    return {
        "commit": git("rev-parse", "--short", "HEAD"),
        "dirty": None if status is None else bool(status),
        "uncommitted": [] if status is None else status.splitlines(),
    }


def describe_code(code: Mapping[str, Any]) -> str:
    """ "commit abc1234", "commit abc1234 with uncommitted changes", or, where the only changes
    are other benchmarks' results, "commit abc1234 (uncommitted: only bench/results files)"."""
    commit = code.get("commit") or "unknown"
    if not code.get("dirty"):
        return f"commit {commit}"
    paths = [line.split(None, 1)[-1] for line in code.get("uncommitted", [])]
    if paths and all(p.startswith("bench/results/") for p in paths):
        return f"commit {commit} (uncommitted: only bench/results files)"
    return f"commit {commit} with uncommitted changes"


def load_prompts(ids: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """The held-out prompts of bench/prompts/heldout.json (those named in ``ids``, in order)."""
    data = json.loads(PROMPTS.read_text())["prompts"]
    if ids is None:
        return data
    by = {p["id"]: p for p in data}
    unknown = [i for i in ids if i not in by]
    if unknown:
        raise SystemExit(
            f"unknown prompt id(s) {unknown}; bench/prompts/heldout.json has {list(by)}"
        )
    return [by[i] for i in ids]


def calibration_prompt(measured: Sequence[Mapping[str, Any]], wanted: str | None = None) -> dict:
    """The held-out prompt the governor calibrates on: ``wanted`` (an id), else the first prompt
    of heldout.json from a domain none of ``measured`` comes from, else the first one not
    measured. Never a measured prompt."""
    measured_ids = {p["id"] for p in measured}
    if wanted is not None:
        (p,) = load_prompts([wanted])
        if p["id"] in measured_ids:
            raise SystemExit(f"--calibration-prompt {wanted} is a measured prompt; pick another")
        return p
    free = [p for p in load_prompts() if p["id"] not in measured_ids]
    domains = {p["domain"] for p in measured}
    other = [p for p in free if p["domain"] not in domains]
    if not (other or free):
        raise SystemExit("every held-out prompt is measured: none is left to calibrate on")
    return (other or free)[0]


def bench_model(path: str | None) -> tuple[Any, Any, str]:
    """The model a benchmark runs, in float64 (batch-invariant argmax: outputs compare exactly):
    the shipped demo MoE, or a checkpoint folder of either format (speq's, or a Hugging Face one
    of a supported family) with its tokenizer.json. Returns (model, tokenizer, description)."""
    from speq.models.demo import model_with_tokenizer

    try:
        return model_with_tokenizer(path, torch.float64)
    except FileNotFoundError as e:
        raise SystemExit(str(e)) from None


# ---------------------------------------------------------------- rounds and ratios

K = TypeVar("K", bound=Hashable)
T = TypeVar("T")


def interleaved(rounds: int, order: Sequence[K], run: Callable[[int, K], T]) -> list[dict[K, T]]:
    """``run(r, key)`` for every key of ``order``, in that order, in each of ``rounds`` rounds;
    round r runs every key once before round r + 1 starts, so load from other processes falls
    on every contender alike. Returns one {key: result} per round."""
    out: list[dict[K, T]] = []
    for r in range(rounds):
        out.append({key: run(r, key) for key in order})
    return out


def spread(values: Sequence[float | None], key: str = "rounds") -> dict[str, Any] | None:
    """The median, min and max of per-round values (each round's ratio from that round's runs),
    and the values themselves under ``key``; None values are skipped, None when none is left."""
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return None
    return {
        "median": statistics.median(vals),
        "min": min(vals),
        "max": max(vals),
        key: vals,
    }


def includes_one(s: Mapping[str, Any] | None) -> bool:
    """Whether a ratio's spread over the rounds includes 1.0 (no difference either way)."""
    return s is not None and s["min"] <= 1.0 <= s["max"]


def median_index(values: Sequence[float]) -> int:
    """The index of the run with the median value (the lower middle one for an even count): an
    actual run, whose other metrics belong with that value."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    return order[(len(values) - 1) // 2]


def fmt_speedup(s: Mapping[str, Any] | None, applies: bool = True) -> str:
    """A claimed speed-up: "1.65x (1.60-1.71)" (median, then min-max over the rounds); "no
    difference (0.97-1.03x)" when the spread includes 1.0; "not applicable (no draft)" where
    the contenders ran the same policy."""
    if not applies:
        return NOT_APPLICABLE
    if s is None:
        return "-"
    if includes_one(s):
        return f"{NO_DIFFERENCE} ({s['min']:.2f}-{s['max']:.2f}x)"
    return f"{s['median']:.2f}x ({s['min']:.2f}-{s['max']:.2f})"


def fmt_ratio(s: Mapping[str, Any] | None, applies: bool = True, spec: str = ".2f") -> str:
    """A ratio or a time that claims no speed-up: "0.95 (0.93-0.98)" (median, min-max)."""
    if not applies:
        return NOT_APPLICABLE
    if s is None:
        return "-"
    return f"{s['median']:{spec}} ({s['min']:{spec}}-{s['max']:{spec}})"


def goal(s: Mapping[str, Any] | None, target: float, applies: bool = True) -> dict[str, Any]:
    """Whether a ratio reached ``target`` in every round ("met"), in none ("missed") or in some
    ("unsettled": the rounds disagree). A speed-up whose spread includes 1.0 is "missed (no
    difference)"; where the contenders ran the same policy the goal does not apply and is not
    counted as met."""
    if not applies or s is None:
        return {"target": target, "applies": False, "met": None, "verdict": NOT_APPLICABLE}
    if s["min"] >= target:
        verdict = "met"
    elif s["max"] < target:
        verdict = "missed"
    else:
        verdict = "unsettled (rounds on both sides)"
    if verdict != "met" and target > 1.0 and includes_one(s):
        verdict = f"missed ({NO_DIFFERENCE})"
    return {"target": target, "applies": True, "met": verdict == "met", "verdict": verdict}
