"""The fused MoE layer: routed experts with a gated activation and the weighted combine.

For T tokens with hidden size H, top-k routing over E experts whose weights sit in a pool of S
slots (expert e in slot ``slot_of_expert[e]``), with ``w13[s]`` = [gate rows 0..I-1; up rows
I..2I-1] of shape [2I, H] and ``w2[s]`` of shape [H, I]::

    out[t] = sum_j topk_weights[t, j] * (silu(x[t] Wg^T) * (x[t] Wu^T)) W2^T,
             with s = slot_of_expert[topk_ids[t, j]], Wg = w13[s, :I], Wu = w13[s, I:], W2 = w2[s]

Three implementations, selected by ``backend`` (see :func:`fused_moe`):

* the Triton kernels (``_fused_moe_kernels.py``): an :class:`~speq.kernels.alignment.ExpertPlan`,
  kernel A (gather, gate/up GEMM, SwiGLU epilogue, intermediate ``h [T*k, I]`` in x's dtype) and
  kernel B (down GEMM, routing weight in fp32, combine). The combine adds into an fp32 buffer
  with atomics (fast; summation order varies run to run) or, with ``deterministic=True``, writes
  one fp32 row per pair and sums the k rows of each token in a fixed order;
* a grouped torch path for the CPU (one sort, then gate, up and down matmuls per expert hit,
  ``index_add_``; speq.kernels.moe_cpu), which also takes float64;
* the reference :func:`fused_moe_torch`: a plain loop over experts in fp32 (float64 for float64
  inputs), the simple, obviously correct version the others are tested against.

Either weight may be a :class:`~speq.kernels.quant.QuantizedExperts` (the draft model's INT4/INT8
weights), dequantized inside the kernel, or on the CPU a :class:`~speq.kernels.quant.CpuInt4Experts`
(the same INT4 codes in the layout of torch's CPU INT4 matmul, which the grouped torch path
multiplies by without dequantizing a whole weight; activations in bfloat16). Optional per-expert biases (``b13``, ``b2``, by expert id)
and another gated activation (speq.kernels.activation: GPT-OSS's clamped SwiGLU) apply to all
three.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from speq.kernels._triton import (
    TRITON_DTYPES,
    Backend,
    cdiv,
    interpreter_active,
    next_power_of_2,
    select_backend,
)
from speq.kernels.activation import SWIGLU, Activation
from speq.kernels.alignment import ExpertPlan, align_experts, kernel_unsupported
from speq.kernels.autotune import KernelConfig, get_config
from speq.kernels.moe_cpu import fused_moe_grouped
from speq.kernels.quant import CpuInt4Experts, QuantizedExperts

__all__ = ["MoEDims", "fused_moe", "fused_moe_torch"]

Weights = torch.Tensor | QuantizedExperts | CpuInt4Experts


@dataclass(frozen=True)
class MoEDims:
    """Sizes of one fused MoE call: T tokens, hidden H, intermediate I, E experts routed top-k,
    S weight slots in the pool."""

    num_tokens: int
    hidden: int
    intermediate: int
    num_experts: int
    top_k: int
    num_slots: int

    @property
    def num_pairs(self) -> int:
        return self.num_tokens * self.top_k


def _shape(w: Weights) -> tuple[int, ...]:
    return tuple(w.shape)


def _check_inputs(
    hidden: torch.Tensor,
    w13: Weights,
    w2: Weights,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    slot_of_expert: torch.Tensor | None,
) -> MoEDims:
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be [T, H], got shape {tuple(hidden.shape)}")
    if not hidden.is_floating_point():
        raise ValueError(f"hidden must be floating point, got {hidden.dtype}")
    num_tokens, h = hidden.shape
    s13, s2 = _shape(w13), _shape(w2)
    if len(s13) != 3 or s13[2] != h or s13[1] % 2:
        raise ValueError(f"w13 must be [S, 2I, H={h}], got shape {s13}")
    num_slots, i = s13[0], s13[1] // 2
    if s2 != (num_slots, h, i):
        raise ValueError(f"w2 must be [S={num_slots}, H={h}, I={i}] to match w13, got shape {s2}")
    for name, w in (("w13", w13), ("w2", w2)):
        if isinstance(w, torch.Tensor) and w.dtype != hidden.dtype:
            raise ValueError(f"{name} has dtype {w.dtype}, hidden has {hidden.dtype}")
        if w.device != hidden.device:
            raise ValueError(f"{name} is on {w.device}, hidden on {hidden.device}")
    if topk_ids.dim() != 2 or topk_ids.shape[0] != num_tokens:
        raise ValueError(f"topk_ids must be [T={num_tokens}, k], got shape {tuple(topk_ids.shape)}")
    if topk_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"topk_ids must be int32 or int64, got {topk_ids.dtype}")
    if tuple(topk_weights.shape) != tuple(topk_ids.shape):
        raise ValueError(
            f"topk_weights must match topk_ids {tuple(topk_ids.shape)}, "
            f"got {tuple(topk_weights.shape)}"
        )
    if not topk_weights.is_floating_point():
        raise ValueError(f"topk_weights must be floating point, got {topk_weights.dtype}")
    num_experts = num_slots if slot_of_expert is None else slot_of_expert.shape[0]
    if slot_of_expert is not None and (
        slot_of_expert.dim() != 1 or slot_of_expert.dtype not in (torch.int32, torch.int64)
    ):
        raise ValueError(
            f"slot_of_expert must be a 1-D int32/int64 tensor [E], got "
            f"{slot_of_expert.dtype} {tuple(slot_of_expert.shape)}"
        )
    for name, t in (("topk_ids", topk_ids), ("topk_weights", topk_weights)):
        if t.device != hidden.device:
            raise ValueError(f"{name} is on {t.device}, hidden on {hidden.device}")
    if slot_of_expert is not None and slot_of_expert.device != hidden.device:
        raise ValueError(f"slot_of_expert is on {slot_of_expert.device}, hidden on {hidden.device}")
    dims = MoEDims(num_tokens, h, i, num_experts, topk_ids.shape[1], num_slots)
    if hidden.device.type == "cpu":  # cheap here; on a GPU it would be a host sync
        _check_values(dims, topk_ids, slot_of_expert)
    return dims


def _check_values(dims: MoEDims, topk_ids: torch.Tensor, slots: torch.Tensor | None) -> None:
    if topk_ids.numel() and (topk_ids.min() < 0 or topk_ids.max() >= dims.num_experts):
        raise ValueError(f"topk_ids must lie in [0, E={dims.num_experts})")
    if slots is not None and topk_ids.numel():
        # only the slots of experts some pair routes to are read: an expert cache marks the
        # others absent with -1
        used = slots[topk_ids.reshape(-1).long()]
        if used.min() < 0 or used.max() >= dims.num_slots:
            raise ValueError(
                f"slot_of_expert of every routed expert must lie in [0, S={dims.num_slots})"
            )


def _identity_slots(dims: MoEDims, device: torch.device) -> torch.Tensor:
    return torch.arange(dims.num_experts, dtype=torch.int32, device=device)


def _dense(w: Weights, dtype: torch.dtype) -> torch.Tensor:
    return w.dequantize(dtype) if isinstance(w, QuantizedExperts) else w.to(dtype)


def fused_moe_torch(
    hidden: torch.Tensor,
    w13: Weights,
    w2: Weights,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    slot_of_expert: torch.Tensor | None = None,
    *,
    b13: torch.Tensor | None = None,
    b2: torch.Tensor | None = None,
    activation: Activation = SWIGLU,
) -> torch.Tensor:
    """Reference: loop over experts, fp32 math (float64 for float64 inputs); quantized weights
    are dequantized first. Returns ``[T, H]`` in hidden's dtype."""
    dims = _check_inputs(hidden, w13, w2, topk_ids, topk_weights, slot_of_expert)
    if slot_of_expert is None:
        slot_of_expert = _identity_slots(dims, hidden.device)
    compute = torch.promote_types(hidden.dtype, torch.float32)
    w13_c, w2_c = _dense(w13, compute), _dense(w2, compute)
    x = hidden.to(compute)
    out = torch.zeros((dims.num_tokens, dims.hidden), dtype=compute, device=hidden.device)
    i = dims.intermediate
    for e in range(dims.num_experts):
        token, choice = torch.where(topk_ids == e)
        if token.numel() == 0:
            continue
        s = int(slot_of_expert[e])
        gate = x[token] @ w13_c[s, :i].T
        up = x[token] @ w13_c[s, i:].T
        if b13 is not None:
            gate, up = gate + b13[e, :i].to(compute), up + b13[e, i:].to(compute)
        y = activation(gate, up) @ w2_c[s].T
        if b2 is not None:
            y = y + b2[e].to(compute)
        out.index_add_(0, token, topk_weights[token, choice].to(compute)[:, None] * y)
    return out.to(hidden.dtype)


def _weight_args(w: Weights) -> tuple[torch.Tensor, torch.Tensor, int, int, tuple[int, ...]]:
    """(data, scales, bits, group size, the 6 strides) for a launch; dense weights get a dummy
    scale pointer and bits 0."""
    if isinstance(w, QuantizedExperts):
        return w.data, w.scales, w.bits, w.group_size, (*w.data.stride(), *w.scales.stride())
    return w, w, 0, 1, (*w.stride(), 0, 0, 0)


def _dot_in_fp32(dtype: torch.dtype) -> bool:
    """Whether the kernels cast their bf16 tiles to fp32 before ``tl.dot``: only under the Triton
    interpreter, whose bf16 ``tl.dot`` multiplies raw bit patterns (triton#11584; see
    ``_fused_moe_kernels.py``). Compiled kernels always run the native bf16 dot."""
    return dtype == torch.bfloat16 and interpreter_active()


def _fused_moe_triton(
    hidden: torch.Tensor,
    w13: Weights,
    w2: Weights,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    slot_of_expert: torch.Tensor,
    dims: MoEDims,
    config: KernelConfig,
    *,
    deterministic: bool = False,
    plan: ExpertPlan | None = None,
    intermediate: torch.Tensor | None = None,
    accum: torch.Tensor | None = None,
    bias: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None),
    activation: Activation = SWIGLU,
) -> torch.Tensor:
    """Launch the kernels. Tests may pass the buffers: ``intermediate [>= T*k, >= I]`` (x's
    dtype) and ``accum``, fp32: ``[>= T, >= H]`` zeroed over ``[:T, :H]`` for the atomic combine,
    ``[>= T*k, >= H]`` for the deterministic one. Rows and columns past those ranges are never
    touched."""
    from speq.kernels import _fused_moe_kernels as kern

    device = hidden.device
    t, h, i, k = dims.num_tokens, dims.hidden, dims.intermediate, dims.top_k
    if plan is None:  # one launch where the alignment kernel takes the sizes
        fits = kernel_unsupported(dims.num_pairs, dims.num_experts) is None
        plan = align_experts(
            topk_ids, dims.num_experts, config.block_m, config.align,
            backend="triton" if fits else "torch",
        )  # fmt: skip
    if plan.block_m != config.block_m:
        raise ValueError(
            f"plan.block_m={plan.block_m} differs from config.block_m={config.block_m}"
        )
    slots = slot_of_expert.to(torch.int32)
    route_w = topk_weights.to(torch.float32)
    if intermediate is None:
        intermediate = torch.empty((dims.num_pairs, i), dtype=hidden.dtype, device=device)
    if dims.num_pairs == 0:
        return torch.zeros((t, h), dtype=hidden.dtype, device=device)
    # fp32 models get IEEE fp32 products (no TF32: they are the exact-comparison dtype, slower on
    # tensor cores); for bf16/fp16 inputs the setting is moot (products are exact, fp32 accumulate)
    dot_precision = "ieee" if hidden.dtype == torch.float32 else "tf32"
    dot_in_fp32 = _dot_in_fp32(hidden.dtype)
    meta = dict(
        BLOCK_M=config.block_m,
        BLOCK_N=config.block_n,
        BLOCK_K=config.block_k,
        GROUP_M=config.group_m,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )

    b13, b2 = (b if b is None else b.to(torch.float32) for b in bias)
    w, ws, bits, gsize, strides = _weight_args(w13)
    grid_a = (plan.max_blocks * cdiv(i, config.block_n),)
    kern._gate_up_kernel[grid_a](
        hidden, w, ws, intermediate,
        plan.sorted_pair_ids, plan.block_expert, plan.num_valid_blocks, slots,
        route_w if b13 is None else b13,
        dims.num_pairs, i, h, plan.max_blocks, activation.alpha, activation.limit,
        *hidden.stride(), *strides, *intermediate.stride(),
        *((0, 0) if b13 is None else b13.stride()),
        TOP_K=k, W_BITS=bits, GROUP_SIZE=gsize,
        SCALE_AFTER_DOT=bits > 0 and gsize % config.block_k == 0, EVEN_K=h % config.block_k == 0,
        DOT_PRECISION=dot_precision, DOT_IN_FP32=dot_in_fp32,
        HAS_BIAS=b13 is not None, ACTIVATION=activation.code, **meta,
    )  # fmt: skip

    split_k = 1 if deterministic else config.split_k
    k_per_split = cdiv(cdiv(i, split_k), config.block_k) * config.block_k
    direct_out = hidden.dtype == torch.float32 and accum is None and not deterministic
    if accum is None and deterministic:  # every (pair, column) is stored exactly once
        accum = torch.empty((dims.num_pairs, h), dtype=torch.float32, device=device)
    elif accum is None:
        accum = torch.zeros((t, h), dtype=torch.float32, device=device)
    w, ws, bits, gsize, strides = _weight_args(w2)
    grid_b = (plan.max_blocks * cdiv(h, config.block_n), cdiv(i, k_per_split))
    kern._down_kernel[grid_b](
        intermediate, w, ws, route_w, accum,
        plan.sorted_pair_ids, plan.block_expert, plan.num_valid_blocks, slots,
        route_w if b2 is None else b2,
        dims.num_pairs, h, i, plan.max_blocks, k_per_split,
        *intermediate.stride(), *strides, *route_w.stride(), *accum.stride(),
        *((0, 0) if b2 is None else b2.stride()),
        HAS_BIAS=b2 is not None,
        TOP_K=k, W_BITS=bits, GROUP_SIZE=gsize,
        SCALE_AFTER_DOT=bits > 0 and gsize % config.block_k == 0, EVEN_K=i % config.block_k == 0,
        DOT_PRECISION=dot_precision, DOT_IN_FP32=dot_in_fp32,
        COMBINE=(kern.COMBINE_STORE if deterministic else kern.COMBINE_ATOMIC).value, **meta,
    )  # fmt: skip

    if not deterministic:
        return accum if direct_out else accum[:t, :h].to(hidden.dtype)
    out = torch.empty((t, h), dtype=hidden.dtype, device=device)
    block_n = min(1024, next_power_of_2(h))
    kern._combine_kernel[(t, cdiv(h, block_n))](
        accum, out, h, *accum.stride(), *out.stride(), TOP_K=k, BLOCK_N=block_n
    )
    return out


def fused_moe(
    hidden: torch.Tensor,
    w13: Weights,
    w2: Weights,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    slot_of_expert: torch.Tensor | None = None,
    *,
    deterministic: bool = False,
    config: KernelConfig | None = None,
    backend: Backend = "auto",
    b13: torch.Tensor | None = None,
    b2: torch.Tensor | None = None,
    activation: Activation = SWIGLU,
) -> torch.Tensor:
    """Routed experts of one MoE layer (see the module docstring for the math).

    Args:
        hidden: ``x [T, H]``, float16 / bfloat16 / float32 (float64 on the torch backend).
        w13: ``[S, 2I, H]`` gate then up rows, hidden's dtype, or a QuantizedExperts of it.
        w2: ``[S, H, I]``, likewise.
        topk_ids: ``[T, k]`` int32 expert ids in ``[0, E)`` (checked on the CPU only: a check
            on a GPU would need a host sync).
        topk_weights: ``[T, k]`` routing weights, applied in fp32 (float64 on the torch path
            for float64 inputs).
        slot_of_expert: ``[E]`` int32, the pool slot holding each expert; None means the
            identity with E = S. Its contents may change between calls without changing the
            launch, so a captured graph stays valid as an expert cache changes.
        deterministic: combine the k choices of a token in a fixed order (bitwise reproducible;
            one extra fp32 ``[T*k, H]`` buffer and kernel) instead of with atomic adds.
        config: kernel tiles; default :func:`~speq.kernels.autotune.get_config` for this shape
            (tuned JSON for this device if present, else the analytic default).
        backend: ``"auto"`` (Triton on CUDA for supported dtypes, else torch), ``"triton"``
            (CPU tensors need ``TRITON_INTERPRET=1``) or ``"torch"`` (the grouped torch path).
        b13, b2: ``[E, 2I]`` / ``[E, H]`` biases of each expert's gate/up and down products,
            indexed by expert id (GPT-OSS), or None.
        activation: the gated activation (speq.kernels.activation; default silu(gate) * up).

    Returns:
        ``out [T, H]`` in hidden's dtype.
    """
    dims = _check_inputs(hidden, w13, w2, topk_ids, topk_weights, slot_of_expert)
    if slot_of_expert is None:
        slot_of_expert = _identity_slots(dims, hidden.device)
    chosen = select_backend(backend, hidden.device, (hidden.dtype,), TRITON_DTYPES, "fused_moe")
    bias = (b13, b2)
    if chosen != "torch" and any(isinstance(w, CpuInt4Experts) for w in (w13, w2)):
        raise ValueError("CpuInt4Experts run on the torch backend only (torch's CPU INT4 matmul)")
    if chosen == "torch":
        return fused_moe_grouped(
            hidden, w13, w2, topk_ids, topk_weights, slot_of_expert, dims, bias, activation
        )
    if config is None:
        quant = next((w for w in (w13, w2) if isinstance(w, QuantizedExperts)), None)
        config = get_config(
            dims.num_tokens,
            dims.num_experts,
            dims.top_k,
            dims.intermediate,
            dims.hidden,
            hidden.dtype,
            bits=quant.bits if quant else 0,
            group_size=quant.group_size if quant else None,
            device_name=torch.cuda.get_device_name(hidden.device)
            if hidden.device.type == "cuda"
            else None,
        )
    return _fused_moe_triton(
        hidden,
        w13,
        w2,
        topk_ids,
        topk_weights,
        slot_of_expert,
        dims,
        config,
        deterministic=deterministic,
        bias=bias,
        activation=activation,
    )
