"""Compile every Triton kernel of speq for NVIDIA GPUs ahead of time and report on each: no GPU
is needed (Triton's bundled ptxas and cuobjdump do the work). Run by ``test_backends.py`` in a
subprocess with ``TRITON_INTERPRET=0``; prints one JSON object per compiled kernel.

The launches are the real ones: the public wrappers run on meta tensors (shapes and strides, no
data) with each ``@triton.jit`` kernel replaced by a recorder, and each recorded launch is
specialised exactly as ``JITFunction.run`` specialises it (Triton's own binder: integer
arguments equal to 1 become constants, pointers and integers divisible by 16 get the
divisibility attribute) and compiled for each target. The shape is DeepSeek-V2-Lite's MoE layer
(E=64, k=6, H=2048, I=1408) at the decode default config (``default_config`` for a few tokens)
and the prefill one (many tokens), with bf16 weights, INT4 and INT8 weights (group 128).

Each record: kernel, target, case, ``registers`` and ``stack`` (bytes of stack frame: spill
stores go there, so 0 means no spills) from ``cuobjdump -res-usage`` on the cubin; from the
PTX, ``byte_loads`` (``ld.global`` of 8-bit values), ``async_copies`` (``cp.async``) and
``vector_loads`` (``ld.global.v*``); ``dot_operands`` (the operand types of the ``tt.dot`` ops
in the TTIR); ``seconds`` to compile.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import create_function_from_signature

from speq.kernels import (
    _alignment_kernels,
    _fused_moe_kernels,
    _routing_kernels,
    alignment,
    default_config,
    routing,
)
from speq.kernels._triton import cdiv
from speq.kernels.activation import SWIGLU, Activation
from speq.kernels.quant import QuantizedExperts
from speq.kernels.shapes import PRESETS

SHAPE = PRESETS["deepseek-v2-lite"]
TARGETS = {"sm_90": 90, "sm_80": 80}
TOKENS = {"decode": 4, "prefill": 4096}
IR_TYPES = {torch.bfloat16: "bf16", torch.float16: "f16", torch.float32: "f32"}
BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
META = torch.device("meta")
fused_moe = importlib.import_module("speq.kernels.fused_moe")  # the package exports the function
KERNEL_MODULES = (_fused_moe_kernels, _alignment_kernels, _routing_kernels)


@dataclasses.dataclass
class Launch:
    fn: triton.JITFunction
    args: tuple
    kwargs: dict


@contextlib.contextmanager
def recording() -> Iterator[list[Launch]]:
    """Replace every ``@triton.jit`` kernel of speq by a recorder of its launches."""
    launches: list[Launch] = []

    class Recorder:
        def __init__(self, fn: triton.JITFunction) -> None:
            self.fn = fn

        def __getitem__(self, grid) -> Callable[..., None]:
            return lambda *args, **kwargs: launches.append(Launch(self.fn, args, kwargs))

    saved = [
        (m, name, fn)
        for m in KERNEL_MODULES
        for name, fn in vars(m).items()
        if isinstance(fn, triton.JITFunction) and name.endswith("_kernel")
    ]
    for m, name, fn in saved:
        setattr(m, name, Recorder(fn))
    try:
        yield launches
    finally:
        for m, name, fn in saved:
            setattr(m, name, fn)


def _weights(kind: str, shape: tuple[int, ...], dtype: torch.dtype):
    if kind == "dense":
        return torch.empty(shape, dtype=dtype, device=META)
    bits, group = (4, 128) if kind == "int4g128" else (8, 128)
    *lead, k = shape
    packed = cdiv(k, 2) if bits == 4 else k
    data = torch.empty((*lead, packed), dtype=torch.uint8 if bits == 4 else torch.int8, device=META)
    scales = torch.empty((*lead, cdiv(k, group)), dtype=torch.float32, device=META)
    return QuantizedExperts(data, scales, bits, group, shape, dtype)


def layer_launches(
    tokens: int,
    weights: str,
    dtype: torch.dtype = torch.bfloat16,
    *,
    deterministic: bool = False,
    biased: bool = False,
) -> list[Launch]:
    """The launches of one MoE layer (alignment when its kernel takes the size, gate/up, down,
    and the fixed-order combine when deterministic) as ``fused_moe`` issues them (the plan is
    built here, as the meta device has no Triton backend to select)."""
    e, k, h, i = SHAPE.num_experts, SHAPE.top_k, SHAPE.hidden, SHAPE.intermediate
    group = None if weights == "dense" else 128
    config = default_config(tokens, e, k, i, h, group_size=group)
    ids = torch.empty((tokens, k), dtype=torch.int32, device=META)
    hidden = torch.empty((tokens, h), dtype=dtype, device=META)
    dims = fused_moe.MoEDims(tokens, h, i, e, k, e)
    bias = (None, None)
    if biased:  # GPT-OSS's experts
        b13, b2 = torch.empty((e, 2 * i), dtype=dtype), torch.empty((e, h), dtype=dtype)
        bias = (b13.to(META), b2.to(META))
    with recording() as launches:
        if alignment.kernel_unsupported(tokens * k, e) is None:
            plan = alignment._align_experts_triton(ids, e, config.block_m, config.align)
        else:
            plan = alignment.align_experts_torch(ids, e, config.block_m, config.align)
        fused_moe._fused_moe_triton(
            hidden, _weights(weights, (e, 2 * i, h), dtype), _weights(weights, (e, h, i), dtype),
            ids, torch.empty((tokens, k), device=META), torch.empty(e, dtype=torch.int32, device=META),
            dims, config, deterministic=deterministic, plan=plan, bias=bias,
            activation=Activation("swiglu_oai", alpha=1.702, limit=7.0) if biased else SWIGLU,
        )  # fmt: skip
    return launches


def routing_launches(tokens: int, mode: int) -> list[Launch]:
    logits = torch.empty((tokens, SHAPE.num_experts), dtype=torch.bfloat16, device=META)
    with recording() as launches:
        routing._route_topk_triton(logits, SHAPE.top_k, True, mode=mode)
    return launches


def align_launches(tokens: int, num_experts: int, method: str) -> list[Launch]:
    ids = torch.empty((tokens, SHAPE.top_k), dtype=torch.int64, device=META)
    with recording() as launches:
        alignment._align_experts_triton(ids, num_experts, 16, method)
    return launches


def cases() -> Iterator[tuple[str, str, Launch]]:
    """(target, case, launch) for every compile; a case is ``phase/activation type/weights``
    for the layers. On both targets: the three weight formats at
    both configs (the decode layer includes the sorted alignment); the deterministic combine
    with biases and GPT-OSS's activation at decode; routing in both modes; the direct alignment
    (one token) and the sorted one at the kernel's sizes (1020 pairs, 512 experts). On sm_90
    only: fp16 and fp32 activations at decode (the fp32 dot runs in IEEE precision)."""
    for target in TARGETS:
        for phase, tokens in TOKENS.items():
            for weights in ("dense", "int4g128", "int8g128"):
                for launch in layer_launches(tokens, weights):
                    yield target, f"{phase}/bf16/{weights}", launch
        for launch in layer_launches(TOKENS["decode"], "dense", deterministic=True, biased=True):
            yield target, "decode/bf16/dense/deterministic-biased-oai", launch
        for mode in (0, 1):
            for launch in routing_launches(TOKENS["decode"], mode):
                yield target, f"decode/mode{mode}", launch
        for launch in align_launches(1, SHAPE.num_experts, "direct"):
            yield target, "decode/direct", launch
        for launch in align_launches(1020 // SHAPE.top_k, 512, "sorted"):
            yield target, "decode/sorted-P1020-E512", launch
    for dtype, weights in ((torch.float16, "int4g128"), (torch.float32, "int8g128")):
        for launch in layer_launches(TOKENS["decode"], weights, dtype):
            yield "sm_90", f"decode/{IR_TYPES[dtype]}/{weights}", launch


def compile_launch(launch: Launch, capability: int):
    """Compile ``launch`` as ``JITFunction.run`` would on a GPU of ``capability``."""
    target = GPUTarget("cuda", capability, 32)
    backend = make_backend(target)
    fn = launch.fn
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = dict(launch.kwargs, debug=False)
    bound, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(
        backend, kwargs, bound, specialization, options
    )
    return triton.compile(
        ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__
    )


def resource_usage(cubin: bytes) -> dict[str, int]:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run(
            [os.path.join(BIN, "cuobjdump"), "-res-usage", f.name],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
    return {k.lower(): int(v) for k, v in re.findall(r"\b(REG|STACK|LOCAL):(\d+)", out)}


def report(target: str, case: str, launch: Launch) -> dict:
    start = time.perf_counter()
    kernel = compile_launch(launch, TARGETS[target])
    seconds = time.perf_counter() - start
    usage = resource_usage(kernel.asm["cubin"])
    ptx = kernel.asm["ptx"]
    dots = re.findall(
        r"tt\.dot .*: tensor<[\dx]+x(\w+)> \* tensor<[\dx]+x(\w+)> ->", kernel.asm["ttir"]
    )
    return dict(
        kernel=launch.fn.__name__,
        target=target,
        case=case,
        registers=usage["reg"],
        stack=usage["stack"] + usage["local"],
        byte_loads=len(re.findall(r"ld\.global[.\w]*\.[usb]8\b", ptx)),
        async_copies=ptx.count("cp.async.cg") + ptx.count("cp.async.ca"),
        vector_loads=len(re.findall(r"ld\.global[.\w]*\.v[248]\.", ptx)),
        dot_operands=sorted({t for pair in dots for t in pair}),
        seconds=round(seconds, 2),
    )


def main() -> None:
    for target, case, launch in cases():
        print(json.dumps(report(target, case, launch)), flush=True)


if __name__ == "__main__":
    sys.exit(main())
