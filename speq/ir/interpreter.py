"""The reference interpreter: runs any graph with eager torch, one node at a time.

Each op's implementation is registered for a backend name; the interpreter uses ``"eager"``.
Later backends (the lowered plan's kernels) register their own and fall back to nothing: an op
without an implementation for the backend raises an error that names both.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from speq.ir.graph import Graph, Node
from speq.ir.ops import Op
from speq.models import functional as fn
from speq.models.kv_cache import KVCache


@dataclass
class RunContext:
    """What a graph reads besides its inputs: weights, the KV cache and the start position; the
    offloading ``runtime`` when there is one; and an ``observer(node, args, outs, seconds)``
    called after every node (the sim backend advances its clock there, timelines record)."""

    params: Mapping[str, torch.Tensor]
    cache: KVCache
    pos: int = 0
    runtime: Any = None
    observer: Callable[[Node, tuple[Any, ...], tuple[Any, ...], float], None] | None = None


Impl = Callable[[Node, tuple[Any, ...], RunContext], tuple[Any, ...]]
_REGISTRY: dict[tuple[Op, str], Impl] = {}


def register(op: Op, backend: str = "eager") -> Callable[[Impl], Impl]:
    def deco(f: Impl) -> Impl:
        _REGISTRY[(op, backend)] = f
        return f

    return deco


def implementation_name(op: Op, backends: tuple[str, ...]) -> str:
    """``"<backend>:<op>"`` of the first of ``backends`` that implements ``op``."""
    for b in backends:
        if (op, b) in _REGISTRY:
            return f"{b}:{op.name.lower()}"
    raise NotImplementedError(f"no implementation of {op.name.lower()} for backends {backends}")


def lookup(op: Op, backends: tuple[str, ...]) -> Impl:
    """The implementation of ``op`` from the first of ``backends`` that has one."""
    for b in backends:
        if (op, b) in _REGISTRY:
            return _REGISTRY[(op, b)]
    raise NotImplementedError(f"no implementation of {op.name.lower()} for backends {backends}")


def plan_implementations(graph: Graph, backends: tuple[str, ...]) -> dict[Op, Impl]:
    """The implementation of every op of ``graph`` from ``backends``; a ValueError when the
    lowered plan (the nodes' ``kernel`` meta) names kernels the backends do not provide."""
    impls = {op: lookup(op, backends) for op in {n.op for n in graph} - {Op.INPUT, Op.OUTPUT}}
    planned = {n.meta["kernel"] for n in graph if "kernel" in n.meta}
    expected = {implementation_name(op, backends) for op in impls}
    if planned - expected:
        raise ValueError(
            f"the lowered plan names kernels {sorted(planned - expected)} that {backends} do not provide"
        )
    return impls


def run_node(node: Node, env: dict[str, Any], ctx: RunContext, impl: Impl, observer=None) -> None:
    """Run one node on the values in ``env`` and store its outputs there; ``observer(node, args,
    outs, seconds)`` after it when given."""
    args = tuple(env[v.name] for v in node.inputs)
    t0 = time.perf_counter()
    outs = impl(node, args, ctx)
    if observer is not None:
        observer(node, args, outs, time.perf_counter() - t0)
    for v, t in zip(node.outputs, outs, strict=True):
        env[v.name] = t


def run_graph(
    graph: Graph,
    inputs: Mapping[str, Any],
    ctx: RunContext,
    backends: tuple[str, ...] = ("eager",),
) -> tuple[torch.Tensor, ...]:
    """Run ``graph`` and return the tensors of its OUTPUT node."""
    env: dict[str, Any] = {}
    impls = plan_implementations(graph, backends)
    for node in graph.nodes:
        if node.op is Op.INPUT:
            env[node.out.name] = inputs[node.attrs["name"]]
            continue
        if node.op is Op.OUTPUT:
            return tuple(env[v.name] for v in node.inputs)
        run_node(node, env, ctx, impls[node.op], ctx.observer)
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


# ROPE, KV_WRITE and ATTENTION take the start position ``pos`` as an int, or as a 0-d device
# tensor: then no shape depends on its value (the write is an index_copy_, attention reads the
# whole cache, masked), so a CUDA graph can capture them once and replay them at every position.


@register(Op.ROPE)
def _rope(node, args, ctx):
    x, pos = args
    t = x.shape[0]
    positions = pos + torch.arange(t, device=x.device)
    y = fn.rope(x.view(t, node.attrs["heads"], -1), positions, node.attrs["theta"])
    return (y.reshape(t, -1),)


@register(Op.KV_WRITE)
def _kv_write(node, args, ctx):
    k, v, pos = args
    t, kvh = k.shape[0], ctx.cache.k.shape[3]
    k, v, layer = k.view(1, t, kvh, -1), v.view(1, t, kvh, -1), node.attrs["layer"]
    if isinstance(pos, torch.Tensor):
        ctx.cache.write_at(layer, k, v, pos + torch.arange(t, device=k.device))
    else:
        ctx.cache.write(layer, k, v, pos)
    return (ctx.cache,)


@register(Op.ATTENTION)
def _attention(node, args, ctx):
    q, cache, pos = args
    t = q.shape[0]
    end = cache.max_len if isinstance(pos, torch.Tensor) else pos + t
    k, v = cache.view(node.attrs["layer"], end)
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
    from speq.kernels import route_topk

    a = node.attrs
    ids, weights = route_topk(args[0], a["k"], a["mode"], a["renormalize"])
    return ids.long(), weights


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
    from speq.kernels import fused_moe

    x, ids, weights, w13, w2 = args[:5]
    return (fused_moe(x, w13, w2, ids.to(torch.int32), weights),)
