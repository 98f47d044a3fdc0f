"""fuse_moe: gather → gate/up GEMM → SwiGLU → down GEMM → weighted scatter becomes one FUSED_MOE.

Pattern: a SCATTER whose rows come from EXPERT_GEMM(SWIGLU(EXPERT_GEMM(GATHER(x, ids), ids, w13)),
ids, w2). Check: every intermediate has exactly one user and all three ids are the same value.
Rewrite: FUSED_MOE(x, ids, weights, w13, w2[, b13, b2]) defining the SCATTER's output value, so
its users are unchanged; the GEMMs' expert biases and the activation's attributes go with it. A match whose check fails is left unfused, with the reason logged at debug level.
"""

from __future__ import annotations

import logging

from speq.ir.graph import Graph, Node
from speq.ir.ops import Op

log = logging.getLogger("speq.passes.fuse_moe")


def match(
    scatter: Node, producers: dict[str, Node], users: dict[str, list[Node]]
) -> tuple[Node, ...] | None:
    """The chain ending at ``scatter`` (gather, gemm1, act, gemm2, scatter), or None."""
    if scatter.op is not Op.SCATTER:
        return None
    gemm2 = producers.get(scatter.inputs[0].name)
    act = producers.get(gemm2.inputs[0].name) if gemm2 and gemm2.op is Op.EXPERT_GEMM else None
    gemm1 = producers.get(act.inputs[0].name) if act and act.op is Op.SWIGLU else None
    gather = producers.get(gemm1.inputs[0].name) if gemm1 and gemm1.op is Op.EXPERT_GEMM else None
    if gather is None or gather.op is not Op.GATHER:
        log.debug("fuse_moe declines %s: not a gather/gemm/swiglu/gemm chain", scatter.out)
        return None
    chain = (gather, gemm1, act, gemm2, scatter)
    for n in chain[:-1]:
        if len(users.get(n.out.name, [])) != 1:
            log.debug("fuse_moe declines %s: %s has other users", scatter.out, n.out)
            return None
    ids = {gather.inputs[1], gemm1.inputs[1], gemm2.inputs[1]}
    if len(ids) != 1:
        log.debug("fuse_moe declines %s: the GEMMs route by different ids", scatter.out)
        return None
    if len(gemm1.inputs) != len(gemm2.inputs):
        log.debug("fuse_moe declines %s: one GEMM has a bias, the other not", scatter.out)
        return None
    return chain


def fuse_moe(graph: Graph) -> Graph:
    """Replace each matching routed-expert chain by one FUSED_MOE node (at the SCATTER's place)."""
    producers, users = graph.producers(), graph.users()
    drop: set[int] = set()
    fused: dict[int, Node] = {}
    for scatter in graph.find(Op.SCATTER):
        chain = match(scatter, producers, users)
        if chain is None:
            continue
        gather, gemm1, act, gemm2, _ = chain
        x, ids = gather.inputs
        biases = (*gemm1.inputs[3:], *gemm2.inputs[3:])  # the experts' biases, where they have
        node = Node(
            Op.FUSED_MOE,
            (x, ids, scatter.inputs[1], gemm1.inputs[2], gemm2.inputs[2], *biases),
            scatter.outputs,
            {"layer": gemm1.attrs["layer"], **{k: v for k, v in act.attrs.items()}},
        )
        drop.update(id(n) for n in chain[:-1])
        fused[id(scatter)] = node
    return graph.replace_nodes([fused.get(id(n), n) for n in graph if id(n) not in drop])
