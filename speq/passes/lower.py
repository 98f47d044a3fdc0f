"""lower: place every node of the program for the backend that will run it.

Each node gets ``meta`` that an executor reads:
- ``kernel``: the implementation the run loop dispatches to, ``"<set>:<op>"`` with set the first
  of the backend's implementation sets that has the op (``offload`` then ``eager``);
- ``region``: the replay region, a maximal run of compute nodes between host syncs. On CUDA the
  runtime captures each as a CUDA graph and replays it (speq.runtime.replay). No region holds a
  DATA_DEPENDENT node, nor a node that reads a host value (`speq.ir.verifier.host_values`: a
  WAIT's residency, read by the offloaded FUSED_MOE, which may copy and wait for more experts
  chunk by chunk; a shared draft's experts, whose FUSED_MOE picks each expert's precision from
  the host's tables); the verifier checks both.
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
from speq.ir.verifier import host_values

SOURCES = (Op.INPUT, Op.PARAM, Op.OUTPUT)


def lower(kernels: ImplTable) -> Callable[[Program], Program]:
    """The pass for a backend whose op implementations are ``kernels``."""

    def lower(program: Program) -> Program:
        if not program["step"].find(Op.WAIT):
            raise ValueError("lower runs after insert_prefetch (no WAIT in the step graph)")
        return program.map(lambda g: _lower_graph(g, kernels))

    return lower


def _lower_graph(graph: Graph, kernels: ImplTable) -> Graph:
    out: list[Node] = []
    host = host_values(graph)
    region, open_region = 0, False
    for node in graph:
        if node.op in SOURCES:
            out.append(node)
            continue
        meta: dict = {"kernel": kernels.kernel(node.op)}
        if node.has(Tag.DATA_DEPENDENT) or any(v.name in host for v in node.inputs):
            if open_region:
                region, open_region = region + 1, False
        else:
            meta["region"] = region
            open_region = True
        out.append(node.annotate(**meta))
    return graph.replace_nodes(out)
