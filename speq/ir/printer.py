"""The one canonical text form of a graph: used for debugging, `speq explain` and golden tests.

One line per node, ``%outputs: type = op(%inputs) {attrs}``; attributes sorted by name; meta
entries a pass chose to show are printed after ``#``. Deterministic for a given graph.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the printer reads nodes and graphs; graph.py imports it for __str__
    from speq.ir.graph import Graph, Node

# meta keys that are part of the printed form: what `lower` decides and the executors read (the
# replay region a node runs in, and the kernel it dispatches to)
PRINTED_META = ("region", "kernel")


def format_attr(v: Any) -> str:
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, (tuple, list)):
        return "(" + ", ".join(format_attr(x) for x in v) + ")"
    return str(v)


def format_node(node: Node) -> str:
    outs = ", ".join(f"{v}: {v.type_str}" for v in node.outputs)
    args = ", ".join(str(v) for v in node.inputs)
    line = f"{outs} = " if outs else ""
    line += f"{node.op.name.lower()}({args})"
    if node.attrs:
        line += (
            " {" + ", ".join(f"{k}={format_attr(node.attrs[k])}" for k in sorted(node.attrs)) + "}"
        )
    shown = [f"{k}={format_attr(node.meta[k])}" for k in PRINTED_META if k in node.meta]
    if shown:
        line += "  # " + ", ".join(shown)
    return line


def format_graph(graph: Graph, mark: int | None = None, window: int | None = None) -> str:
    """The graph as text; ``mark`` points an arrow at one node, ``window`` keeps lines near it."""
    lines = []
    for i, node in enumerate(graph.nodes):
        if mark is not None and window is not None and abs(i - mark) > window:
            continue
        prefix = "  " if mark is None else (">> " if i == mark else "   ")
        lines.append(prefix + format_node(node))
    if mark is not None and window is not None:
        if mark - window > 0:
            lines.insert(0, "   ...")
        if mark + window < len(graph.nodes) - 1:
            lines.append("   ...")
    return f"graph {graph.name} {{\n" + "\n".join(lines) + "\n}"
