"""lower: place every node of the program for the backend that will run it.

Each node gets ``meta``:
- ``stream``: ``copy`` for ASYNC_COPY nodes, ``host`` for the other DATA_DEPENDENT ones (they need
  tensor values on the host), ``compute`` for the rest;
- ``kernel``: the implementation the runtime dispatches to, ``"<impl>:<op>"`` with impl the first
  of the backend's implementation sets that has the op (``offload`` then ``eager``);
- ``region``: the replay region, a maximal run of compute nodes between host syncs. On CUDA the
  runtime captures each as a CUDA graph and replays it (speq.runtime.replay). No region holds a
  DATA_DEPENDENT node, nor a node that reads a host value (a WAIT's residency: the offloaded
  FUSED_MOE, which may copy and wait for more experts chunk by chunk); the verifier checks both.

Precondition: insert_prefetch ran (WAIT nodes mark the host syncs).
"""

from __future__ import annotations

from collections.abc import Callable

from speq.ir.graph import Graph, Node
from speq.ir.interpreter import implementation_name
from speq.ir.ops import Op, Tag
from speq.ir.program import Program

SOURCES = (Op.INPUT, Op.PARAM, Op.OUTPUT)
HOST_VALUES = frozenset({"residency"})  # value types that live on the host


def reads_host_value(node: Node) -> bool:
    """Whether ``node`` takes a value that exists only on the host (it cannot be captured)."""
    return any(v.dtype in HOST_VALUES for v in node.inputs)


def lower(impls: tuple[str, ...]) -> Callable[[Program], Program]:
    def lower(program: Program) -> Program:
        if not program["step"].find(Op.WAIT):
            raise ValueError("lower runs after insert_prefetch (no WAIT in the step graph)")
        return program.map(lambda g: _lower_graph(g, impls))

    return lower


def _lower_graph(graph: Graph, impls: tuple[str, ...]) -> Graph:
    out: list[Node] = []
    region, open_region = 0, False
    for node in graph:
        if node.op in SOURCES:
            out.append(node)
            continue
        meta: dict = {"kernel": implementation_name(node.op, impls)}
        if node.has(Tag.DATA_DEPENDENT):
            meta["stream"] = "copy" if node.has(Tag.ASYNC_COPY) else "host"
            if open_region:
                region, open_region = region + 1, False
        elif reads_host_value(node):
            meta["stream"] = "compute"
            if open_region:
                region, open_region = region + 1, False
        else:
            meta["stream"] = "compute"
            meta["region"] = region
            open_region = True
        out.append(node.annotate(**meta))
    return graph.replace_nodes(out)
