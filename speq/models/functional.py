"""The numerical definitions every other path is checked against.

The eager model, the eager op implementations (speq.runtime.ops_eager) and the CPU runtime all
call these functions, so a speq result can be compared with the model's own forward pass. Shapes
use T for new tokens, H for the hidden size, E for experts, k for experts per token and S for
cached positions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from speq.kernels.routing import route_topk_torch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over groups of the last dimension the size of ``weight`` (the whole dimension, or
    each head of ``[..., heads * D]`` for a weight of D), computed in at least fp32."""
    shape, n = x.shape, weight.shape[-1]
    xf = x.to(torch.promote_types(x.dtype, torch.float32)).reshape(*shape[:-1], -1, n)
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (y * weight.to(y.dtype)).reshape(shape).to(x.dtype)


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ w^T (+ b)``."""
    y = x @ w.t()
    return y if b is None else y + b


def sigmoid_mul(gate: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``sigmoid(gate) * x``: a learned gate (``gate [..., 1]``) scaling ``x [..., H]``."""
    return torch.sigmoid(gate) * x


def rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary embedding (rotate-half form) of ``x [..., T, heads, D]`` at ``positions [T]``."""
    d = x.shape[-1]
    cdt = torch.promote_types(x.dtype, torch.float32)
    inv = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=cdt, device=x.device) / d))
    ang = positions.to(cdt)[:, None] * inv[None, :]  # [T, D/2]
    cos = torch.cat([ang.cos(), ang.cos()], -1)[:, None, :]  # [T, 1, D]
    sin = torch.cat([ang.sin(), ang.sin()], -1)[:, None, :]
    xf = x.to(cdt)
    x1, x2 = xf[..., : d // 2], xf[..., d // 2 :]
    rotated = torch.cat([-x2, x1], -1)
    return (xf * cos + rotated * sin).to(x.dtype)


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_start: int | torch.Tensor
) -> torch.Tensor:
    """Causal grouped-query attention.

    ``q [B, T, Hq, D]`` holds the queries of positions ``q_start .. q_start+T-1``; ``k, v
    [B, S, Hkv, D]`` hold keys and values of positions ``0 .. S-1`` (S >= q_start + T). Query i
    sees keys 0 .. q_start+i. ``q_start`` may be a 0-d tensor (then S is typically the whole
    cache: static shapes, as a captured CUDA graph needs). Returns ``[B, T, Hq, D]``.
    """
    _, t, hq, d = q.shape
    s, hkv = k.shape[1], k.shape[2]
    group = hq // hkv
    cdt = torch.promote_types(q.dtype, torch.float32)
    qh = q.transpose(1, 2).to(cdt)  # [B, Hq, T, D]
    kh = k.transpose(1, 2).to(cdt).repeat_interleave(group, dim=1)  # [B, Hq, S, D]
    vh = v.transpose(1, 2).to(cdt).repeat_interleave(group, dim=1)
    scores = (qh @ kh.transpose(-1, -2)) * (d**-0.5)
    qpos = (q_start + torch.arange(t, device=q.device))[:, None]
    kpos = torch.arange(s, device=q.device)[None, :]
    scores = scores.masked_fill(kpos > qpos, float("-inf"))
    out = torch.softmax(scores, dim=-1) @ vh
    return out.transpose(1, 2).to(q.dtype)


def route(
    logits: torch.Tensor, k: int, mode: str = "softmax_topk", renormalize: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits ``[T, E]`` to ``(ids int64 [T, k], weights [T, k])``: the routing kernel's
    torch reference (ids in descending weight order, equal weights to the lower expert id,
    weights in ``promote(logits.dtype, fp32)``)."""
    ids, weights = route_topk_torch(logits, k, mode, renormalize)
    return ids.long(), weights


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """``[..., 2I]`` (gate then up) to ``silu(gate) * up  [..., I]``."""
    i = gate_up.shape[-1] // 2
    return F.silu(gate_up[..., :i]) * gate_up[..., i:]


def gather_pairs(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Token rows ``x [T, H]`` repeated per choice: row ``p = t*k + j`` of the result is ``x[t]``."""
    return x.repeat_interleave(ids.shape[1], dim=0)


def expert_gemm(xs: torch.Tensor, ids: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Grouped GEMM: row ``p = t*k + j`` of ``xs [T*k, K]`` times ``w[ids[t, j]]^T``.

    ``w [E, N, K]`` stacks the experts' weights; the result is ``[T*k, N]``. One matmul per expert
    that has rows, in ascending expert order.
    """
    flat = ids.reshape(-1)
    out = xs.new_empty(xs.shape[0], w.shape[1])
    for e in torch.unique(flat).tolist():
        rows = (flat == e).nonzero(as_tuple=True)[0]
        out[rows] = xs[rows] @ w[e].t()
    return out


def scatter_pairs(ys: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted combine: ``out[t] = sum_j weights[t, j] * ys[t*k + j]``, in the weights' dtype."""
    t, k = weights.shape
    y = ys.reshape(t, k, -1).to(weights.dtype)
    return (y * weights[..., None]).sum(1).to(ys.dtype)


def moe(
    x: torch.Tensor,
    router_weight: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    k: int,
    mode: str,
    renormalize: bool,
) -> torch.Tensor:
    """A routed-expert block on ``x [T, H]``: route, gather, gate/up GEMM, SwiGLU, down, combine."""
    ids, weights = route(x @ router_weight.t(), k, mode, renormalize)
    h = swiglu(expert_gemm(gather_pairs(x, ids), ids, w13))
    return scatter_pairs(expert_gemm(h, ids, w2), weights)
