"""insert_prefetch: make expert residency explicit for offloading.

Precondition: fuse_moe ran (every routed-expert block is one FUSED_MOE). Each FUSED_MOE gets a
WAIT on its routing ids right before it: the runtime makes the layer's experts resident there (a
DATA_DEPENDENT host sync) and the FUSED_MOE reads them through the residency the WAIT returns
(its ``residency`` input; with everything resident every WAIT is a hit). With ``next_layer``
(the ``nextgate`` policy) every MoE layer but the last also gets a PREFETCH right after its
router: the next MoE layer's router applied to this layer's MoE input predicts the experts to
copy while this layer computes. When the program has a draft graph (``speq``), every router of
the draft gets a PREFETCH from the Expert Lookahead Buffer: the draft's choice for the token it
processes is recorded there, and the runtime's three-phase scheduler decides which copies to
start. Which experts is known only at run time.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

from speq.ir.graph import Graph, Node, Value
from speq.ir.ops import Op, Tag
from speq.ir.program import Program
from speq.ir.schema import input_named
from speq.ir.verifier import VerificationError


def insert_prefetch(next_layer: bool = False) -> Callable[[Program], Program]:
    def insert_prefetch(program: Program) -> Program:
        program = program.with_graph(_target(program["step"], next_layer))
        if "draft" in program:
            program = program.with_graph(_draft(program["draft"]))
        return program

    return insert_prefetch


def _draft(graph: Graph) -> Graph:
    out: list[Node] = []
    for node in graph:
        out.append(node)
        if node.op is Op.ROUTER:
            attrs = {"layer": node.attrs["layer"], "source": "elb"}
            out.append(Node(Op.PREFETCH, node.outputs, (), attrs))
    return graph.replace_nodes(out)


def _target(graph: Graph, next_layer: bool) -> Graph:
    if graph.with_tag(Tag.MOE_CHAIN):
        raise VerificationError("insert_prefetch needs fuse_moe first: unfused expert ops remain")
    routers = {n.outputs[0].name: n for n in graph.find(Op.ROUTER)}
    moes = graph.find(Op.FUSED_MOE)
    next_router: dict[int, tuple[Node, int]] = {}
    if next_layer:
        for a, b in itertools.pairwise(moes):
            nxt = routers[input_named(b, "ids").name], b.attrs["layer"]
            next_router[id(routers[input_named(a, "ids").name])] = nxt
    producers = graph.producers()
    out: list[Node] = []
    for node in graph:
        if node.op is Op.FUSED_MOE:
            layer = node.attrs["layer"]
            ready = Value(f"l{layer}.resident", (), "residency")
            out.append(Node(Op.WAIT, (input_named(node, "ids"),), (ready,), {"layer": layer}))
            node = node.replace(inputs=(*node.inputs, ready))
        out.append(node)
        if node.op is Op.ROUTER and id(node) in next_router:
            out.extend(_nextgate(node, *next_router[id(node)], producers))
    return graph.replace_nodes(out)


def _nextgate(router: Node, nxt: Node, layer: int, producers: dict[str, Node]) -> list[Node]:
    logits = producers[router.inputs[0].name]  # LINEAR(mlp_in, router weight)
    weight = producers[producers[nxt.inputs[0].name].inputs[1].name]  # PARAM of the next router
    w = Value(f"l{layer}.router_early", weight.out.shape, weight.out.dtype)
    return [
        Node(Op.PARAM, (), (w,), dict(weight.attrs)),
        Node(
            Op.PREFETCH,
            (logits.inputs[0], w),
            (),
            {**nxt.attrs, "layer": layer, "source": "nextgate"},
        ),
    ]
