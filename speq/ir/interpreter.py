"""The reference interpreter: runs any graph with eager torch, one node at a time.

Each op's implementation is registered for a backend name; the interpreter uses ``"eager"``.
Later backends (the lowered plan's kernels) register their own and fall back to nothing: an op
without an implementation for the backend raises an error that names both.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from speq.ir.graph import Graph, Node
from speq.ir.ops import Op
from speq.models import functional as fn
from speq.models.kv_cache import KVCache


@dataclass
class RunContext:
    """What a graph reads besides its inputs: weights, the KV cache, the start position, and
    ``hooks`` the runtime may set (e.g. to observe routing or make experts resident)."""

    params: Mapping[str, torch.Tensor]
    cache: KVCache
    pos: int = 0
    hooks: dict[str, Callable[..., Any]] = field(default_factory=dict)


Impl = Callable[[Node, tuple[Any, ...], RunContext], tuple[Any, ...]]
_REGISTRY: dict[tuple[Op, str], Impl] = {}


def register(op: Op, backend: str = "eager") -> Callable[[Impl], Impl]:
    def deco(f: Impl) -> Impl:
        _REGISTRY[(op, backend)] = f
        return f

    return deco


def lookup(op: Op, backend: str) -> Impl:
    try:
        return _REGISTRY[(op, backend)]
    except KeyError:
        raise NotImplementedError(
            f"no implementation of {op.name.lower()} for backend {backend!r}"
        ) from None


def run_graph(
    graph: Graph,
    inputs: Mapping[str, Any],
    ctx: RunContext,
    backend: str = "eager",
) -> tuple[torch.Tensor, ...]:
    """Run ``graph`` and return the tensors of its OUTPUT node."""
    env: dict[str, Any] = {}
    for node in graph.nodes:
        if node.op is Op.INPUT:
            env[node.out.name] = inputs[node.attrs["name"]]
            continue
        if node.op is Op.OUTPUT:
            return tuple(env[v.name] for v in node.inputs)
        args = tuple(env[v.name] for v in node.inputs)
        outs = lookup(node.op, backend)(node, args, ctx)
        for v, t in zip(node.outputs, outs, strict=True):
            env[v.name] = t
    raise ValueError(f"graph {graph.name} has no output node")


# ----------------------------------------------------------------------------- eager implementations


@register(Op.PARAM)
def _param(node, args, ctx):
    return (ctx.params[node.attrs["name"]],)


@register(Op.EMBED)
def _embed(node, args, ctx):
    tokens, table = args
    return (table[tokens],)


@register(Op.RMSNORM)
def _rmsnorm(node, args, ctx):
    return (fn.rms_norm(args[0], args[1], node.attrs["eps"]),)


@register(Op.LINEAR)
def _linear(node, args, ctx):
    return (args[0] @ args[1].t(),)


@register(Op.ROPE)
def _rope(node, args, ctx):
    x, pos = args
    t = x.shape[0]
    positions = torch.arange(pos, pos + t, device=x.device)
    y = fn.rope(x.view(t, node.attrs["heads"], -1), positions, node.attrs["theta"])
    return (y.reshape(t, -1),)


@register(Op.KV_WRITE)
def _kv_write(node, args, ctx):
    k, v, pos = args
    t, kvh = k.shape[0], ctx.cache.k.shape[3]
    ctx.cache.write(node.attrs["layer"], k.view(1, t, kvh, -1), v.view(1, t, kvh, -1), pos)
    return (ctx.cache,)


@register(Op.ATTENTION)
def _attention(node, args, ctx):
    q, cache, pos = args
    t = q.shape[0]
    k, v = cache.view(node.attrs["layer"], pos + t)
    o = fn.attention(q.view(1, t, node.attrs["heads"], -1), k, v, pos)
    return (o.reshape(t, -1),)


@register(Op.ADD)
def _add(node, args, ctx):
    return (args[0] + args[1],)


@register(Op.SWIGLU)
def _swiglu(node, args, ctx):
    return (fn.swiglu(args[0]),)


@register(Op.ROUTER)
def _router(node, args, ctx):
    a = node.attrs
    return fn.route(args[0], a["k"], a["mode"], a["renormalize"])


@register(Op.GATHER)
def _gather(node, args, ctx):
    return (fn.gather_pairs(*args),)


@register(Op.EXPERT_GEMM)
def _expert_gemm(node, args, ctx):
    return (fn.expert_gemm(*args),)


@register(Op.SCATTER)
def _scatter(node, args, ctx):
    return (fn.scatter_pairs(*args),)


@register(Op.FUSED_MOE)
def _fused_moe(node, args, ctx):
    x, ids, weights, w13, w2 = args
    h = fn.swiglu(fn.expert_gemm(fn.gather_pairs(x, ids), ids, w13))
    return (fn.scatter_pairs(fn.expert_gemm(h, ids, w2), weights),)
