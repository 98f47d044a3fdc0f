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


AOT_SCRIPT = """
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from speq.kernels import _fused_moe_kernels as K, _routing_kernels as R

def build(fn, pointers, constexprs, num_warps=4, num_stages=3):
    sig = {n: "constexpr" if n in constexprs else pointers.get(n, "i32") for n in fn.arg_names}
    src = ASTSource(fn=fn, signature=sig, constexprs=constexprs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=num_warps, num_stages=num_stages))

common = dict(pair_ids_ptr="*i32", block_expert_ptr="*i32", num_valid_blocks_ptr="*i32",
              slot_ptr="*i32", bias_ptr="*fp32", alpha="fp32", limit="fp32")
for act, bits, wt, prec, biased in [("bf16", 0, "bf16", "tf32", False),
                                    ("fp16", 4, "u8", "tf32", False),
                                    ("fp32", 8, "i8", "ieee", False),
                                    ("bf16", 0, "bf16", "tf32", True)]:  # GPT-OSS's experts
    scale = "*fp32" if bits else f"*{act}"
    meta = dict(TOP_K=2, W_BITS=bits, GROUP_SIZE=64 if bits else 1, DOT_PRECISION=prec,
                DOT_IN_FP32=False, BLOCK_M=16, BLOCK_N=32, BLOCK_K=64, GROUP_M=4,
                HAS_BIAS=biased)
    gate_up = build(K._gate_up_kernel, dict(common, x_ptr=f"*{act}", w_ptr=f"*{wt}",
                    w_scale_ptr=scale, h_ptr=f"*{act}"),
                    dict(meta, SCALE_AFTER_DOT=bits == 4, ACTIVATION=int(biased)))
    down = build(K._down_kernel, dict(common, h_ptr=f"*{act}", w_ptr=f"*{wt}", w_scale_ptr=scale,
                 rw_ptr="*fp32", out_ptr="*fp32"),
                 dict(meta, SCALE_AFTER_DOT=bits != 8, COMBINE=bits // 4))
    ir_ty = act.replace("fp", "f")  # bf16, f16, f32 in the IR
    for kernel in (gate_up, down):  # the GPU's dot takes tiles of x's dtype (no DOT_IN_FP32)
        dots = [line for line in kernel.asm["ttir"].splitlines() if " tt.dot " in line]
        assert dots and all(f"x{ir_ty}> * tensor<" in d and f"x{ir_ty}> -> " in d for d in dots), dots
build(K._combine_kernel, dict(y_ptr="*fp32", out_ptr="*bf16"), dict(TOP_K=6, BLOCK_N=256))
for mode in (0, 1):
    build(R._route_topk_kernel, dict(logits_ptr="*bf16", ids_ptr="*i32", weights_ptr="*fp32"),
          dict(TOP_K=2, MODE=mode, RENORMALIZE=True, BLOCK_T=8, BLOCK_E=8, BLOCK_K=2))
print("ok")
"""


@pytest.mark.skipif(not HAS_TRITON, reason="needs Triton")
@pytest.mark.skipif(
    not (Path(importlib.util.find_spec("triton").origin).parent / "backends" / "nvidia").is_dir()
    if HAS_TRITON
    else True,
    reason="this Triton has no NVIDIA backend",
)
def test_kernels_compile_for_sm90() -> None:
    """Lower every kernel (dense, INT4, INT8; atomic and store combine; expert biases and the
    clamped SwiGLU; both routing modes) to
    a Hopper cubin. This needs no GPU and catches what the interpreter lets through (globals
    that are not constexpr, dtype rules of tl.dot, early returns)."""
    proc = _run_python(AOT_SCRIPT, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1")
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]
