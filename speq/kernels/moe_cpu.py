"""The fused MoE layer's CPU paths (speq.kernels.fused_moe's ``torch`` backend): one expert on its
tokens (`expert_ffn`, which host compute also runs), and the grouped path over a layer's experts
(`fused_moe_grouped`): dense weights, INT4/INT8 `QuantizedExperts` dequantized one slot at a
time, or `CpuInt4Experts` through torch's CPU INT4 matmul; `grouped_by_source` is that path with
each expert's weights in a pool of its own choosing (the shared draft: full precision or INT4)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from speq.kernels.activation import SWIGLU, Activation
from speq.kernels.quant import CpuInt4Experts, QuantizedExperts

if TYPE_CHECKING:
    from speq.kernels.fused_moe import MoEDims, Weights


def expert_ffn(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    b13: torch.Tensor | None = None,
    b2: torch.Tensor | None = None,
    activation: Activation = SWIGLU,
) -> torch.Tensor:
    """One expert on its tokens, in x's dtype: ``activation(x Wg^T + bg, x Wu^T + bu) W2^T + b2``
    with ``w13 [2I, H]`` (gate rows, then up rows), ``w2 [H, I]`` and the expert's own biases
    (``b13 [2I]``, ``b2 [H]``) or None. The grouped CPU path computes each expert with it, and
    so does host compute (speq.runtime.host): the same math wherever an expert runs."""
    i = w13.shape[0] // 2
    linear = torch.nn.functional.linear
    # Separate gate and up products measured faster on the CPU than one [2I, H] product.
    gate, up = linear(x, w13[:i]), linear(x, w13[i:])
    if b13 is not None:
        gate, up = gate + b13[:i], up + b13[i:]
    return linear(activation(gate, up), w2, b2)


def fused_moe_grouped(
    hidden: torch.Tensor,
    w13: Weights,
    w2: Weights,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    slot_of_expert: torch.Tensor,
    dims: MoEDims,
    bias: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None),
    activation: Activation = SWIGLU,
) -> torch.Tensor:
    """CPU path: sort the pairs by expert once, then per expert with tokens its gate, up and
    down matmuls in x's dtype, combined with ``index_add_`` in fp32 (float64)."""
    slots = slot_of_expert.tolist()
    return grouped_by_source(
        hidden, topk_ids, topk_weights, lambda e: (w13, w2, slots[e]), dims, bias, activation
    )


def grouped_by_source(
    hidden: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    source: Callable[[int], tuple[Weights, Weights, int]],
    dims: MoEDims,
    bias: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None),
    activation: Activation = SWIGLU,
) -> torch.Tensor:
    """`fused_moe_grouped` with each expert's weights where ``source(e)`` says: ``(w13, w2,
    slot)``, pools that may differ between experts (a draft reading some experts at full
    precision and the rest in INT4: one pass over the pairs, not one per pool)."""
    b13, b2 = bias
    acc_dtype = torch.promote_types(hidden.dtype, torch.float32)
    out = torch.zeros((dims.num_tokens, dims.hidden), dtype=acc_dtype, device=hidden.device)
    flat = topk_ids.reshape(-1).to(torch.int64)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=dims.num_experts).tolist()
    tokens = order // dims.top_k
    route_w = topk_weights.reshape(-1)[order].to(acc_dtype)
    start = 0
    for e, count in enumerate(counts):
        if count == 0:
            continue
        rows = tokens[start : start + count]
        w13, w2, s = source(e)
        biases = (None if b13 is None else b13[e], None if b2 is None else b2[e])
        if isinstance(w13, CpuInt4Experts) or isinstance(w2, CpuInt4Experts):
            y = _int4_expert(hidden[rows], w13, w2, s, *biases, activation)
        else:
            w13_s = _dense_slot(w13, s, hidden.dtype)
            y = expert_ffn(
                hidden[rows], w13_s, _dense_slot(w2, s, hidden.dtype), *biases, activation
            )
        out.index_add_(0, rows, y.to(acc_dtype) * route_w[start : start + count, None])
        start += count
    return out.to(hidden.dtype)


def _dense_slot(w: Weights, s: int, dtype: torch.dtype) -> torch.Tensor:
    """Slot ``s`` of ``w`` as a dense tensor (a quantized one dequantized to ``dtype``)."""
    return w.select(s).dequantize(dtype) if isinstance(w, QuantizedExperts) else w[s]


def _product(x: torch.Tensor, w: Weights, s: int) -> torch.Tensor:
    """``x @ w[s]^T``: CPU INT4 weights by their own kernel, others dense."""
    if isinstance(w, CpuInt4Experts):
        return w.matmul(x, s)
    return torch.nn.functional.linear(x, _dense_slot(w, s, x.dtype))


def _int4_expert(x, w13, w2, s, b13, b2, activation) -> torch.Tensor:
    """`expert_ffn` on CPU INT4 weights (`CpuInt4Experts`): one gate/up product, split."""
    i = w13.shape[1] // 2
    gate_up = _product(x, w13, s)
    gate, up = gate_up[:, :i], gate_up[:, i:]
    if b13 is not None:
        gate, up = gate + b13[:i], up + b13[i:]
    y = _product(activation(gate, up), w2, s)
    return y if b2 is None else y + b2
