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


INT4_REPORT_SCRIPT = """
import json, os, re, subprocess, tempfile, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from speq.kernels import _fused_moe_kernels as K

PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas-blackwell")

def build(fn, pointers, constexprs, divisible):
    # as a launch specialises: unit strides are constants, pointers and sizes divisible by 16
    constexprs = {k: v for k, v in constexprs.items() if k in fn.arg_names}
    sig = {n: "constexpr" if n in constexprs else pointers.get(n, "i32") for n in fn.arg_names}
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in divisible}
    src = ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4, num_stages=4))

def report(kernel):
    ptx = kernel.asm["ptx"]
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    out = subprocess.run([PTXAS, "-arch=sm_90a", "-v", f.name, "-o", os.devnull],
                         capture_output=True, text=True, check=True).stderr
    return dict(
        registers=int(re.search(r"Used (\\d+) registers", out).group(1)),
        spill_bytes=sum(map(int, re.findall(r"(\\d+) bytes spill (?:stores|loads)", out))),
        byte_loads=len(re.findall(r"ld\\.global[.\\w]*\\.[usb]8\\b", ptx)),
        async_copies=ptx.count("cp.async.cg") + ptx.count("cp.async.ca"),
    )

common = dict(pair_ids_ptr="*i32", block_expert_ptr="*i32", num_valid_blocks_ptr="*i32",
              slot_ptr="*i32", bias_ptr="*fp32", alpha="fp32", limit="fp32", rw_ptr="*fp32",
              out_ptr="*fp32", w_ptr="*u8", w_scale_ptr="*fp32")
meta = dict(TOP_K=2, W_BITS=4, GROUP_SIZE=128, DOT_PRECISION="tf32", DOT_IN_FP32=False,
            BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, GROUP_M=4, HAS_BIAS=False, SCALE_AFTER_DOT=True,
            EVEN_K=True, stride_xk=1, stride_wk=1, stride_sg=1, stride_hn=1, stride_hk=1,
            stride_bn=1, stride_on=1)
ptrs = [n for n in common if n.endswith("_ptr")] + ["x_ptr", "h_ptr"]
sizes = ["I", "K", "N", "stride_xt", "stride_ws", "stride_wn", "stride_ss", "stride_sn",
         "stride_hp", "stride_be", "stride_or", "k_per_split"]
gate_up = build(K._gate_up_kernel, dict(common, x_ptr="*bf16", h_ptr="*bf16"),
                dict(meta, ACTIVATION=0), [n for n in ptrs + sizes if n in K._gate_up_kernel.arg_names])
down = build(K._down_kernel, dict(common, h_ptr="*bf16"), dict(meta, COMBINE=0),
             [n for n in ptrs + sizes if n in K._down_kernel.arg_names])
print(json.dumps({"gate_up": report(gate_up), "down": report(down)}))
"""
INT4_MAX_REGISTERS = 180


@pytest.mark.skipif(not HAS_TRITON, reason="needs Triton")
@pytest.mark.skipif(
    not (Path(importlib.util.find_spec("triton").origin).parent / "backends" / "nvidia" / "bin"
         / "ptxas-blackwell").is_file()
    if HAS_TRITON
    else True,
    reason="this Triton has no NVIDIA backend with ptxas",
)  # fmt: skip
def test_int4_kernels_at_the_decode_default_load_whole_tiles_without_spills() -> None:
    """The draft's hot path, compiled for sm_90 as a launch specialises it (BM16/BN64/BK128, 4
    warps, 4 stages, K a multiple of BLOCK_K): ptxas's own report shows no spills and at most
    INT4_MAX_REGISTERS registers, and the PTX has no single-byte global loads (the packed weight
    tile arrives by vectorised asynchronous copies)."""
    import json

    proc = _run_python(INT4_REPORT_SCRIPT, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    reports = json.loads(proc.stdout.strip().splitlines()[-1])
    for name, r in reports.items():
        assert r["spill_bytes"] == 0, (name, r)
        assert r["registers"] <= INT4_MAX_REGISTERS, (name, r)
        assert r["byte_loads"] == 0, (name, r)
        assert r["async_copies"] > 0, (name, r)
