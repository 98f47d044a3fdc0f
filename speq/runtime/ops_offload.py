"""The offloading implementations of the IR's ops (the ``offload`` set of every backend's table).

Ops not listed here run with the eager implementations. Expert weights are not device tensors
under offloading: their PARAM nodes yield nothing and FUSED_MOE reads the slot pool through the
residency its WAIT returned; the draft's quantized experts yield a `SharedWeight` under shared
draft memory, and its FUSED_MOE reads each expert at the precision resident.
"""

from __future__ import annotations

from collections.abc import Callable

from speq.ir.ops import Op
from speq.ir.run import Impl, implements
from speq.ir.schema import bind
from speq.kernels.activation import Activation
from speq.models import functional as fn
from speq.runtime.draft_slots import SharedWeight, draft_moe
from speq.runtime.link import Priority
from speq.runtime.ops_eager import EAGER, limits_of

OFFLOAD: dict[Op, Impl] = {}


def _offload(op: Op) -> Callable[[Impl], Impl]:
    return implements(OFFLOAD, op)


@_offload(Op.PARAM)
def _param(node, args, ctx):
    name = node.attrs["name"]
    if ctx.runtime.store.is_expert_param(name):
        return (None,)
    return (ctx.params[name],)


@_offload(Op.WAIT)
def _wait(node, args, ctx):
    return (ctx.runtime.need(node.attrs["layer"], args[0]),)


@_offload(Op.FUSED_MOE)
def _fused_moe(node, args, ctx):
    a = bind(node, args)
    extras = dict(b13=a["b13"], b2=a["b2"], activation=Activation.of(node.attrs))
    if isinstance(a["w13"], SharedWeight):  # the draft's experts, each at its precision
        return (
            draft_moe(ctx.runtime, node.attrs["layer"], a["x"], a["ids"], a["weights"], **extras),
        )
    if a["residency"] is None:  # no WAIT: resident weights (the draft's quantized experts)
        return EAGER[Op.FUSED_MOE](node, args, ctx)
    return (ctx.runtime.moe(a["x"], a["ids"], a["weights"], a["residency"], **extras),)


@_offload(Op.PREFETCH)
def _prefetch(node, args, ctx):
    a = node.attrs
    if a["source"] == "elb":  # the draft's routing, into the Expert Lookahead Buffer
        ctx.runtime.policy.on_draft_route(ctx.runtime, a["layer"], *args)
        return ()
    experts = next_layer_experts(node, args)
    if ctx.runtime.recorder is not None:
        ctx.runtime.recorder.prefetch(a["layer"], experts)
    ctx.runtime.prefetch(a["layer"], experts, Priority.NORMAL)
    return ()


def next_layer_experts(node, args) -> list[int]:
    """The experts a next-layer PREFETCH predicts: the next layer's router applied to this
    layer's hidden state."""
    a = node.attrs
    hidden, router = args[:2]  # the next layer's router bias, if any, is not read: a prediction
    ids, _ = fn.route(hidden @ router.t(), a["k"], a["mode"], a["renormalize"], limits_of(node))
    return sorted(set(ids.reshape(-1).tolist()))
