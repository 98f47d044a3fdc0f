"""A small helper that appends nodes to a graph under construction."""

from __future__ import annotations

from typing import Any

from speq.ir.graph import Dim, Graph, Node, Value
from speq.ir.ops import Op


class GraphBuilder:
    def __init__(self, name: str) -> None:
        self.name = name
        self.nodes: list[Node] = []
        self._names: set[str] = set()

    def emit(
        self,
        op: Op,
        inputs: tuple[Value, ...],
        outputs: list[tuple[str, tuple[Dim, ...], str]],
        /,
        **attrs: Any,
    ) -> tuple[Value, ...]:
        outs = []
        for name, shape, dtype in outputs:
            if name in self._names:
                raise ValueError(f"value name %{name} is already used in graph {self.name}")
            self._names.add(name)
            outs.append(Value(name, tuple(shape), dtype))
        self.nodes.append(Node(op, tuple(inputs), tuple(outs), attrs))
        return tuple(outs)

    def emit1(
        self,
        op: Op,
        inputs: tuple[Value, ...],
        out: str,
        shape: tuple[Dim, ...],
        dtype: str,
        /,
        **attrs: Any,
    ) -> Value:
        return self.emit(op, inputs, [(out, shape, dtype)], **attrs)[0]

    def build(self) -> Graph:
        return Graph(self.name, tuple(self.nodes))
