"""Backend selection as a pure function, the package without Triton, and the Triton kernels
compiled ahead of time for NVIDIA GPUs (what the interpreter does not check)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from speq.kernels._triton import HAS_TRITON, select_backend

ROOT = Path(__file__).resolve().parents[2]
T_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32})
CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.mark.parametrize(
    ("requested", "device", "dtype", "expected"),
    [
        ("torch", CUDA, torch.float16, "torch"),
        ("auto", CPU, torch.float32, "torch"),
        ("auto", CUDA, torch.float64, "torch"),
        ("auto", CUDA, torch.float16, "triton" if HAS_TRITON else "torch"),
    ],
)
def test_select_backend(requested: str, device, dtype, expected: str) -> None:
    assert select_backend(requested, device, (dtype,), T_DTYPES, "op") == expected


@pytest.mark.skipif(not HAS_TRITON, reason="needs Triton")
def test_forced_triton_names_what_is_missing(monkeypatch) -> None:
    with pytest.raises(ValueError, match="float64"):
        select_backend("triton", CUDA, (torch.float64,), T_DTYPES, "op")
    monkeypatch.setattr("speq.kernels._triton.interpreter_active", lambda: False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        select_backend("triton", CPU, (torch.float32,), T_DTYPES, "op")


def _run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=240,
    )


def test_package_works_without_triton() -> None:
    proc = _run_python(
        """
        import sys
        sys.modules["triton"] = None  # import triton now raises ImportError
        import torch
        import speq.kernels as K
        assert not K.HAS_TRITON
        ids, w = K.route_topk(torch.randn(3, 4), 2)
        w13, w2 = torch.randn(4, 6, 5), torch.randn(4, 5, 3)
        out = K.fused_moe(torch.randn(3, 5), K.quantize_experts(w13), w2, ids, w)
        assert out.shape == (3, 5)
        try:
            K.fused_moe(torch.randn(3, 5), w13, w2, ids, w, backend="triton")
        except ValueError as e:
            assert "not installed" in str(e)
        else:
            raise AssertionError("expected a ValueError")
        print("ok")
        """
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


NVIDIA_BIN = (
    Path(importlib.util.find_spec("triton").origin).parent / "backends" / "nvidia" / "bin"
    if HAS_TRITON
    else None
)
TARGETS = ("sm_90", "sm_80")
KERNELS = (
    "_gate_up_kernel",
    "_down_kernel",
    "_combine_kernel",
    "_route_topk_kernel",
    "_align_kernel",
)
GEMM_KERNELS = ("_gate_up_kernel", "_down_kernel")
# Register bounds by config and kernel. Measured with Triton 3.9, sm_90 / sm_80, on
# DeepSeek-V2-Lite's layer (tests/kernel_tests/aot_report.py):
# decode default (BM16 BN64 BK128, 4 warps, 4 stages): gate_up 108 / 110 bf16, 168 / 168 INT4
# and INT8 (255 before INT4 tiles loaded whole); down 72-90 / 80-108; combine 38 / 36;
# route_topk 44-50 / 42-48; alignment 80 / 80 sorted (up to 1020 pairs, 512 experts), 32 / 29
# direct.
# prefill (BM128 BN64, 8 warps, 3 stages; BK64 bf16, BK32 quantized): gate_up 127 / 140 bf16,
# 248 / 255 INT4 and INT8 (the whole register file, without spills: the bound is that file);
# down 76 / 164 bf16, 156-171 / 171-196 quantized.
MAX_REGISTERS = {
    "decode": {
        "_gate_up_kernel": 180,
        "_down_kernel": 120,
        "_combine_kernel": 48,
        "_route_topk_kernel": 64,
        "_align_kernel": 96,
    },
    "prefill": {"_gate_up_kernel": 255, "_down_kernel": 216},
}


def _aot_failures(r: dict) -> list[str]:
    """What is wrong with one compiled kernel's report (see aot_report.py for its fields)."""
    phase, *rest = r["case"].split("/")
    where = f"{r['kernel']} {r['target']} {r['case']}: {r}"
    out = []
    gemm = r["kernel"] in GEMM_KERNELS
    if gemm and rest[0] == "f32":  # the IEEE fp32 dot is exempt from the bounds (docstring)
        return [f"dot operands are not f32 in {where}"] if r["dot_operands"] != ["f32"] else []
    if r["stack"]:
        out.append(f"spills ({r['stack']} bytes of stack) in {where}")
    if r["registers"] > MAX_REGISTERS[phase][r["kernel"]]:
        out.append(f"over {MAX_REGISTERS[phase][r['kernel']]} registers in {where}")
    if gemm:
        if r["byte_loads"] or not r["async_copies"]:
            out.append(f"tiles not loaded by vector or async copies in {where}")
        if r["dot_operands"] != [rest[0]]:  # the GPU's dot takes x's dtype (no DOT_IN_FP32)
            out.append(f"dot operands {r['dot_operands']} are not {rest[0]} in {where}")
    return out


@pytest.mark.slow
@pytest.mark.skipif(
    NVIDIA_BIN is None
    or not all((NVIDIA_BIN / t).is_file() for t in ("ptxas", "ptxas-blackwell", "cuobjdump")),
    reason="needs Triton with its NVIDIA backend (ptxas, cuobjdump)",
)
def test_every_kernel_compiles_for_sm90_and_sm80_without_spills() -> None:
    """Every Triton kernel (gate/up, down, combine, routing, alignment), compiled ahead of time
    for sm_90 and sm_80 as a real launch specialises it, at the decode default and the prefill
    config, for bf16, INT4 and INT8 (group 128) weights; also the store combine, expert biases
    with the clamped SwiGLU, both routing modes, both alignment methods, and fp16 / fp32
    activations on sm_90 (tests/kernel_tests/aot_report.py lists the cases). No GPU is needed, and
    this catches what the interpreter lets through (globals that are not constexpr, dtype rules
    of tl.dot, early returns). Each kernel: no spills (a zero stack frame), registers within
    MAX_REGISTERS, and for the GEMMs no single-byte global loads and asynchronous copies (the
    packed INT4 and the INT8 tiles arrive whole) and dots on x's dtype. One subprocess, 52
    compiles: about 50 s of CPU with a cold Triton cache, 10 s warm (measured on two cores).

    fp32 activations (tl.dot in IEEE precision, an FMA loop) are only compiled and checked for
    an fp32 dot: at the decode default they spill (32 registers and a 4.5 KB stack frame on
    sm_90, measured); fp32 on a GPU is a correctness path, not a fast one."""
    import json

    proc = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("aot_report.py"))],
        cwd=ROOT,
        env={**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"},
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    reports = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert {(r["target"], r["kernel"]) for r in reports} == {
        (t, k) for t in TARGETS for k in KERNELS
    }, "every kernel on every target"
    assert {r["case"].split("/")[0] for r in reports} == set(MAX_REGISTERS)
    failures = [f for r in reports for f in _aot_failures(r)]
    assert not failures, "\n".join(failures)
