"""The eager implementations of the IR's ops: plain torch, one node at a time (the reference
every other path is checked against, and what runs an op that no other set implements).

``EAGER`` maps each op to its implementation; backends list it last in their `ImplTable`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from speq.ir.ops import Op
from speq.ir.run import Impl, ImplTable, implements
from speq.ir.schema import bind
from speq.kernels.activation import Activation
from speq.kernels.routing import Limits, route_topk
from speq.models import functional as fn

EAGER: dict[Op, Impl] = {}


def _eager(op: Op) -> Callable[[Impl], Impl]:
    return implements(EAGER, op)


@_eager(Op.PARAM)
def _param(node, args, ctx):
    return (ctx.params[node.attrs["name"]],)


@_eager(Op.EMBED)
def _embed(node, args, ctx):
    tokens, table = args
    return (table[tokens],)


@_eager(Op.RMSNORM)
def _rmsnorm(node, args, ctx):
    return (fn.rms_norm(args[0], args[1], node.attrs["eps"]),)


@_eager(Op.LAYERNORM)
def _layernorm(node, args, ctx):
    return (fn.layer_norm(*args, node.attrs["eps"]),)


@_eager(Op.LINEAR)
def _linear(node, args, ctx):
    return (fn.linear(*args),)


@_eager(Op.CLAMP)
def _clamp(node, args, ctx):
    limit = node.attrs["limit"]
    return (args[0].clamp(-limit, limit),)


@_eager(Op.SIGMOID_MUL)
def _sigmoid_mul(node, args, ctx):
    return (fn.sigmoid_mul(*args),)


# ROPE, KV_WRITE and ATTENTION take the start position ``pos`` as an int, or as a 0-d device
# tensor: then no shape depends on its value (the write is an index_copy_, attention reads the
# whole cache, masked), so a CUDA graph can capture them once and replay them at every position.


@_eager(Op.ROPE)
def _rope(node, args, ctx):
    x, pos = args
    t = x.shape[0]
    positions = pos + torch.arange(t, device=x.device)
    y = fn.rope(x.view(t, node.attrs["heads"], -1), positions, node.attrs["theta"])
    return (y.reshape(t, -1),)


@_eager(Op.KV_WRITE)
def _kv_write(node, args, ctx):
    k, v, pos = args
    t, kvh = k.shape[0], ctx.cache.k.shape[3]
    k, v, layer = k.view(1, t, kvh, -1), v.view(1, t, kvh, -1), node.attrs["layer"]
    if isinstance(pos, torch.Tensor):
        ctx.cache.write_at(layer, k, v, pos + torch.arange(t, device=k.device))
    else:
        ctx.cache.write(layer, k, v, pos)
    return (ctx.cache,)


@_eager(Op.ATTENTION)
def _attention(node, args, ctx):
    a = bind(node, args)
    q, pos, t = a["q"], a["pos"], a["q"].shape[0]
    end = a["kv"].max_len if isinstance(pos, torch.Tensor) else pos + t
    k, v = a["kv"].view(node.attrs["layer"], end)
    q = q.view(1, t, node.attrs["heads"], -1)
    o = fn.attention(q, k, v, pos, a["sinks"], node.attrs.get("window", 0))
    return (o.reshape(t, -1),)


@_eager(Op.MLA_KV_WRITE)
def _mla_kv_write(node, args, ctx):
    a, (compressed, norm, pos) = node.attrs, args
    t = compressed.shape[0]
    positions = pos + torch.arange(t, device=compressed.device)
    entry = fn.mla_cache_entry(compressed, norm, a["rank"], a["eps"], positions, a["theta"])
    k, v = entry.view(1, t, 1, -1), entry.new_empty(1, t, 1, 0)
    if isinstance(pos, torch.Tensor):
        ctx.cache.write_at(a["layer"], k, v, positions)
    else:
        ctx.cache.write(a["layer"], k, v, pos)
    return (ctx.cache,)


@_eager(Op.MLA_ATTENTION)
def _mla_attention(node, args, ctx):
    a, (q, cache, pos, wkv_b) = node.attrs, args
    t = q.shape[0]
    end = cache.max_len if isinstance(pos, torch.Tensor) else pos + t
    entry = cache.view(a["layer"], end)[0][:, :, 0]  # [1, S, rank + rope]
    r = entry.shape[-1] - a["rope"]
    positions = pos + torch.arange(t, device=q.device)
    q = q.view(1, t, a["heads"], -1)
    o = fn.mla_attention(
        q, entry[..., :r], entry[..., r:], wkv_b, a["v_dim"], positions, pos, a["theta"]
    )
    return (o.reshape(t, -1),)


@_eager(Op.ADD)
def _add(node, args, ctx):
    return (args[0] + args[1],)


@_eager(Op.SWIGLU)
def _swiglu(node, args, ctx):
    return (fn.swiglu(args[0], Activation.of(node.attrs)),)


@_eager(Op.ROUTER)
def _router(node, args, ctx):
    a = bind(node, args)
    ids, weights = route_topk(
        a["logits"], node.attrs["k"], node.attrs["mode"], node.attrs["renormalize"],
        limits_of(node, a["bias"]),
    )  # fmt: skip
    return ids.long(), weights


def limits_of(node, bias=None):
    """The routing `Limits` a ROUTER (or next-layer PREFETCH) node's attributes give."""
    a = node.attrs
    groups = (a.get("n_group", 1), a.get("topk_group", 1))
    return Limits(a.get("scale", 1.0), *groups, bias, a.get("jitter_eps", 0.0))


@_eager(Op.GATHER)
def _gather(node, args, ctx):
    return (fn.gather_pairs(*args),)


@_eager(Op.EXPERT_GEMM)
def _expert_gemm(node, args, ctx):
    return (fn.expert_gemm(*args),)


@_eager(Op.SCATTER)
def _scatter(node, args, ctx):
    return (fn.scatter_pairs(*args),)


@_eager(Op.FUSED_MOE)
def _fused_moe(node, args, ctx):
    from speq.kernels.fused_moe import fused_moe  # lazily: see speq.kernels._triton

    a = bind(node, args)
    ids, act = a["ids"].to(torch.int32), Activation.of(node.attrs)
    y = fused_moe(
        a["x"], a["w13"], a["w2"], ids, a["weights"], b13=a["b13"], b2=a["b2"], activation=act
    )
    return (y,)


EAGER_TABLE = ImplTable((("eager", EAGER),))  # the reference interpreter's table
