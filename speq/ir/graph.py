"""Immutable values, nodes and graphs."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any

from speq.ir.ops import Op, Tag, has_tag
from speq.ir.printer import format_graph

Dim = int | str  # a size, or a symbol such as "T" (new tokens) or "T*2" (token-choice pairs)


@dataclass(frozen=True)
class Value:
    """A tensor produced by one node: a unique name, a shape and a dtype name (f32, i64, kv, ...)."""

    name: str
    shape: tuple[Dim, ...]
    dtype: str

    def __str__(self) -> str:
        return f"%{self.name}"

    @property
    def type_str(self) -> str:
        return f"{self.dtype}[{', '.join(str(d) for d in self.shape)}]"


def _freeze(mapping: Mapping[str, Any] | None) -> Mapping[str, Any]:
    return MappingProxyType(dict(mapping or {}))


@dataclass(frozen=True)
class Node:
    """One operation. ``attrs`` are part of its meaning; ``meta`` holds annotations passes add
    (costs, streams, kernel choices) and does not take part in equality."""

    op: Op
    inputs: tuple[Value, ...]
    outputs: tuple[Value, ...]
    attrs: Mapping[str, Any] = field(default_factory=dict, hash=False)
    meta: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "inputs", tuple(self.inputs))
        object.__setattr__(self, "outputs", tuple(self.outputs))
        object.__setattr__(self, "attrs", _freeze(self.attrs))
        object.__setattr__(self, "meta", _freeze(self.meta))

    @property
    def out(self) -> Value:
        """The single output (most ops have exactly one)."""
        if len(self.outputs) != 1:
            raise ValueError(f"{self.op.name.lower()} has {len(self.outputs)} outputs, not one")
        return self.outputs[0]

    def has(self, tag: Tag) -> bool:
        return has_tag(self.op, tag)

    def replace(self, **changes: Any) -> Node:
        """A copy with ``changes`` applied, or ``self`` when nothing changes."""
        if all(_same(getattr(self, k), v) for k, v in changes.items()):
            return self
        return replace(self, **changes)

    def annotate(self, **meta: Any) -> Node:
        return self.replace(meta={**self.meta, **meta})


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return dict(a) == dict(b)
    return a == b if not isinstance(a, tuple) else tuple(a) == tuple(b)


@dataclass(frozen=True)
class Graph:
    """A straight-line program: nodes in execution order, ending with one OUTPUT node."""

    name: str
    nodes: tuple[Node, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "nodes", tuple(self.nodes))

    def __iter__(self) -> Iterator[Node]:
        return iter(self.nodes)

    def __len__(self) -> int:
        return len(self.nodes)

    @property
    def inputs(self) -> tuple[Value, ...]:
        return tuple(n.out for n in self.nodes if n.op is Op.INPUT)

    @property
    def outputs(self) -> tuple[Value, ...]:
        return next(n.inputs for n in self.nodes if n.op is Op.OUTPUT)

    def find(self, op: Op) -> list[Node]:
        return [n for n in self.nodes if n.op is op]

    def with_tag(self, tag: Tag) -> list[Node]:
        return [n for n in self.nodes if n.has(tag)]

    def producers(self) -> dict[str, Node]:
        return {v.name: n for n in self.nodes for v in n.outputs}

    def users(self) -> dict[str, list[Node]]:
        out: dict[str, list[Node]] = {}
        for n in self.nodes:
            for v in n.inputs:
                out.setdefault(v.name, []).append(n)
        return out

    def replace_nodes(self, nodes: tuple[Node, ...] | list[Node]) -> Graph:
        nodes = tuple(nodes)
        if len(nodes) == len(self.nodes) and all(a is b for a, b in zip(nodes, self.nodes)):
            return self
        return Graph(self.name, nodes)

    def __str__(self) -> str:
        return format_graph(self)
