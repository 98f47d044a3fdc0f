"""Shared test data: devices, the dtype tolerance table, the support matrix, input builders."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from speq.kernels import KernelConfig, QuantizedExperts, quantize_experts
from speq.kernels._triton import HAS_TRITON, interpreter_active

CUDA = torch.cuda.is_available()
# The Triton path runs compiled on CUDA when there is one, else in the interpreter on the CPU.
TRITON_DEVICE = torch.device("cuda" if CUDA else "cpu")

# (atol, rtol) of a result against the fp32 (fp64) reference, by the dtype of the activations.
TOLERANCE: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-4, 1e-4),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (4e-2, 4e-2),
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    atol, rtol = TOLERANCE[dtype]
    torch.testing.assert_close(actual.double().cpu(), expected.double().cpu(), atol=atol, rtol=rtol)


def triton_unsupported(dtype: torch.dtype) -> str | None:
    """Why the Triton path cannot run ``dtype`` here, or None. The support matrix as data."""
    if not HAS_TRITON:
        return "Triton is not installed"
    if not CUDA and not interpreter_active():
        return "no CUDA and TRITON_INTERPRET is not set"
    if dtype == torch.float64:
        return "the Triton kernels take fp16/bf16/fp32; float64 is served by the torch path"
    return None


@dataclass(frozen=True)
class MoECase:
    """One fused-MoE problem. ``routing``: "random" (softmax top-k of random logits),
    "skip:<e>" (expert e gets no token), "one" (every token's first choice is expert E-1, k=1
    puts all tokens on it). ``pool``: extra slots beyond E; ``permute``: slots not the identity.
    ``quant``: (bits for w13, bits for w2, group size), 0 bits = dense."""

    name: str
    T: int
    H: int
    I: int  # noqa: E741 - H, I, E, k as in the paper
    E: int
    k: int
    dtype: torch.dtype = torch.float32
    routing: str = "random"
    pool: int = 0
    permute: bool = False
    config: KernelConfig | None = None
    deterministic: bool = False
    quant: tuple[int, int, int] = (0, 0, 0)
    seed: int = field(default=0)

    def __str__(self) -> str:
        return self.name


def supports(case: MoECase, backend: str) -> str | None:
    """Why ``case`` cannot run on ``backend`` ("triton" | "torch"), or None."""
    if backend == "torch":
        return None
    return triton_unsupported(case.dtype)


def make_topk(case: MoECase, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    logits = torch.randn(case.T, case.E, generator=gen)
    if case.routing.startswith("skip:"):
        logits[:, int(case.routing.split(":")[1])] = -math.inf
    elif case.routing == "one":
        logits[:, case.E - 1] = 100.0
    probs = torch.softmax(logits, dim=-1)
    weights, ids = torch.topk(probs, case.k, dim=-1)
    weights = weights / weights.sum(-1, keepdim=True)
    return ids.to(torch.int32), weights.to(torch.float32)


def make_inputs(case: MoECase, device: torch.device) -> dict[str, object]:
    """Inputs of ``fused_moe`` for ``case`` on ``device`` (weights possibly quantized)."""
    gen = torch.Generator().manual_seed(case.seed)
    slots_total = case.E + case.pool
    x = torch.randn(case.T, case.H, generator=gen)
    w13 = torch.randn(slots_total, 2 * case.I, case.H, generator=gen) / math.sqrt(case.H)
    w2 = torch.randn(slots_total, case.H, case.I, generator=gen) / math.sqrt(case.I)
    ids, weights = make_topk(case, gen)
    if case.permute:
        slots = torch.randperm(slots_total, generator=gen)[: case.E].to(torch.int32)
    else:
        slots = torch.arange(case.E, dtype=torch.int32)
    w13, w2 = w13.to(case.dtype), w2.to(case.dtype)
    bits13, bits2, group = case.quant
    q13: torch.Tensor | QuantizedExperts = quantize_experts(w13, bits13, group) if bits13 else w13
    q2: torch.Tensor | QuantizedExperts = quantize_experts(w2, bits2, group) if bits2 else w2
    return dict(
        hidden=x.to(case.dtype).to(device),
        w13=q13.to(device),
        w2=q2.to(device),
        topk_ids=ids.to(device),
        topk_weights=weights.to(device),
        slot_of_expert=slots.to(device),
    )


def params(cases: list, backend: str, unsupported=supports) -> list:
    """pytest params for ``cases`` with the support matrix applied as skip marks."""
    import pytest

    out = []
    for case in cases:
        reason = unsupported(case, backend)
        marks = [pytest.mark.skip(reason=reason)] if reason else []
        out.append(pytest.param(case, id=str(case), marks=marks))
    return out
