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

  - ``"sigmoid_topk"`` (DeepSeek-V3): ``s = sigmoid(logits[t])``; the choice is the top k of
    ``s + bias`` (a learned per-expert correction, ``bias``), the weights are ``s`` of the chosen,
    divided by their sum (+1e-20) when ``renormalize``.

  - ``"sparsemixer"`` (PhiMoE, at inference): each of the k picks is the best remaining logit;
    its weight is its softmax over the logits within ``2 * jitter_eps`` of it (relative to the
    larger of the two magnitudes), the earlier picks excluded.

Every function takes two DeepSeek options: ``n_group`` / ``topk_group`` (group-limited choice:
the experts form ``n_group`` equal groups, each scored by its best expert (softmax modes) or by
the sum of its best two ``s + bias`` (sigmoid), and only the ``topk_group`` best groups may be
chosen) and ``scale`` (every weight times the routed scaling factor). With any of them, or a
bias, the torch reference serves every device (the Triton kernel has the plain top-k only).

ids are int32. Weights are float32, or float64 for float64 logits on the torch path (speq's exact
tests run float64 models); the Triton kernel takes float16, bfloat16 and float32 logits.

The routing functions are one registry, `ROUTING_FUNCTIONS`: name → torch reference, Triton
entry, cost. Everything else reads it: `MoEConfig.router_mode` is validated against it, capture
writes the name into each ROUTER node, the verifier checks the name against it (it is given the
table by the frontend and the pass pipeline), the runtime's ROUTER and next-layer PREFETCH
implementations call `route_topk`, and the cost model prices a ROUTER node from its entry.
Adding a routing function (DeepSeek-V3's sigmoid with a correction bias, say) touches:

1. this module: a reference function and a `RoutingFunction` entry in `ROUTING_FUNCTIONS`;
2. ``_routing_kernels.py``: its Triton code, if it has a kernel (without one, ``triton=None``,
   the torch reference serves every device);
3. a test case in ``tests/kernel_tests/test_routing.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

import torch

from speq.kernels._triton import TRITON_DTYPES, Backend, cdiv, next_power_of_2, select_backend

__all__ = [
    "NO_LIMITS",
    "ROUTING_FUNCTIONS",
    "ROUTING_MODES",
    "Limits",
    "RoutingFunction",
    "expected_distinct_experts",
    "route_topk",
    "route_topk_torch",
    "routing_function",
]

MAX_TRITON_EXPERTS = 4096

Route = Callable[..., tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class Limits:
    """What a routing function takes beyond (logits, k, renormalize): DeepSeek's group-limited
    choice (``n_group`` groups, the best ``topk_group`` of them allowed), routed scaling factor
    (``scale``) and choice-only correction ``bias [E]`` (sigmoid_topk)."""

    scale: float = 1.0
    n_group: int = 1
    topk_group: int = 1
    bias: torch.Tensor | None = None
    jitter_eps: float = 0.0  # sparsemixer's: logits this close (relatively) to the best compete

    @property
    def plain(self) -> bool:
        """No groups, no scaling, no bias: what the Triton kernel computes."""
        return self.scale == 1.0 and self.n_group == 1 and self.bias is None and not self.jitter_eps


NO_LIMITS = Limits()  # plain top-k


@dataclass(frozen=True)
class RoutingFunction:
    """One way to turn router logits [T, E] into (expert ids [T, k], routing weights [T, k]).

    ``torch(logits, k, renormalize, limits)``: the reference (ids int32, weights in
    ``promote(dtype, fp32)``), the CPU path; ``triton(logits, k, renormalize)``: the kernel's
    entry for plain `Limits`, or None when the reference serves every device;
    ``flops_per_logit``: what the cost model charges per logit; ``bias``: whether the function
    takes a learned per-expert bias (a ``router_bias`` weight of each MoE layer)."""

    name: str
    torch: Route
    triton: Route | None
    flops_per_logit: float
    bias: bool = False


def _select(x: torch.Tensor, k: int) -> torch.Tensor:
    """The top-k experts of each row of ``x`` (NaN as -inf), ties to the lowest id: a stable
    descending sort keeps equal logits in ascending id order."""
    return torch.sort(x, dim=-1, descending=True, stable=True).indices[:, :k]


def _limit_groups(choice: torch.Tensor, group_scores: torch.Tensor, lim: Limits) -> torch.Tensor:
    """``choice`` with the experts outside each row's ``topk_group`` best groups at -inf."""
    t, e = choice.shape
    keep = _select(group_scores, lim.topk_group)
    allowed = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
    allowed = allowed[:, :, None].expand(t, lim.n_group, e // lim.n_group).reshape(t, e)
    return choice.masked_fill(~allowed, float("-inf"))


def _softmax_groups(x: torch.Tensor, lim: Limits) -> torch.Tensor:
    if lim.n_group == 1:
        return x
    return _limit_groups(x, x.view(x.shape[0], lim.n_group, -1).amax(-1), lim)


def _softmax_topk(x: torch.Tensor, k: int, renormalize: bool, lim: Limits):
    order = _select(_softmax_groups(x, lim), k)
    weights = torch.softmax(x, dim=-1).gather(1, order)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return order, weights


def _topk_softmax(x: torch.Tensor, k: int, renormalize: bool, lim: Limits):
    order = _select(_softmax_groups(x, lim), k)
    return order, torch.softmax(x.gather(1, order), dim=-1)


def _sigmoid_topk(x: torch.Tensor, k: int, renormalize: bool, lim: Limits):
    scores = torch.sigmoid(x)
    choice = scores if lim.bias is None else scores + lim.bias.to(scores.dtype)
    if lim.n_group > 1:
        grouped = choice.view(x.shape[0], lim.n_group, -1)
        best = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(-1)
        choice = _limit_groups(choice, best, lim)
    order = _select(choice, k)
    weights = scores.gather(1, order)
    if renormalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return order, weights


def _sparsemixer(x: torch.Tensor, k: int, renormalize: bool, lim: Limits):
    """PhiMoE's routing at inference, two experts: each pick is the best remaining logit, and
    its weight its softmax among the logits within ``2 * jitter_eps`` of it (relatively)."""
    order, weights, masked = [], [], x
    for _ in range(k):
        best, pick = masked.max(dim=-1, keepdim=True)
        factor = x.abs().clamp(min=best)
        far = (best - x) / factor > 2 * lim.jitter_eps
        gates = torch.softmax(masked.masked_fill(far, float("-inf")), dim=-1)
        order.append(pick)
        weights.append(gates.gather(1, pick))
        masked = masked.scatter(1, pick, float("-inf"))
    return torch.cat(order, 1), torch.cat(weights, 1)


def _reference(fn) -> Route:
    def route(logits: torch.Tensor, k: int, renormalize: bool, lim: Limits = NO_LIMITS):
        x = logits.to(torch.promote_types(logits.dtype, torch.float32))
        x = torch.where(torch.isnan(x), torch.full_like(x, float("-inf")), x)
        order, weights = fn(x, k, renormalize, lim)
        if lim.scale != 1.0:
            weights = weights * lim.scale
        return order.to(torch.int32), weights

    return route


# MODE of the Triton routing kernel (_routing_kernels.SOFTMAX_TOPK / TOPK_SOFTMAX)
_SOFTMAX_TOPK, _TOPK_SOFTMAX = 0, 1


def _triton(mode: int) -> Route:
    def route(logits: torch.Tensor, k: int, renormalize: bool):
        return _route_topk_triton(logits, k, renormalize, mode=mode)

    return route


ROUTING_FUNCTIONS: Mapping[str, RoutingFunction] = MappingProxyType(
    {
        f.name: f
        for f in (
            RoutingFunction("softmax_topk", _reference(_softmax_topk), _triton(_SOFTMAX_TOPK), 5.0),
            RoutingFunction("topk_softmax", _reference(_topk_softmax), _triton(_TOPK_SOFTMAX), 5.0),
            RoutingFunction("sigmoid_topk", _reference(_sigmoid_topk), None, 8.0, bias=True),
            RoutingFunction("sparsemixer", _reference(_sparsemixer), None, 12.0),
        )
    }
)
ROUTING_MODES: tuple[str, ...] = tuple(ROUTING_FUNCTIONS)  # the registry's names, in order


def routing_function(mode: str) -> RoutingFunction:
    """The registry entry of ``mode``, or a ValueError listing the routing functions."""
    try:
        return ROUTING_FUNCTIONS[mode]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown routing function {mode!r}: expected one of {ROUTING_MODES}"
        ) from None


def expected_distinct_experts(num_experts: float, top_k: int, tokens: float) -> float:
    """Expected number of distinct experts that ``tokens`` tokens touch when each picks ``top_k``
    distinct experts of ``num_experts`` uniformly at random: E * (1 - (1 - k/E) ** T) (all E
    when k >= E)."""
    return num_experts * (1.0 - (1.0 - min(top_k / num_experts, 1.0)) ** tokens)


def _check(router_logits: torch.Tensor, k: int, mode: str, lim: Limits) -> None:
    if router_logits.dim() != 2:
        raise ValueError(f"router_logits must be [T, E], got shape {tuple(router_logits.shape)}")
    if not router_logits.is_floating_point():
        raise ValueError(f"router_logits must be floating point, got {router_logits.dtype}")
    num_experts = router_logits.shape[1]
    if not 1 <= k <= num_experts:
        raise ValueError(f"k must be in [1, E={num_experts}], got {k}")
    if mode not in ROUTING_FUNCTIONS:
        raise ValueError(f"mode must be one of {ROUTING_MODES}, got {mode!r}")
    g = lim.n_group
    if g < 1 or num_experts % g or not 1 <= lim.topk_group <= g:
        raise ValueError(
            f"n_group = {g}, topk_group = {lim.topk_group}: expected n_group dividing E = "
            f"{num_experts} and 1 <= topk_group <= n_group"
        )
    if k > lim.topk_group * (num_experts // g):
        raise ValueError(f"k = {k} exceeds the experts of topk_group = {lim.topk_group} groups")
    if lim.bias is not None and tuple(lim.bias.shape) != (num_experts,):
        raise ValueError(f"bias must be [E={num_experts}], got {tuple(lim.bias.shape)}")


def route_topk_torch(
    router_logits: torch.Tensor,
    k: int,
    mode: str = "softmax_topk",
    renormalize: bool = True,
    limits: Limits = NO_LIMITS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference routing in torch (float32, or float64 for float64 logits); see the module doc."""
    _check(router_logits, k, mode, limits)
    return ROUTING_FUNCTIONS[mode].torch(router_logits, k, renormalize, limits)


def route_topk(
    router_logits: torch.Tensor,
    k: int,
    mode: str = "softmax_topk",
    renormalize: bool = True,
    limits: Limits = NO_LIMITS,
    *,
    backend: Backend = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Route each token to its top-k experts; returns ``(topk_ids int32, topk_weights)``.

    ``backend="auto"`` runs the Triton kernel on CUDA and the torch reference elsewhere;
    ``"triton"`` forces the kernel (CPU tensors need ``TRITON_INTERPRET=1``), ``"torch"`` the
    reference. `Limits` other than plain (groups, scaling, a bias) run the reference.
    """
    _check(router_logits, k, mode, limits)
    fn = ROUTING_FUNCTIONS[mode]
    kernel = fn.triton if limits.plain else None
    if kernel is None and backend == "triton":
        raise ValueError(
            f"route_topk: routing function {mode!r} with {limits} has no Triton kernel"
        )
    chosen = "torch"
    if kernel is not None:
        dtypes = (router_logits.dtype,)
        chosen = select_backend(backend, router_logits.device, dtypes, TRITON_DTYPES, "route_topk")
    if chosen == "torch":
        return fn.torch(router_logits, k, renormalize, limits)
    return kernel(router_logits, k, renormalize)


def _route_topk_triton(
    logits: torch.Tensor, k: int, renormalize: bool, *, mode: int
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
        MODE=mode,
        RENORMALIZE=renormalize,
        BLOCK_T=block_t,
        BLOCK_E=block_e,
        BLOCK_K=next_power_of_2(k),
        num_warps=4 if block_e * block_t >= 1024 else 1,
    )
    return ids, weights
