"""`Program`: the graphs a compiled model runs, by name: ``step`` (the target model's forward
step) and, under speculative decoding, ``draft`` (the quantized draft's step); and the
``annotations`` that whole-program passes decide (the governor's ``"policy"``)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from speq.ir.graph import Graph

# the name prefix of the draft's weights: the draft graph reads "draft.<name>", a quantized copy
# of the target's weight "<name>"
DRAFT_PREFIX = "draft."


@dataclass(frozen=True)
class Program:
    graphs: tuple[Graph, ...]
    annotations: Mapping[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "graphs", tuple(self.graphs))
        object.__setattr__(self, "annotations", MappingProxyType(dict(self.annotations)))
        names = [g.name for g in self.graphs]
        if len(set(names)) != len(names):
            raise ValueError(f"graph names must be unique, got {names}")

    def __getitem__(self, name: str) -> Graph:
        for g in self.graphs:
            if g.name == name:
                return g
        raise KeyError(f"no graph {name!r} in the program; it has {self.names()}")

    def __contains__(self, name: str) -> bool:
        return any(g.name == name for g in self.graphs)

    def __iter__(self) -> Iterator[Graph]:
        return iter(self.graphs)

    def names(self) -> list[str]:
        return [g.name for g in self.graphs]

    def with_graph(self, graph: Graph) -> Program:
        """The program with ``graph`` replacing the one of its name, or added; ``self`` if the
        same graph is already there."""
        if graph.name in self and self[graph.name] is graph:
            return self
        if graph.name in self:
            graphs = tuple(graph if g.name == graph.name else g for g in self.graphs)
        else:
            graphs = (*self.graphs, graph)
        return dataclasses.replace(self, graphs=graphs)

    def map(self, fn: Callable[[Graph], Graph]) -> Program:
        new = tuple(fn(g) for g in self.graphs)
        if all(a is b for a, b in zip(new, self.graphs)):
            return self
        return dataclasses.replace(self, graphs=new)

    def annotate(self, **annotations: Any) -> Program:
        """The program with ``annotations`` added (the graphs are shared)."""
        return dataclasses.replace(self, annotations={**self.annotations, **annotations})

    def __str__(self) -> str:
        return "\n".join(str(g) for g in self.graphs)
