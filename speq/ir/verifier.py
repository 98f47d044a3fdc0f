"""The graph verifier: run after every pass in tests and under SPEQ_DEBUG.

It checks that every value is defined once and before its use with the type its producer gave it,
that each op has the inputs, outputs and attributes its schema asks for, that the graph ends in
one OUTPUT, and that no replay region holds a DATA_DEPENDENT node or one that reads a host value
(a residency). Its error shows the IR around the faulty node.
"""

from __future__ import annotations

from dataclasses import dataclass

from speq.ir.graph import Graph, Node, Value
from speq.ir.ops import Op, Tag
from speq.ir.printer import format_graph
from speq.ir.program import Program

FLOATS = frozenset({"f16", "bf16", "f32", "f64"})
INTS = frozenset({"i32", "i64"})


@dataclass(frozen=True)
class Schema:
    """``inputs``: dtype classes of the inputs (None: any number of any type); ``outputs``: count."""

    inputs: tuple[str, ...] | None
    outputs: int
    attrs: tuple[str, ...] = ()
    optional: tuple[str, ...] = ()  # trailing inputs that may be absent


SCHEMAS: dict[Op, Schema] = {
    Op.INPUT: Schema((), 1, ("name",)),
    Op.PARAM: Schema((), 1, ("name",)),
    Op.EMBED: Schema(("int", "float"), 1),
    Op.RMSNORM: Schema(("float", "float"), 1, ("eps",)),
    Op.LINEAR: Schema(("float", "float"), 1),
    Op.ROPE: Schema(("float", "int"), 1, ("heads", "theta")),
    Op.KV_WRITE: Schema(("float", "float", "int"), 1, ("layer",)),
    Op.ATTENTION: Schema(("float", "kv", "int"), 1, ("layer", "heads", "kv_heads")),
    Op.ADD: Schema(("float", "float"), 1),
    Op.SWIGLU: Schema(("float",), 1),
    Op.ROUTER: Schema(("float",), 2, ("k", "layer", "mode", "renormalize")),
    Op.GATHER: Schema(("float", "int"), 1),
    Op.EXPERT_GEMM: Schema(("float", "int", "float"), 1, ("layer",)),
    Op.SCATTER: Schema(("float", "float"), 1),
    # the optional last input is the WAIT that made the layer's experts resident
    Op.FUSED_MOE: Schema(
        ("float", "int", "float", "weights", "weights"), 1, ("layer",), optional=("residency",)
    ),
    # source "nextgate": (hidden, next router weight); source "elb": (draft ids, draft weights)
    Op.PREFETCH: Schema(None, 0, ("layer", "source")),
    Op.WAIT: Schema(("int",), 1, ("layer",)),
    Op.OUTPUT: Schema(None, 0),
}

_CLASSES = {
    "float": FLOATS,
    "weights": FLOATS | {"i4", "i8"},  # dense, or weight-only quantized (the draft's experts)
    "int": INTS,
    "kv": frozenset({"kv"}),
    "residency": frozenset({"residency"}),
}


class VerificationError(ValueError):
    pass


def _class_of(dtype: str) -> str | None:
    return "float" if dtype in FLOATS else "int" if dtype in INTS else None


def verify(graph: Graph | Program) -> Graph | Program:
    """Check ``graph`` (or every graph of a program); return it unchanged or raise
    ``VerificationError`` showing the fault."""
    if isinstance(graph, Program):
        for g in graph:
            verify(g)
        return graph
    defined: dict[str, Value] = {}
    outputs = 0
    for i, node in enumerate(graph.nodes):
        problem = _check_node(node, defined)
        if problem is None and node.op is Op.OUTPUT:
            outputs += 1
            if i != len(graph.nodes) - 1:
                problem = "output must be the last node"
        if problem is not None:
            raise VerificationError(f"{problem}\n{format_graph(graph, mark=i, window=3)}")
        for v in node.outputs:
            defined[v.name] = v
    if outputs != 1:
        raise VerificationError(f"graph {graph.name} has {outputs} output nodes, expected 1")
    return graph


def _check_node(node: Node, defined: dict[str, Value]) -> str | None:
    name = node.op.name.lower()
    for v in node.inputs:
        if v.name not in defined:
            return f"{name} uses %{v.name} before it is defined"
        if defined[v.name] != v:
            return (
                f"{name} uses %{v.name} as {v.type_str} but it was defined as "
                f"{defined[v.name].type_str}"
            )
    for v in node.outputs:
        if v.name in defined:
            return f"{name} redefines %{v.name}"
    schema = SCHEMAS[node.op]
    if schema.inputs is not None:
        n, full = len(node.inputs), schema.inputs + schema.optional
        if not len(schema.inputs) <= n <= len(full):
            expected = f"{len(schema.inputs)}" + (f" to {len(full)}" if schema.optional else "")
            return f"{name} takes {expected} inputs, got {n}"
        for pos, (v, cls) in enumerate(zip(node.inputs, full)):
            if v.dtype not in _CLASSES[cls]:
                return f"{name} input {pos} (%{v.name}) must be {cls}, got {v.dtype}"
    if len(node.outputs) != schema.outputs:
        return f"{name} produces {schema.outputs} outputs, got {len(node.outputs)}"
    missing = [a for a in schema.attrs if a not in node.attrs]
    if missing:
        return f"{name} is missing attribute(s) {missing}"
    if node.op is Op.PREFETCH:
        source = node.attrs["source"]
        want = {"nextgate": ("float", "float"), "elb": ("int", "float")}.get(source)
        if want is None:
            return f"prefetch has unknown source {source!r}"
        if tuple(_class_of(v.dtype) for v in node.inputs) != want:
            return (
                f"prefetch from {source} takes inputs {want}, got {[v.dtype for v in node.inputs]}"
            )
    if node.meta.get("region") is not None and node.has(Tag.DATA_DEPENDENT):
        return f"{name} is DATA_DEPENDENT but sits inside replay region {node.meta['region']}"
    region = node.meta.get("region")
    if region is not None and any(v.dtype == "residency" for v in node.inputs):
        return f"{name} reads a host value (a residency) but sits inside replay region {region}"
    return None
