"""The ``trace`` backend's implementations of the ops whose values decide where experts go.

Everything else runs on the ``meta`` device (shapes, no data, no memory: a 42B-parameter model
costs nothing), so these are the ops that must give real values: ROUTER reads the routing from
the trace (`speq.runtime.trace_routing.TraceRouting`, ``ctx.runtime.trace``); a next-layer
PREFETCH reads the prediction the trace recorded; FUSED_MOE does the offloading runtime's
bookkeeping (the experts resident and pinned while the layer "runs", released after; the host's
experts timed on its lane) and computes nothing. Node times come from the cost model, as on the ``sim`` backend.

`shape_only` wraps the eager ops for this backend: the first run of an op with given attributes
and input shapes computes on ``meta`` (torch's meta kernels cost about a millisecond an op), later runs
return empty ``meta`` tensors of the shapes it gave, and KV-cache writes do nothing (a meta cache
holds no data). That is what lets a 32-layer model simulate in seconds.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from speq.ir.ops import Op
from speq.ir.run import Impl, implements
from speq.ir.schema import bind
from speq.runtime.draft_slots import SharedWeight, draft_split
from speq.runtime.link import Priority
from speq.runtime.ops_offload import OFFLOAD

TRACE: dict[Op, Impl] = {}


def _trace(op: Op) -> Callable[[Impl], Impl]:
    return implements(TRACE, op)


@_trace(Op.ROUTER)
def _router(node, args, ctx):
    return ctx.runtime.trace.route(node.attrs["layer"])


@_trace(Op.PREFETCH)
def _prefetch(node, args, ctx):
    a = node.attrs
    if a["source"] == "elb":  # the draft's routing (from the trace's ROUTER), as anywhere
        return OFFLOAD[Op.PREFETCH](node, args, ctx)
    ctx.runtime.prefetch(a["layer"], ctx.runtime.trace.prefetch(a["layer"]), Priority.NORMAL)
    return ()


@_trace(Op.FUSED_MOE)
def _fused_moe(node, args, ctx):
    a = bind(node, args)
    residency = a["residency"]
    if isinstance(a["w13"], SharedWeight):  # the draft's experts at their precisions: counted
        draft_split(ctx.runtime, node.attrs["layer"], a["ids"])
    elif residency is not None:
        host = ctx.runtime.host
        job = (
            None if host is None else host.start(residency.layer, residency.host, None, None, None)
        )
        for _ in ctx.runtime.serve(residency):
            pass
        if job is not None:  # timed on the host lane, nothing computed
            host.finish(job)
    return (torch.empty_like(a["x"]),)


_NO_DATA = (Op.KV_WRITE, Op.MLA_KV_WRITE)  # return the cache they write to, and write nothing


def shape_only(table: Mapping[Op, Impl]) -> dict[Op, Impl]:
    """``table``'s implementations on ``meta`` tensors, memoised by the node's attributes (but
    its layer) and input shapes (see the module docstring); an op with a non-tensor output runs
    every time."""
    return {op: _memoised(op, impl) for op, impl in table.items()}


def _memoised(op: Op, impl: Impl) -> Impl:
    if op in _NO_DATA:
        return lambda node, args, ctx: (ctx.cache,)
    shapes: dict[tuple, tuple[tuple[torch.Size, torch.dtype], ...]] = {}
    attrs: dict[int, str] = {}  # node -> its attributes but the layer (shapes do not use it)

    def run(node, args, ctx):
        a = attrs.get(id(node))
        if a is None:
            a = attrs[id(node)] = repr(
                sorted((k, v) for k, v in node.attrs.items() if k != "layer")
            )
        key = (a, *(_signature(x) for x in args))
        known = shapes.get(key)
        if known is not None:
            return tuple(torch.empty(s, dtype=d, device="meta") for s, d in known)
        outs = impl(node, args, ctx)
        if all(isinstance(t, torch.Tensor) and t.is_meta for t in outs):
            shapes[key] = tuple((t.shape, t.dtype) for t in outs)
        return outs

    return run


def _signature(a: Any) -> Any:
    if isinstance(a, torch.Tensor):
        return (a.shape, a.dtype)
    return type(a)
