"""lower: place every node of the program for the backend that will run it.

Each node gets ``meta`` that an executor reads:
- ``kernel``: the implementation the run loop dispatches to, ``"<set>:<op>"`` with set the first
  of the backend's implementation sets that has the op (``offload`` then ``eager``);
- ``region``: the replay region, a maximal run of compute nodes between host syncs. On CUDA the
  runtime captures each as a CUDA graph and replays it (speq.runtime.replay). No region holds a
  DATA_DEPENDENT node, nor a node that reads a host value (a WAIT's residency: the offloaded
  FUSED_MOE, which may copy and wait for more experts chunk by chunk); the verifier checks both.
  Copies are not nodes of their own stream here: the runtime's link issues them on its copy
  stream (speq.runtime.link), and the WAIT nodes, which are outside every region, order them.

Precondition: insert_prefetch ran (WAIT nodes mark the host syncs).
"""

from __future__ import annotations

from collections.abc import Callable

from speq.ir.graph import Graph, Node
from speq.ir.ops import Op, Tag
from speq.ir.program import Program
from speq.ir.run import ImplTable

SOURCES = (Op.INPUT, Op.PARAM, Op.OUTPUT)
HOST_VALUES = frozenset({"residency"})  # value types that live on the host


def reads_host_value(node: Node) -> bool:
    """Whether ``node`` takes a value that exists only on the host (it cannot be captured)."""
    return any(v.dtype in HOST_VALUES for v in node.inputs)


def lower(kernels: ImplTable) -> Callable[[Program], Program]:
    """The pass for a backend whose op implementations are ``kernels``."""

    def lower(program: Program) -> Program:
        if not program["step"].find(Op.WAIT):
            raise ValueError("lower runs after insert_prefetch (no WAIT in the step graph)")
        return program.map(lambda g: _lower_graph(g, kernels))

    return lower


def _lower_graph(graph: Graph, kernels: ImplTable) -> Graph:
    out: list[Node] = []
    region, open_region = 0, False
    for node in graph:
        if node.op in SOURCES:
            out.append(node)
            continue
        meta: dict = {"kernel": kernels.kernel(node.op)}
        if node.has(Tag.DATA_DEPENDENT) or reads_host_value(node):
            if open_region:
                region, open_region = region + 1, False
        else:
            meta["region"] = region
            open_region = True
        out.append(node.annotate(**meta))
    return graph.replace_nodes(out)
