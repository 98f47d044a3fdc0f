"""The graph verifier: run after every pass in tests and under SPEQ_DEBUG.

It checks that every value is defined once and before its use with the type its producer gave it,
that each op has the inputs, outputs and attributes its schema asks for, that the graph ends in
one OUTPUT, and that no replay region holds a DATA_DEPENDENT node or one that reads a host value
(`host_values`). Its error shows the IR around the faulty node.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

from speq.ir.dtypes import FLOAT_DTYPES, INT_DTYPES
from speq.ir.graph import Graph, Node, Value
from speq.ir.ops import Op, Tag
from speq.ir.printer import format_graph
from speq.ir.program import Program
from speq.ir.schema import CLASSES, SCHEMAS, input_names

# the values an attribute may take, by (op, attribute): given by the layers that own the tables
# (e.g. the routing functions a ROUTER's ``mode`` names), so that the IR imports none of them
Domains = Mapping[tuple[Op, str], Collection[Any]]


class VerificationError(ValueError):
    pass


def _class_of(dtype: str) -> str | None:
    return "float" if dtype in FLOAT_DTYPES else "int" if dtype in INT_DTYPES else None


def verify(graph: Graph | Program, domains: Domains | None = None) -> Graph | Program:
    """Check ``graph`` (or every graph of a program); return it unchanged or raise
    ``VerificationError`` showing the fault. ``domains``: the values some attributes may take."""
    if isinstance(graph, Program):
        for g in graph:
            verify(g, domains)
        return graph
    defined: dict[str, Value] = {}
    host = host_values(graph)
    outputs = 0
    for i, node in enumerate(graph.nodes):
        problem = _check_node(node, defined, domains or {})
        region = node.meta.get("region")
        read = [v.name for v in node.inputs if v.name in host]
        if problem is None and region is not None and read:
            problem = (
                f"{node.op.name.lower()} reads a host value ({read[0]}) but sits inside replay "
                f"region {region}"
            )
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


def _check_node(node: Node, defined: dict[str, Value], domains: Domains) -> str | None:
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
        for pos, (v, (arg, cls)) in enumerate(zip(node.inputs, schema.inputs)):
            if v.dtype not in CLASSES[cls]:
                return (
                    f"{name} input {pos} (%{v.name}) must be {cls}, got {v.dtype} (the {arg} input)"
                )
        try:
            input_names(node)
        except ValueError as e:
            return str(e)
    if len(node.outputs) != schema.outputs:
        return f"{name} produces {schema.outputs} outputs, got {len(node.outputs)}"
    missing = [a for a in schema.attrs if a not in node.attrs]
    if missing:
        return f"{name} is missing attribute(s) {missing}"
    for attr, value in node.attrs.items():
        allowed = domains.get((node.op, attr))
        if allowed is not None and value not in allowed:
            return f"{name} has {attr}={value!r}; expected one of {sorted(allowed)}"
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
    return None


def host_values(graph: Graph) -> frozenset[str]:
    """The values of ``graph`` that exist only on the host, so that a node reading one cannot be
    captured in a replay region: the residencies WAITs return, and the shared draft's experts
    (PARAMs marked ``shared``: each expert read at the precision resident, found through tables
    the host keeps; speq.runtime.draft_slots)."""
    return frozenset(
        v.name
        for n in graph.nodes
        for v in n.outputs
        if v.dtype == "residency" or (n.op is Op.PARAM and n.attrs.get("shared"))
    )
