"""One command for a machine with one CUDA GPU: a preflight, the GPU test tier, the kernel
benchmark against the HBM floor, the shipped demo model end to end on the ``cuda`` backend, and
the kernel case table compiled on CUDA, within a total budget of 470 s (``--budget-s``; each step
also has its own cap, and the last one takes what is left), so under 10 minutes in all.

The steps, in order (results under ``--out``, default bench/results/):

0. preflight (in this process, a few seconds): torch and its CUDA build, the device, its compute
   capability, free/total device memory and driver; Triton, and what it needs to compile its
   launcher at the first kernel launch: a C compiler (``$CC``, else gcc, else clang, as Triton
   looks) and Python's headers (Python.h), then libcuda and one tiny Triton kernel launched. A
   missing compiler, headers or Triton is a failed preflight that names the fix (e.g. ``apt
   install gcc python3-dev``), and the steps that need Triton are skipped with that reason (the
   end-to-end step then runs float64 only, whose kernels take their torch paths).
1. gpu tests         ``pytest -m gpu -v -ra`` (no ``-x``: every failure is listed)
                     -> gpu_pytest.txt
2. kernel benchmark  bench/bench_kernels.py --device gpu at the Mixtral-8x7B and Phi-3.5-MoE
                     expert shapes, T = 1, 2, 4, 8, 16, Triton bf16 and INT4 against the bytes
                     floor -> kernels_gpu.json (rewritten after every row), bench_kernels_gpu.txt
3. end to end        this script with ``--e2e``: the shipped demo MoE on the cuda backend under
                     every policy of speq.runtime.policies (speq governed and at k=3), greedy, 32
                     new tokens, at a budget that offloads (0.375 of the expert bytes beyond the
                     non-expert weights and the KV cache, counted in bf16); in float64 every
                     policy must give the all-resident output token for token (and the cpu
                     backend's); in bf16 (the Triton kernels, CUDA graphs) every policy that does
                     not draft must, while speq's verification of k+1 tokens at once may round
                     differently from one token at a time, so its difference is reported, not
                     failed. Tokens/s from the second of two runs -> e2e_check_cuda.json (rewritten
                     after every run), e2e_check_cuda.txt
4. kernel case table ``pytest tests/kernel_tests -m "not gpu" -v -ra``: the CPU tier's case table,
                     which runs the compiled kernels (bf16 included) when CUDA is present
                     -> gpu_kernel_cases.txt

gpu_check.json holds the preflight and every step's command, log, time limit, exit code,
duration, status and a summary (test counts and failures, the benchmark's rows, the end-to-end
rows). It is written before the first step (every step "pending") and again as each step ends,
so a run that is killed keeps what it finished. A step past its limit gets SIGINT (pytest then
prints what failed so far), then SIGKILL 10 s later.

``--dry-run`` does everything but touch the device: it parses the arguments, builds every step's
command and plan, runs the preflight's host-side checks, writes gpu_check.json with each device
step "dry-run", and exits 0; it runs on any machine (it writes gpu_check.dry-run.json instead
when --out holds a real run's gpu_check.json). Without --dry-run and without CUDA it says so and
exits 0. Otherwise the exit status is 0 when the preflight and every step passed, else 1.

    python bench/gpu_check.py [--budget-s 470] [--out bench/results] [--dry-run]
    python bench/gpu_check.py --e2e [--e2e-backend cuda|cpu] [--e2e-dtypes float64 bfloat16]
                              [--e2e-tokens 32] [--e2e-budget 0.375]   # step 3 alone
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, ROOT, git_state, write_json

GRACE_S = 10  # after SIGINT, before SIGKILL
MIN_STEP_S = 20  # a step with less time than this left is skipped
KERNEL_MODELS = ("mixtral-8x7b", "phi-3.5-moe")  # speq.kernels.PRESETS names
KERNEL_TOKENS = (1, 2, 4, 8, 16)
E2E_TOKENS = 32
E2E_BUDGET = 0.375  # of all expert bytes beyond non-expert weights + KV cache (speq demo's)
E2E_DTYPES = ("float64", "bfloat16")
E2E_SPEQ_K = 3
FREE_MEMORY_WARN_GIB = 16  # the Mixtral-shape benchmark rows hold a few GiB at once
# Preflight checks whose failure means no Triton kernel can compile or launch here.
TRITON_CHECKS = ("triton", "c_compiler", "python_headers", "libcuda", "triton_launch")


# ------------------------------------------------------------------------------------- plan
@dataclass(frozen=True)
class Step:
    """One device step: a command run from the repository root with its output in ``log``."""

    name: str
    argv: Callable[[float], list[str]]  # the command, given the seconds it may run
    log: str  # under --out
    cap_s: float | None  # its own limit; None: whatever is left
    needs_triton: bool
    result: str | None = None  # the JSON it writes under --out, summarised in gpu_check.json
    plan: dict[str, Any] = dataclasses.field(default_factory=dict)


def plan(args: argparse.Namespace, triton_ok: bool = True) -> list[Step]:
    """The device steps, in order. Without Triton the end-to-end step runs float64 only."""
    py, out = sys.executable, str(args.out)
    dtypes = list(args.e2e_dtypes) if triton_ok else ["float64"]
    e2e = [py, "bench/gpu_check.py", "--e2e", "--out", out, "--e2e-tokens", str(args.e2e_tokens)]
    e2e += ["--e2e-budget", f"{args.e2e_budget:g}", "--e2e-dtypes", *dtypes]
    kernels = [py, "bench/bench_kernels.py", "--device", "gpu", "--models", *KERNEL_MODELS]
    kernels += ["--tokens", *map(str, KERNEL_TOKENS), "--out", out]
    pytest = [py, "-m", "pytest", "-v", "-ra"]
    return [
        Step(
            "gpu tests",
            lambda _s: [*pytest, "-m", "gpu"],
            "gpu_pytest.txt",
            120,
            needs_triton=True,
        ),
        Step(
            "kernel benchmark",
            # it stops starting rows at --budget-s; the last row and the table fit in 40 s
            lambda s: [*kernels, "--budget-s", f"{max(10, s - 40):.0f}"],
            "bench_kernels_gpu.txt",
            130,
            needs_triton=True,
            result="kernels_gpu.json",
            plan=dict(models=list(KERNEL_MODELS), tokens=list(KERNEL_TOKENS)),
        ),
        Step(
            "end to end",
            lambda _s: e2e,
            "e2e_check_cuda.txt",
            90,
            needs_triton=False,
            result="e2e_check_cuda.json",
            plan=dict(
                model="speq/models/checkpoints/demo-moe",
                contenders=[label for label, _, _ in e2e_contenders()],
                dtypes=dtypes,
                tokens=args.e2e_tokens,
                budget_fraction=args.e2e_budget,
            ),
        ),
        Step(
            "kernel case table",
            lambda _s: [*pytest, "tests/kernel_tests", "-m", "not gpu"],
            "gpu_kernel_cases.txt",
            None,
            needs_triton=True,
        ),
    ]


# -------------------------------------------------------------------------------- preflight
def check(name: str, status: str, value: Any, fix: str | None = None) -> dict[str, Any]:
    """One preflight line: status "ok", "failed", "warning", "skipped" (not tried: what it
    needs failed) or "dry-run"."""
    return dict(name=name, status=status, value=value, fix=fix)


def find_c_compiler() -> dict[str, Any]:
    """The C compiler Triton will use for its launcher: ``$CC``, else gcc, else clang."""
    if cc := os.environ.get("CC"):
        path = shutil.which(cc)
        if path is None:
            return check("c_compiler", "failed", f"CC={cc}", f"CC={cc} is not found: fix or unset")
    else:
        path = shutil.which("gcc") or shutil.which("clang")
        if path is None:
            fix = "apt install gcc (or set CC to a C compiler); Triton looks for $CC, gcc, clang"
            if cc_path := shutil.which("cc"):
                fix = f"export CC={cc_path} (Triton looks for $CC, gcc, clang, never cc)"
            return check("c_compiler", "failed", None, fix)
    try:
        first = subprocess.run(
            [path, "--version"], capture_output=True, text=True, timeout=10
        ).stdout.splitlines()
        version = first[0] if first else "?"
    except (OSError, subprocess.TimeoutExpired) as e:
        return check("c_compiler", "failed", path, f"{path} --version failed: {e}")
    return check("c_compiler", "ok", f"{path} ({version})")


def find_python_headers() -> dict[str, Any]:
    """Python.h where Triton's build looks for it."""
    scheme = sysconfig.get_default_scheme()
    scheme = "posix_prefix" if scheme == "posix_local" else scheme  # as Triton does (Debian)
    include = Path(sysconfig.get_paths(scheme=scheme)["include"])
    if (include / "Python.h").is_file():
        return check("python_headers", "ok", str(include / "Python.h"))
    ver = f"{sys.version_info.major}.{sys.version_info.minor}"
    fix = f"apt install python{ver}-dev (or python3-dev): Triton compiles against Python.h"
    return check("python_headers", "failed", f"no Python.h in {include}", fix)


def host_checks() -> list[dict[str, Any]]:
    """What needs no device: versions, the compiler and the headers."""
    out = [check("python", "ok", f"{platform.python_version()} ({sys.executable})")]
    cuda = torch.version.cuda
    out.append(
        check("torch", "ok", f"{torch.__version__}, built for CUDA {cuda}")
        if cuda
        else check(
            "torch",
            "failed",
            f"{torch.__version__}, a CPU-only build",
            "install a CUDA build of torch (pip install torch --index-url "
            "https://download.pytorch.org/whl/cu126, or the CUDA version the driver supports)",
        )
    )
    try:
        import triton

        out.append(check("triton", "ok", triton.__version__))
    except Exception as e:
        out.append(check("triton", "failed", repr(e), "pip install triton (the one torch pins)"))
    out += [find_c_compiler(), find_python_headers()]
    return out


def _driver_version() -> str | None:
    if shutil.which("nvidia-smi") is None:
        return None
    cmd = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
    try:
        lines = subprocess.run(cmd, capture_output=True, text=True, timeout=15).stdout.split()
    except (OSError, subprocess.TimeoutExpired):
        return None
    return lines[0] if lines else None


def device_checks(blocked: list[str]) -> list[dict[str, Any]]:
    """The device, its memory and driver, libcuda, and one Triton launch (unless a host check
    already failed that it needs: ``blocked``)."""
    try:
        props = torch.cuda.get_device_properties(0)
        major, minor = torch.cuda.get_device_capability(0)
        free, total = torch.cuda.mem_get_info(0)
    except Exception as e:  # a driver or device fault: nothing else can run
        fix = "nvidia-smi says whether the driver sees the GPU and what holds it"
        return [check("device", "failed", f"{type(e).__name__}: {e}", fix)]
    out = [
        check("device", "ok", f"{props.name} (device 0 of {torch.cuda.device_count()})"),
        check("driver", "ok", _driver_version() or "unknown (no nvidia-smi)"),
        check(
            "compute_capability",
            "ok" if major >= 8 else "warning",
            f"sm_{major}{minor}",
            None if major >= 8 else "bf16 tensor-core dots need sm_80 or newer",
        ),
        check(
            "device_memory",
            "ok" if free >= FREE_MEMORY_WARN_GIB * 2**30 else "warning",
            f"{free / 2**30:.1f} GiB free of {total / 2**30:.1f} GiB",
            None
            if free >= FREE_MEMORY_WARN_GIB * 2**30
            else "another process holds device memory (nvidia-smi lists it)",
        ),
    ]
    if blocked:
        why = f"not tried: {', '.join(blocked)} failed"
        return [*out, check("libcuda", "skipped", why), check("triton_launch", "skipped", why)]
    try:
        from triton.backends.nvidia.driver import libcuda_dirs

        out.append(check("libcuda", "ok", libcuda_dirs()))
    except Exception as e:
        fix = "run /sbin/ldconfig, or set TRITON_LIBCUDA_PATH to the folder of libcuda.so.1"
        out.append(check("libcuda", "failed", str(e).strip().splitlines()[0], fix))
        return [*out, check("triton_launch", "skipped", "not tried: libcuda failed")]
    out.append(triton_launch())
    return out


def triton_launch() -> dict[str, Any]:
    """speq's top-k routing kernel, compiled and launched once (the launcher is built then)."""
    from speq.kernels import route_topk, route_topk_torch

    start = time.monotonic()
    try:
        gen = torch.Generator(device="cuda").manual_seed(0)
        logits = torch.randn(4, 8, device="cuda", generator=gen)
        ids, _ = route_topk(logits, 2, backend="triton")
        ref, _ = route_topk_torch(logits, 2)
        same = torch.equal(ids.sort(-1).values.long(), ref.sort(-1).values.long())
    except Exception as e:
        text = " ".join(str(e).split())[:600]  # a compiler's error spans lines
        return check("triton_launch", "failed", f"{type(e).__name__}: {text}")
    took = f"route_topk compiled and ran in {time.monotonic() - start:.1f} s"
    if not same:
        return check("triton_launch", "failed", f"{took}, but its experts differ from torch's")
    return check("triton_launch", "ok", took)


def preflight(dry_run: bool) -> dict[str, Any]:
    """The checks, and whether Triton can run (``triton_ok``; ``triton_reason`` if not)."""
    checks = host_checks()
    blocked = [c["name"] for c in checks if c["name"] in TRITON_CHECKS and c["status"] == "failed"]
    if dry_run:
        names = ("device", "driver", "compute_capability", "device_memory")
        checks += [check(n, "dry-run", None) for n in (*names, "libcuda", "triton_launch")]
    else:
        checks += device_checks(blocked)
    failed = [c for c in checks if c["status"] == "failed"]

    def reason(names: tuple[str, ...]) -> str | None:
        why = [
            f"{c['name']}: {c['value']}" + (f" (fix: {c['fix']})" if c["fix"] else "")
            for c in failed
            if c["name"] in names
        ]
        return "; ".join(why) or None

    return dict(
        status="failed" if failed else "ok",
        checks=checks,
        device_reason=reason(("device",)),
        triton_ok=reason(TRITON_CHECKS) is None,
        triton_reason=reason(TRITON_CHECKS),
    )


# ------------------------------------------------------------------------------------ steps
def run_step(cmd: list[str], log: Path, limit_s: float) -> dict[str, Any]:
    """Run ``cmd`` from the repo root with its output in ``log``; past ``limit_s`` it gets
    SIGINT, then SIGKILL ``GRACE_S`` later. The log's tail is printed after."""
    start = time.monotonic()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # a killed step's log keeps its last lines
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env)
        try:
            rc: int | None = proc.wait(timeout=limit_s)
            status = "ok" if rc == 0 else "failed"
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGINT)  # pytest prints the failures so far
            try:
                proc.wait(timeout=GRACE_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            rc, status = None, "timeout"
        finally:
            if proc.poll() is None:  # this script is being stopped: so is its step
                proc.kill()
                proc.wait()
    seconds = time.monotonic() - start
    print("\n".join(log.read_text(errors="replace").splitlines()[-25:]))
    return dict(rc=rc, seconds=round(seconds, 1), status=status)


# ``pytest -v``: "tests/a.py::test_b[x] PASSED [ 3%]"; a test stopped while running has no outcome
PYTEST_TEST = re.compile(r"^(tests/\S*::.*?)(?: (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b.*)?$")
PYTEST_TOTALS = re.compile(r"^=+ (.*\d+ \w+.*) in [\d.]+s")


def pytest_summary(log: Path) -> dict[str, Any]:
    """The totals line, the outcomes counted from the -v lines (for a run killed before its
    totals), the failures (-ra's lines), and the test that was running when the run stopped."""
    lines = log.read_text(errors="replace").splitlines() if log.exists() else []
    totals = next((m.group(1) for ln in reversed(lines) if (m := PYTEST_TOTALS.match(ln))), None)
    tests = [m.groups() for ln in lines if (m := PYTEST_TEST.match(ln.rstrip()))]
    outcomes: dict[str, int] = {}
    for _, outcome in tests:
        if outcome:
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
    running = tests[-1][0] if tests and tests[-1][1] is None else None
    return dict(
        totals=totals,
        outcomes=outcomes,
        failures=[ln for ln in lines if ln.startswith(("FAILED ", "ERROR "))],
        running_when_stopped=running,
    )


def kernels_summary(path: Path) -> dict[str, Any]:
    """The kernel benchmark's rows, medians only (the spreads are in the file)."""
    data = json.loads(path.read_text())
    keep = ("model", "T", "experts_hit", "max_abs_err_vs_ref")
    rows = []
    for row in data.get("rows", []):
        short = {k: row.get(k) for k in keep}
        for label in ("bf16", "int4"):
            short[f"{label}_us"] = (row.get(f"{label}_us") or {}).get("median")
            short[f"{label}_gbps"] = row.get(f"{label}_gbps")
            short[f"{label}_pct_hbm"] = row.get(f"{label}_pct_hbm")
        rows.append(short)
    return dict(complete=data.get("complete"), skipped=data.get("skipped"), rows=rows)


def e2e_summary(path: Path) -> dict[str, Any]:
    data = json.loads(path.read_text())
    keep = ("dtype", "label", "status", "tokens_per_s", "first_difference", "k_star", "error")
    rows = [{k: row.get(k) for k in keep} for row in data.get("rows", [])]
    return dict(complete=data.get("complete"), rows=rows)


SUMMARIES: dict[str, Callable[[Path], dict[str, Any]]] = {
    "kernels_gpu.json": kernels_summary,
    "e2e_check_cuda.json": e2e_summary,
}


def summary_line(summary: dict[str, Any] | None) -> str:
    """A step's summary in a few words, for the last lines printed."""
    if not summary:
        return ""
    if "totals" in summary:
        text = f" ({summary['totals'] or summary['outcomes']})"
        if summary["running_when_stopped"]:
            text += f"; stopped in {summary['running_when_stopped']}"
        return text + "".join(f"\n    {f}" for f in summary["failures"])
    if "rows" in summary:
        rows = summary["rows"]
        bad = [r for r in rows if r.get("status") not in (None, "ok")]
        done = "complete" if summary.get("complete") else "incomplete"
        text = f" ({len(rows)} rows, {done})"
        return text + "".join(f"\n    {r['dtype']} {r['label']}: {r['status']}" for r in bad)
    return f" ({summary.get('note')})"


def summarise(step: Step, out: Path, started: float) -> dict[str, Any]:
    """What the step's log or result file says (a result file older than the step is ignored)."""
    if step.result is None:
        return pytest_summary(out / step.log)
    path = out / step.result
    if not path.exists() or path.stat().st_mtime < started:
        return dict(result=None, note=f"{step.result} was not written")
    try:
        return dict(result=str(path), **SUMMARIES[step.result](path))
    except (ValueError, OSError) as e:
        return dict(result=str(path), note=f"unreadable: {e}")


# ------------------------------------------------------------------------------- end to end
def e2e_contenders() -> list[tuple[str, str, int | None]]:
    """(label, policy, k): every registered policy, resident first; a drafting policy at a
    fixed k, then governed (the governor's calibration is the slowest compile: last, so that a
    step out of time has the others)."""
    from speq.runtime.policies import POLICIES

    plain = [(name, name, None) for name, p in POLICIES.items() if not p.drafts]
    drafting = [name for name, p in POLICIES.items() if p.drafts]
    return (
        sorted(plain, key=lambda c: c[0] != "resident")
        + [(f"{name} k={E2E_SPEQ_K}", name, E2E_SPEQ_K) for name in drafting]
        + [(f"{name} (governor)", name, None) for name in drafting]
    )


def first_difference(a: torch.Tensor, b: torch.Tensor, start: int) -> int | None:
    """The index of the first new token where ``a`` and ``b`` differ (None: equal)."""
    diff = (a[0, start:] != b[0, start:]).nonzero()
    return None if diff.numel() == 0 else int(diff[0, 0])


def e2e_run(
    model, opts, prompt: torch.Tensor, expected: torch.Tensor, row: dict[str, Any]
) -> dict[str, Any]:
    """Compile under ``opts`` and generate twice (the first compiles kernels and captures
    graphs); the row gets the second run's figures and both runs' agreement with ``expected``."""
    import speq

    start = time.monotonic()
    cm = speq.compile(model, opts)
    row["compile_s"] = round(time.monotonic() - start, 2)
    n = expected.shape[-1] - prompt.shape[-1]
    outs = []
    for _ in range(2):
        t0 = time.monotonic()
        outs.append(cm.generate(prompt, n).cpu())
        row["generate_s"] = round(time.monotonic() - t0, 3)
    m = cm.metrics
    diffs = [first_difference(o, expected, prompt.shape[-1]) for o in outs]
    row.update(
        identical_to_resident=all(d is None for d in diffs),
        first_difference=next((d for d in diffs if d is not None), None),
        tokens_per_s=1e3 / m.tpot_ms if m.tpot_ms > 0 else None,
        tpot_ms=m.tpot_ms,
        prefill_ms=m.prefill_ms,
        cache_slots=m.cache_slots,
        hit_rate=m.hit_rate,
        experts_moved=m.experts_moved,
        mb_moved=m.bytes_moved / 1e6,
        stall_ms=m.stall_ms,
        acceptance_rate=m.extra.get("acceptance_rate"),
        k_star=None
        if cm.governed is None
        else (cm.governed.spec.k if cm.governed.use_draft else "no draft"),
    )
    return row


def e2e_line(row: dict[str, Any]) -> str:
    """A run's status and figures, as the step's log prints them."""
    if row["status"] == "error":
        return f"error: {row['error']}"
    text = f"{row['status']:<20}"
    if row.get("tokens_per_s"):
        text += f" {row['tokens_per_s']:8.1f} tok/s"
    if row["first_difference"] is not None:
        text += f", first difference at new token {row['first_difference']}"
    return text


def run_e2e(args: argparse.Namespace) -> int:
    """The end-to-end step (in this process): e2e_check_cuda.json rewritten after every run."""
    import speq
    from speq.cli.demo import DEMO_PROMPT
    from speq.compare import budget_bytes
    from speq.models.demo import model_with_tokenizer
    from speq.runtime.policies import POLICIES

    cuda = args.e2e_backend == "cuda"
    if cuda and not torch.cuda.is_available():
        print("gpu_check --e2e: no CUDA device here; nothing run (--e2e-backend cpu runs it).")
        return 0
    path = args.out / f"e2e_check_{args.e2e_backend}.json"
    rows: list[dict[str, Any]] = []
    where = torch.cuda.get_device_name() if cuda else "this CPU, its link emulated"
    setting = (
        f"the shipped demo MoE on the {args.e2e_backend} backend ({where}), greedy, "
        f"{args.e2e_tokens} new tokens after {DEMO_PROMPT!r}; device budget = non-expert weights "
        f"+ KV cache + {args.e2e_budget:g} of the expert bytes, sizes counted in bf16; each "
        f"contender generates twice, its figures from the second run; tokens/s = 1000 / TPOT"
    )
    payload = dict(benchmark="gpu_check e2e", setting=setting, code=git_state(), rows=rows)

    def save(complete: bool = False) -> None:
        write_json(path, {**payload, "complete": complete})

    save()
    for dtype_name in args.e2e_dtypes:
        dtype = getattr(torch, dtype_name)
        base = speq.CompileOptions(backend=args.e2e_backend, memory_dtype=torch.bfloat16)
        try:  # the reference: every expert resident, on this backend
            model, tok, _ = model_with_tokenizer(None, dtype)
            prompt = torch.tensor([tok.encode(DEMO_PROMPT)], dtype=torch.int64)
            resident = speq.compile(model, base)
            expected = resident.generate(prompt, args.e2e_tokens).cpu()
            budget = budget_bytes(resident, args.e2e_budget)
            del resident
        except Exception as e:
            row = dict(dtype=dtype_name, label="resident (reference)", policy="resident")
            rows.append({**row, "status": "error", "error": f"{type(e).__name__}: {e}"})
            save()
            print(f"{dtype_name:>8} {row['label']:<24} {e2e_line(rows[-1])}", flush=True)
            continue
        cases: list[tuple[str, Any, bool]] = []  # (label, options, must equal resident)
        for label, policy, k in e2e_contenders():
            memory = None if policy == "resident" else budget
            opts = dataclasses.replace(base, policy=policy, k=k, device_memory=memory)
            # float64 is exact; in bf16 only a drafting policy's verification may round apart
            cases.append((label, opts, dtype == torch.float64 or not POLICIES[policy].drafts))
        if cuda and dtype == torch.float64:  # the cuda backend against the cpu backend
            cases.append(("resident (cpu backend)", speq.CompileOptions(), True))
        for label, opts, required in cases:
            row = dict(dtype=dtype_name, label=label, policy=opts.policy, k=opts.k)
            row.update(backend=opts.backend, device_memory=opts.device_memory, required=required)
            try:
                e2e_run(model, opts, prompt, expected, row)
                same = row["identical_to_resident"]
                row["status"] = "ok" if same else ("failed" if required else "differs (reported)")
            except Exception as e:  # one broken contender must not hide the others
                row.update(status="error", error=f"{type(e).__name__}: {e}")
            rows.append(row)
            save()
            print(f"{dtype_name:>8} {label:<24} {e2e_line(row)}", flush=True)
            if cuda:
                torch.cuda.empty_cache()
    save(complete=True)
    print(f"# wrote {path}")
    return 0 if all(r["status"] in ("ok", "differs (reported)") for r in rows) else 1


# ------------------------------------------------------------------------------------- main
def output_file(out: Path, dry_run: bool) -> Path:
    """gpu_check.json; a dry run does not overwrite a real run's (it writes beside it)."""
    path = out / "gpu_check.json"
    if dry_run and path.exists():
        try:
            real = not json.loads(path.read_text()).get("dry_run", False)
        except ValueError:
            real = False
        if real:
            return out / "gpu_check.dry-run.json"
    return path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget-s", type=float, default=470.0, help="total wall-clock limit")
    parser.add_argument("--out", type=Path, default=RESULTS, help="the results' folder")
    parser.add_argument("--dry-run", action="store_true", help="plan and preflight, no device")
    parser.add_argument("--e2e", action="store_true", help="run only the end-to-end step, here")
    parser.add_argument("--e2e-tokens", type=int, default=E2E_TOKENS, help="new tokens per run")
    parser.add_argument("--e2e-budget", type=float, default=E2E_BUDGET, help="expert fraction")
    parser.add_argument("--e2e-dtypes", nargs="+", choices=E2E_DTYPES, default=list(E2E_DTYPES))
    parser.add_argument(
        "--e2e-backend",
        choices=("cuda", "cpu"),
        default="cuda",
        help="with --e2e: cpu runs the same step on the CPU (e2e_check_cpu.json), to try it",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.out = args.out.resolve()  # the steps run from the repository root
    if args.e2e:
        args.out.mkdir(parents=True, exist_ok=True)
        return run_e2e(args)

    if not args.dry_run and not torch.cuda.is_available():
        why = (
            f"torch {torch.__version__} is a CPU-only build"
            if torch.version.cuda is None
            else f"torch is built for CUDA {torch.version.cuda} but sees no device"
        )
        print(f"gpu_check: no CUDA device here ({why}); the GPU steps need one. Nothing run.")
        print("gpu_check: --dry-run plans the steps and runs the host-side preflight here.")
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    deadline = start + args.budget_s
    path = output_file(args.out, args.dry_run)
    report: dict[str, Any] = dict(
        dry_run=args.dry_run,
        budget_s=args.budget_s,
        code=git_state(),
        out=str(args.out),
        preflight=None,
        steps=[],
    )

    def save() -> None:
        report["seconds"] = round(time.monotonic() - start, 1)
        write_json(path, report)

    print("=== preflight", flush=True)
    pre = preflight(args.dry_run)
    report["preflight"] = pre
    for c in pre["checks"]:
        fix = f"  -> {c['fix']}" if c["fix"] and c["status"] != "ok" else ""
        print(f"  {c['name']:<19} {c['status']:<8} {c['value']}{fix}")
    steps = plan(args, pre["triton_ok"])
    report["steps"] = [
        dict(
            name="preflight",
            cmd="in process: gpu_check.preflight()",
            status="ok" if pre["status"] == "ok" else "failed",
            seconds=round(time.monotonic() - start, 1),
        )
    ]
    # the plan with nominal limits: each step its cap, the last what the others leave
    nominal = args.budget_s - sum(s.cap_s or 0 for s in steps) - GRACE_S * len(steps)
    for s in steps:
        limit = s.cap_s if s.cap_s is not None else max(nominal, MIN_STEP_S)
        entry = dict(name=s.name, cmd=s.argv(limit), log=str(args.out / s.log), limit_s=limit)
        if s.result:
            entry["result"] = str(args.out / s.result)
        if s.plan:
            entry["plan"] = s.plan
        entry["status"] = "dry-run" if args.dry_run else "pending"
        if pre["device_reason"]:
            entry["skip_reason"] = f"the device failed the preflight: {pre['device_reason']}"
        elif s.needs_triton and not pre["triton_ok"]:
            entry["skip_reason"] = f"Triton cannot run here: {pre['triton_reason']}"
        report["steps"].append(entry)
    save()
    if args.dry_run:
        for e in report["steps"]:
            cmd = e["cmd"] if isinstance(e["cmd"], str) else shlex.join(e["cmd"])
            print(f"=== {e['name']} [{e['status']}]: {cmd}")
            if "skip_reason" in e:
                print(f"    would be skipped: {e['skip_reason']}")
        print(f"# wrote {path}")
        return 0

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stops the running step too
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:  # started in the background: the
        # steps would inherit the ignored SIGINT; a handler is reset at exec, so they get it
        signal.signal(signal.SIGINT, signal.default_int_handler)
    for s, entry in zip(steps, report["steps"][1:]):
        if "skip_reason" in entry:
            entry["status"] = f"skipped: {entry['skip_reason']}"
            save()
            continue
        left = deadline - time.monotonic() - GRACE_S
        if left < MIN_STEP_S:
            entry["status"] = "skipped: out of time"
            save()
            continue
        limit = left if s.cap_s is None else min(s.cap_s, left)
        cmd = s.argv(limit)
        entry.update(cmd=cmd, limit_s=round(limit), status="running")
        save()
        print(f"=== {s.name}: {shlex.join(cmd)} (limit {limit:.0f} s)", flush=True)
        began = time.time()
        try:
            entry.update(run_step(cmd, args.out / s.log, limit))
        except BaseException:  # stopped (Ctrl-C, SIGTERM): record it, then stop
            entry["status"] = "interrupted"
            save()
            raise
        entry["summary"] = summarise(s, args.out, began)
        save()
        print(f"=== {s.name}: {entry['status']} (exit {entry['rc']}, {entry['seconds']:.0f} s)")

    print()
    for e in report["steps"]:
        print(f"{e['name']}: {e['status']}{summary_line(e.get('summary'))}")
    print(f"# wrote {path}")
    return 0 if all(e["status"] == "ok" for e in report["steps"]) else 1


if __name__ == "__main__":
    sys.exit(main())
