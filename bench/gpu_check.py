"""One command for a GPU machine: the GPU test tier, the kernel benchmark, and the kernel case
table compiled on CUDA, in under 8 minutes. Results go to bench/results/:

* gpu_pytest.txt            ``pytest -m gpu`` (the gpu-marked tests of the whole suite)
* kernels_gpu.json          bench/bench_kernels.py --device gpu
* gpu_kernel_cases.txt      ``pytest tests/kernels -m "not gpu"``: the CPU tier's case table,
                            which runs the compiled kernels (bf16 included) when CUDA is present
* gpu_check.json            each step's command, exit code, duration and whether it timed out

Without CUDA it says so and exits 0. Exit status: 0 when every step passed, else 1.

    python bench/gpu_check.py [--budget-s 470]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def run_step(name: str, cmd: list[str], log: Path, timeout_s: float) -> dict:
    """Run ``cmd`` from the repo root with its output in ``log``; print the log's tail after."""
    start = time.monotonic()
    print(f"=== {name}: {' '.join(cmd)} (limit {timeout_s:.0f} s)", flush=True)
    with open(log, "w") as out:
        try:
            rc: int | None = subprocess.run(
                cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, timeout=timeout_s
            ).returncode
            status = "ok" if rc == 0 else "failed"
        except subprocess.TimeoutExpired:  # subprocess.run has killed it
            rc, status = None, "timeout"
    seconds = time.monotonic() - start
    tail = log.read_text(errors="replace").splitlines()[-25:]
    print("\n".join(tail))
    print(f"=== {name}: {status} (exit {rc}, {seconds:.0f} s, log {log})", flush=True)
    return dict(name=name, cmd=cmd, rc=rc, seconds=round(seconds, 1), status=status)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget-s", type=float, default=470.0, help="total wall-clock limit")
    args = parser.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; the GPU tests and benchmark need one. Nothing run.")
        return 0
    RESULTS.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + args.budget_s
    py = sys.executable
    steps = [
        # (name, command, log file, cap in seconds)
        ("pytest -m gpu", [py, "-m", "pytest", "-m", "gpu", "-q", "-ra"], "gpu_pytest.txt", 200),
        (
            "bench_kernels",
            [py, "bench/bench_kernels.py", "--device", "gpu", "--budget-s", "150"],
            "bench_kernels_gpu.txt",
            190,
        ),
        (
            "kernel case table on CUDA",
            [py, "-m", "pytest", "tests/kernels", "-m", "not gpu", "-q", "-ra"],  # every failure
            "gpu_kernel_cases.txt",
            None,  # whatever time is left
        ),
    ]
    report = dict(device=torch.cuda.get_device_name(), steps=[])
    for name, cmd, log, cap in steps:
        left = deadline - time.monotonic()
        if left < 20:
            report["steps"].append(dict(name=name, cmd=cmd, status="skipped: out of time"))
            continue
        limit = left if cap is None else min(cap, left)
        report["steps"].append(run_step(name, cmd, RESULTS / log, limit))
    (RESULTS / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
    print("\n" + "\n".join(f"{s['name']}: {s['status']}" for s in report["steps"]))
    return 0 if all(s["status"] == "ok" for s in report["steps"]) else 1


if __name__ == "__main__":
    sys.exit(main())
