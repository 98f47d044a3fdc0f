"""bench/gpu_check.py on a CPU: its dry run plans every step with a command that the script it
names accepts, and runs the preflight's host-side checks; the preflight names the fix for a
missing compiler or headers; a stopped pytest's log is summarised; the run loop records each step
as it ends, stops one past its limit and skips what the preflight rules out (on stand-in steps);
the end-to-end step runs on the cpu backend. Nothing here needs a GPU."""

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import bench_kernels
import gpu_check

from speq.kernels import PRESETS
from speq.runtime.policies import POLICIES

BENCH = Path(gpu_check.__file__).parent
STEPS = ["preflight", "gpu tests", "kernel benchmark", "end to end", "kernel case table"]


def _steps(report: dict) -> dict[str, dict]:
    return {s["name"]: s for s in report["steps"]}


def test_the_dry_run_plans_every_step_with_its_command(tmp_path):
    cmd = [sys.executable, str(BENCH / "gpu_check.py"), "--dry-run", "--out", str(tmp_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["dry_run"] and [s["name"] for s in report["steps"]] == STEPS
    steps = _steps(report)
    for name in STEPS[1:]:
        step = steps[name]
        assert step["status"] == "dry-run" and step["limit_s"] > 0
        assert step["cmd"][0] == sys.executable and step["log"].startswith(str(tmp_path))
        assert step["name"] in done.stdout

    gpu = steps["gpu tests"]["cmd"]
    assert gpu[1:4] == ["-m", "pytest", "-v"] and gpu[-2:] == ["-m", "gpu"] and "-x" not in gpu
    assert steps["kernel case table"]["cmd"][-3:] == ["tests/kernel_tests", "-m", "not gpu"]

    kernels = steps["kernel benchmark"]["cmd"]
    assert kernels[1] == "bench/bench_kernels.py"
    args = bench_kernels.build_parser().parse_args(kernels[2:])
    assert args.device == "gpu" and args.out == tmp_path
    assert args.models == ["mixtral-8x7b", "phi-3.5-moe"] and set(args.models) <= set(PRESETS)
    assert (
        args.tokens == [1, 2, 4, 8, 16] and 0 < args.budget_s < steps["kernel benchmark"]["limit_s"]
    )

    e2e = steps["end to end"]
    assert e2e["cmd"][1] == "bench/gpu_check.py"
    args = gpu_check.build_parser().parse_args(e2e["cmd"][2:])
    assert args.e2e and args.e2e_backend == "cuda" and args.e2e_dtypes == ["float64", "bfloat16"]
    assert {policy for policy, *_ in map(str.split, e2e["plan"]["contenders"])} == set(POLICIES)

    # the nominal limits fit the budget, a grace period for each step included
    limits = sum(s["limit_s"] for s in report["steps"][1:])
    assert limits + gpu_check.GRACE_S * (len(STEPS) - 1) <= report["budget_s"]

    checks = {c["name"]: c for c in report["preflight"]["checks"]}
    for name in ("torch", "triton", "c_compiler", "python_headers"):
        assert checks[name]["status"] in ("ok", "failed")
        assert checks[name]["status"] == "ok" or checks[name]["fix"]
    for name in ("device", "device_memory", "compute_capability", "triton_launch"):
        assert checks[name]["status"] == "dry-run"


def test_a_dry_run_leaves_a_real_runs_results_alone(tmp_path):
    real = tmp_path / "gpu_check.json"
    real.write_text(json.dumps({"dry_run": False, "steps": []}))
    assert gpu_check.main(["--dry-run", "--out", str(tmp_path)]) == 0
    assert json.loads(real.read_text()) == {"dry_run": False, "steps": []}
    assert json.loads((tmp_path / "gpu_check.dry-run.json").read_text())["dry_run"]


def test_a_missing_compiler_or_headers_fails_the_preflight_with_the_fix(monkeypatch, tmp_path):
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setattr(gpu_check.shutil, "which", lambda name: None)
    c = gpu_check.find_c_compiler()
    assert c["status"] == "failed" and "apt install gcc" in c["fix"]

    monkeypatch.setattr(gpu_check.shutil, "which", lambda n: "/usr/bin/cc" if n == "cc" else None)
    c = gpu_check.find_c_compiler()  # Triton looks for $CC, gcc and clang, never for cc
    assert c["status"] == "failed" and "export CC=/usr/bin/cc" in c["fix"]

    monkeypatch.setenv("CC", "no-such-compiler")
    assert gpu_check.find_c_compiler()["status"] == "failed"

    monkeypatch.setattr(gpu_check.sysconfig, "get_paths", lambda scheme: {"include": str(tmp_path)})
    h = gpu_check.find_python_headers()
    assert h["status"] == "failed" and "-dev" in h["fix"]

    pre = gpu_check.preflight(dry_run=True)  # Triton's steps are then skipped, with the fix
    assert not pre["triton_ok"] and "c_compiler" in pre["triton_reason"]
    assert "python_headers" in pre["triton_reason"] and "apt install" in pre["triton_reason"]


def test_a_stopped_pytest_log_names_its_failures_and_the_test_it_stopped_in(tmp_path):
    log = tmp_path / "gpu_pytest.txt"
    log.write_text(
        "tests/gpu/test_a.py::test_one[x y] PASSED [ 10%]\n"
        "tests/gpu/test_a.py::test_two FAILED [ 20%]\n"
        "tests/gpu/test_b.py::test_hangs \n"
        "\n!!!!!!!!!!!! KeyboardInterrupt !!!!!!!!!!!!\n"
        "=========== short test summary info ===========\n"
        "FAILED tests/gpu/test_a.py::test_two - AssertionError: no\n"
        "========= 1 failed, 1 passed, 3 deselected in 120.01s =========\n"
    )
    s = gpu_check.pytest_summary(log)
    assert s["totals"] == "1 failed, 1 passed, 3 deselected"
    assert s["outcomes"] == {"PASSED": 1, "FAILED": 1}
    assert s["failures"] == ["FAILED tests/gpu/test_a.py::test_two - AssertionError: no"]
    assert s["running_when_stopped"] == "tests/gpu/test_b.py::test_hangs"


@pytest.mark.slow
def test_the_end_to_end_step_runs_every_policy_on_the_cpu_backend(tmp_path):
    argv = ["--e2e", "--e2e-backend", "cpu", "--e2e-dtypes", "float64", "--e2e-tokens", "3"]
    assert gpu_check.main([*argv, "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "e2e_check_cpu.json").read_text())
    assert report["complete"]
    assert {r["policy"] for r in report["rows"]} == set(POLICIES)
    for row in report["rows"]:
        assert row["status"] == "ok" and row["identical_to_resident"], row
        assert row["tokens_per_s"] > 0
    offloaded = [r for r in report["rows"] if r["policy"] != "resident"]
    assert all(r["device_memory"] is not None for r in offloaded)


def test_the_run_records_each_step_as_it_ends_stops_one_past_its_limit_and_skips(
    monkeypatch, tmp_path
):
    """The run loop on stand-in steps (CUDA faked): one passes, one is stopped at its limit
    (SIGINT), one needs Triton, which the preflight said cannot run."""
    py = sys.executable
    sleeper = "import time; print('started', flush=True); time.sleep(60)"
    steps = [
        gpu_check.Step("quick", lambda _s: [py, "-c", "print('hi')"], "quick.txt", 30, False),
        gpu_check.Step("slow", lambda _s: [py, "-c", sleeper], "slow.txt", 1, False),
        gpu_check.Step("kernels", lambda _s: [py, "-c", "1"], "kernels.txt", None, True),
    ]
    no_triton = "c_compiler: None (fix: apt install gcc)"
    pre = dict(status="failed", checks=[], device_reason=None, triton_ok=False)
    monkeypatch.setattr(gpu_check, "preflight", lambda dry_run: {**pre, "triton_reason": no_triton})
    monkeypatch.setattr(gpu_check, "plan", lambda args, triton_ok: steps)
    monkeypatch.setattr(gpu_check.torch.cuda, "is_available", lambda: True)
    handler = signal.getsignal(signal.SIGTERM)
    try:
        assert gpu_check.main(["--out", str(tmp_path), "--budget-s", "100"]) == 1
    finally:
        signal.signal(signal.SIGTERM, handler)
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    steps = _steps(report)
    assert not report["dry_run"] and list(steps) == ["preflight", "quick", "slow", "kernels"]
    assert steps["quick"]["status"] == "ok" and steps["quick"]["rc"] == 0
    assert (tmp_path / "quick.txt").read_text() == "hi\n"
    assert steps["slow"]["status"] == "timeout" and steps["slow"]["seconds"] < 1 + gpu_check.GRACE_S
    assert "started" in (tmp_path / "slow.txt").read_text()  # unbuffered: the log kept it
    assert steps["kernels"]["status"].startswith("skipped: Triton cannot run here")
    assert "apt install gcc" in steps["kernels"]["status"]
