"""The numerical definitions every other path is checked against.

The eager model, the eager op implementations (speq.runtime.ops_eager) and the CPU runtime all
call these functions, so a speq result can be compared with the model's own forward pass. Shapes
use T for new tokens, H for the hidden size, E for experts, k for experts per token and S for
cached positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from speq.kernels.activation import SWIGLU, Activation
from speq.kernels.routing import NO_LIMITS, Limits, route_topk_torch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over groups of the last dimension the size of ``weight`` (the whole dimension, or
    each head of ``[..., heads * D]`` for a weight of D), computed in at least fp32."""
    shape, n = x.shape, weight.shape[-1]
    xf = x.to(torch.promote_types(x.dtype, torch.float32)).reshape(*shape[:-1], -1, n)
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (y * weight.to(y.dtype)).reshape(shape).to(x.dtype)


def layer_norm(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float
) -> torch.Tensor:
    """LayerNorm over the last dimension with an affine weight and bias."""
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


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


def rope_interleaved(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary embedding of interleaved pairs (DeepSeek's MLA): ``(x[2i], x[2i+1])`` of ``x [...,
    T, heads, D]`` rotated by frequency i at ``positions [T]``."""
    d = x.shape[-1]
    cdt = torch.promote_types(x.dtype, torch.float32)
    inv = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=cdt, device=x.device) / d))
    ang = positions.to(cdt)[:, None] * inv[None, :]  # [T, D/2]
    cos, sin = ang.cos()[:, None, :], ang.sin()[:, None, :]  # [T, 1, D/2]
    pairs = x.to(cdt).unflatten(-1, (d // 2, 2))
    x0, x1 = pairs[..., 0], pairs[..., 1]
    out = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1)
    return out.flatten(-2).to(x.dtype)


def mla_cache_entry(
    compressed: torch.Tensor,
    norm_weight: torch.Tensor,
    rank: int,
    eps: float,
    positions: torch.Tensor,
    theta: float,
) -> torch.Tensor:
    """What MLA caches for ``compressed [..., T, rank + R]`` (the KV down-projection's output):
    the RMS-normalised latent ``[..., :rank]`` and the rotated key ``[..., rank:]``."""
    latent = rms_norm(compressed[..., :rank], norm_weight, eps)
    k_rope = rope_interleaved(compressed[..., None, rank:], positions, theta)[..., 0, :]
    return torch.cat([latent, k_rope], -1)


def mla_attention(
    q: torch.Tensor,
    latent: torch.Tensor,
    k_rope: torch.Tensor,
    wkv_b: torch.Tensor,
    v_dim: int,
    positions: torch.Tensor,
    q_start: int | torch.Tensor,
    theta: float,
) -> torch.Tensor:
    """Multi-head Latent Attention (DeepSeek-V2/V3), as its reference computes it: ``q [B, T,
    heads, D]`` (a non-rotary part, then ``R`` rotary dims, rotated here at ``positions``)
    against the cached ``latent [B, S, r]`` and rotated ``k_rope [B, S, R]``; ``wkv_b [heads *
    (D - R + v_dim), r]`` expands each latent to every head's key (its non-rotary part; the
    rotary part is ``k_rope``, shared) and value. Returns ``[B, T, heads, v_dim]``."""
    b, _, heads, d = q.shape
    r_dim = k_rope.shape[-1]
    nope = d - r_dim
    q = torch.cat([q[..., :nope], rope_interleaved(q[..., nope:], positions, theta)], -1)
    kv = (latent @ wkv_b.t()).unflatten(-1, (heads, nope + v_dim))  # [B, S, heads, nope + v]
    s = kv.shape[1]
    k = torch.cat([kv[..., :nope], k_rope[:, :, None, :].expand(b, s, heads, r_dim)], -1)
    return attention(q, k, kv[..., nope:], q_start)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_start: int | torch.Tensor,
    sinks: torch.Tensor | None = None,
    window: int = 0,
) -> torch.Tensor:
    """Causal grouped-query attention.

    ``q [B, T, Hq, D]`` holds the queries of positions ``q_start .. q_start+T-1``; ``k, v
    [B, S, Hkv, D]`` hold keys and values of positions ``0 .. S-1`` (S >= q_start + T). Query i
    sees keys 0 .. q_start+i. ``q_start`` may be a 0-d tensor (then S is typically the whole
    cache: static shapes, as a captured CUDA graph needs). The scale is ``D ** -0.5``; ``v`` may
    have another head size ``Dv`` (MLA). ``window`` > 0: query i sees only the last ``window``
    keys up to its own position; ``sinks [Hq]``: a logit per head that joins the softmax's
    normaliser and takes no value. Returns ``[B, T, Hq, Dv]``.
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
    hidden = kpos > qpos
    if window:
        hidden = hidden | (kpos <= qpos - window)
    scores = scores.masked_fill(hidden, float("-inf"))
    if sinks is None:
        probs = torch.softmax(scores, dim=-1)
    else:
        sink = sinks.to(cdt)[None, :, None, None].expand(*scores.shape[:-1], 1)
        probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
    out = probs @ vh
    return out.transpose(1, 2).to(q.dtype)


def route(
    logits: torch.Tensor,
    k: int,
    mode: str = "softmax_topk",
    renormalize: bool = True,
    limits: Limits = NO_LIMITS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits ``[T, E]`` to ``(ids int64 [T, k], weights [T, k])``: the routing kernel's
    torch reference (ids in descending weight order, equal weights to the lower expert id,
    weights in ``promote(logits.dtype, fp32)``); ``limits``: groups, scaling, bias."""
    ids, weights = route_topk_torch(logits, k, mode, renormalize, limits)
    return ids.long(), weights


def limits_of(cfg, bias: torch.Tensor | None = None) -> Limits:
    """The routing `Limits` of a `MoEConfig` (DeepSeek's and PhiMoE's options) and a layer's
    router bias."""
    return Limits(
        cfg.routed_scaling_factor, cfg.n_group, cfg.topk_group, bias, cfg.router_jitter_eps
    )


def swiglu(gate_up: torch.Tensor, activation: Activation = SWIGLU) -> torch.Tensor:
    """``[..., 2I]`` (gate then up) to ``silu(gate) * up  [..., I]`` (or another gated
    ``activation``, speq.kernels.activation)."""
    i = gate_up.shape[-1] // 2
    return activation(gate_up[..., :i], gate_up[..., i:])


def gather_pairs(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Token rows ``x [T, H]`` repeated per choice: row ``p = t*k + j`` of the result is ``x[t]``."""
    return x.repeat_interleave(ids.shape[1], dim=0)


def expert_gemm(
    xs: torch.Tensor, ids: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Grouped GEMM: row ``p = t*k + j`` of ``xs [T*k, K]`` times ``w[ids[t, j]]^T`` (plus
    ``bias[ids[t, j]]`` when given, ``bias [E, N]``).

    ``w [E, N, K]`` stacks the experts' weights; the result is ``[T*k, N]``. One matmul per expert
    that has rows, in ascending expert order.
    """
    flat = ids.reshape(-1)
    out = xs.new_empty(xs.shape[0], w.shape[1])
    for e in torch.unique(flat).tolist():
        rows = (flat == e).nonzero(as_tuple=True)[0]
        out[rows] = linear(xs[rows], w[e], None if bias is None else bias[e])
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
    limits: Limits = NO_LIMITS,
    experts: ExpertExtras | None = None,
) -> torch.Tensor:
    """A routed-expert block on ``x [T, H]``: route, gather, gate/up GEMM, SwiGLU, down, combine
    (``experts``: GPT-OSS's router and expert biases and activation)."""
    e = experts or ExpertExtras()
    ids, weights = route(linear(x, router_weight, e.router_bias), k, mode, renormalize, limits)
    h = swiglu(expert_gemm(gather_pairs(x, ids), ids, w13, e.b13), e.activation)
    return scatter_pairs(expert_gemm(h, ids, w2, e.b2), weights)


@dataclass(frozen=True)
class ExpertExtras:
    """What GPT-OSS adds to a routed-expert block: a bias on the router's logits, a bias per
    expert on its gate/up (``b13 [E, 2I]``) and down (``b2 [E, H]``) products, its activation."""

    router_bias: torch.Tensor | None = None
    b13: torch.Tensor | None = None
    b2: torch.Tensor | None = None
    activation: Activation = SWIGLU
