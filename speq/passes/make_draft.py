"""make_draft: the draft model's step graph, from the target's fused step graph.

Precondition: fuse_moe ran and insert_prefetch did not (the draft reads resident weights only).
The draft is the target with every routed expert weight replaced by a weight-only quantized copy
(``bits`` 4 or 8, symmetric, groups of ``group_size`` along the reduction dimension) that stays
on the device. Everything else (embeddings, attention, norms, routers, shared experts, head) is
the target's own tensors, and the KV cache is the target's: the draft writes its entries and
verification overwrites them. With ``shared`` (``CompileOptions.draft_memory="shared"``) the
quantized expert PARAMs are marked ``shared``: each expert is then read at the precision the
device holds it in (speq.runtime.draft_slots), a choice the host makes, so `lower` keeps the
draft's FUSED_MOE out of replay regions.
"""

from __future__ import annotations

from collections.abc import Callable

from speq.ir.graph import Graph, Node, Value
from speq.ir.ops import Op, Tag
from speq.ir.program import DRAFT_PREFIX, Program
from speq.ir.verifier import VerificationError


def make_draft(bits: int, group_size: int, shared: bool = False) -> Callable[[Program], Program]:
    if bits not in (4, 8):
        raise ValueError(f"draft bits must be 4 or 8, got {bits}")

    def make_draft(program: Program) -> Program:
        step = program["step"]
        if step.with_tag(Tag.MOE_CHAIN) or step.find(Op.WAIT):
            raise VerificationError("make_draft runs after fuse_moe and before insert_prefetch")
        producers = step.producers()
        quantized: dict[str, Value] = {}
        nodes: list[Node] = []
        for node in step:
            if node.op is Op.FUSED_MOE:
                ins = list(node.inputs)
                for i in (3, 4):  # w13, w2
                    w = ins[i]
                    if w.name not in quantized:
                        q = Value(DRAFT_PREFIX + w.name, w.shape, f"i{bits}")
                        name = DRAFT_PREFIX + producers[w.name].attrs["name"]
                        attrs = {"name": name, "bits": bits, "group_size": group_size}
                        if shared:
                            attrs["shared"] = True
                        nodes.append(Node(Op.PARAM, (), (q,), attrs))
                        quantized[w.name] = q
                    ins[i] = quantized[w.name]
                node = node.replace(inputs=tuple(ins))
            nodes.append(node)
        # drop the dense expert weights the draft no longer reads
        used = {v.name for n in nodes for v in n.inputs}
        nodes = [
            n
            for n in nodes
            if not (n.op is Op.PARAM and n.out.name in quantized and n.out.name not in used)
        ]
        return program.with_graph(Graph("draft", tuple(nodes)))

    return make_draft
