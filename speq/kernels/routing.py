"""Top-k routing: router logits [T, E] -> (expert ids [T, k], routing weights [T, k]).

Contract, for token t and choice j (0 <= j < k):

* ``topk_ids[t, j]`` is the expert with the j-th largest logit of row t. Ties go to the lowest
  expert id first, so ``topk_ids[t]`` is ordered by descending weight and then ascending id.
  NaN logits count as -inf. Selection is on the logits: softmax is monotonic, so this is also
  the top-k of the probabilities.
* ``topk_weights[t, j]`` depends on ``mode``:

  - ``"softmax_topk"``: ``p = softmax(logits[t])`` over all E experts, then ``p[topk_ids[t, j]]``,
    divided by ``sum_j p[topk_ids[t, j]]`` when ``renormalize`` (Mixtral, Qwen-MoE with
    ``norm_topk_prob``; DeepSeek-V2 without it);
  - ``"topk_softmax"``: softmax over the k selected logits only (the weights always sum to 1;
    ``renormalize`` has no effect). Mathematically this equals softmax_topk with renormalize;
    the two differ in rounding only.

ids are int32. Weights are float32, or float64 for float64 logits on the torch path (speq's exact
tests run float64 models); the Triton kernel takes float16, bfloat16 and float32 logits.
"""

from __future__ import annotations

from typing import Literal

import torch

from speq.kernels._triton import Backend, cdiv, next_power_of_2, select_backend

__all__ = ["ROUTING_MODES", "RoutingMode", "route_topk", "route_topk_torch"]

RoutingMode = Literal["softmax_topk", "topk_softmax"]
ROUTING_MODES: tuple[str, ...] = ("softmax_topk", "topk_softmax")
TRITON_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32})
MAX_TRITON_EXPERTS = 4096


def _check(router_logits: torch.Tensor, k: int, mode: str) -> None:
    if router_logits.dim() != 2:
        raise ValueError(f"router_logits must be [T, E], got shape {tuple(router_logits.shape)}")
    if not router_logits.is_floating_point():
        raise ValueError(f"router_logits must be floating point, got {router_logits.dtype}")
    num_experts = router_logits.shape[1]
    if not 1 <= k <= num_experts:
        raise ValueError(f"k must be in [1, E={num_experts}], got {k}")
    if mode not in ROUTING_MODES:
        raise ValueError(f"mode must be one of {ROUTING_MODES}, got {mode!r}")


def route_topk_torch(
    router_logits: torch.Tensor,
    k: int,
    mode: RoutingMode = "softmax_topk",
    renormalize: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference routing in torch (float32, or float64 for float64 logits); see the module doc."""
    _check(router_logits, k, mode)
    compute = torch.promote_types(router_logits.dtype, torch.float32)
    x = router_logits.to(compute)
    x = torch.where(torch.isnan(x), torch.full_like(x, float("-inf")), x)
    # A stable descending sort keeps equal logits in ascending id order: the documented tie rule.
    order = torch.sort(x, dim=-1, descending=True, stable=True).indices[:, :k]
    if mode == "softmax_topk":
        weights = torch.softmax(x, dim=-1).gather(1, order)
        if renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
    else:
        weights = torch.softmax(x.gather(1, order), dim=-1)
    return order.to(torch.int32), weights


def route_topk(
    router_logits: torch.Tensor,
    k: int,
    mode: RoutingMode = "softmax_topk",
    renormalize: bool = True,
    *,
    backend: Backend = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Route each token to its top-k experts; returns ``(topk_ids int32, topk_weights)``.

    ``backend="auto"`` runs the Triton kernel on CUDA and the torch reference elsewhere;
    ``"triton"`` forces the kernel (CPU tensors need ``TRITON_INTERPRET=1``), ``"torch"`` the
    reference.
    """
    _check(router_logits, k, mode)
    chosen = select_backend(
        backend, router_logits.device, (router_logits.dtype,), TRITON_DTYPES, "route_topk"
    )
    if chosen == "torch":
        return route_topk_torch(router_logits, k, mode, renormalize)
    return _route_topk_triton(router_logits, k, mode, renormalize)


def _route_topk_triton(
    logits: torch.Tensor, k: int, mode: str, renormalize: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    from speq.kernels import _routing_kernels as kern

    num_tokens, num_experts = logits.shape
    if num_experts > MAX_TRITON_EXPERTS:
        raise ValueError(f"route_topk: the Triton kernel takes E <= {MAX_TRITON_EXPERTS}")
    ids = torch.empty((num_tokens, k), dtype=torch.int32, device=logits.device)
    weights = torch.empty((num_tokens, k), dtype=torch.float32, device=logits.device)
    if num_tokens == 0:
        return ids, weights
    block_e = next_power_of_2(num_experts)
    block_t = min(next_power_of_2(num_tokens), max(1, 4096 // block_e), 64)
    grid = (cdiv(num_tokens, block_t),)
    kern._route_topk_kernel[grid](
        logits,
        ids,
        weights,
        num_tokens,
        num_experts,
        logits.stride(0),
        logits.stride(1),
        ids.stride(0),
        ids.stride(1),
        weights.stride(0),
        weights.stride(1),
        TOP_K=k,
        MODE=(kern.SOFTMAX_TOPK if mode == "softmax_topk" else kern.TOPK_SOFTMAX).value,
        RENORMALIZE=renormalize,
        BLOCK_T=block_t,
        BLOCK_E=block_e,
        BLOCK_K=next_power_of_2(k),
        num_warps=4 if block_e * block_t >= 1024 else 1,
    )
    return ids, weights
