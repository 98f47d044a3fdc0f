"""`Program`: the graphs a compiled model runs, by name: ``step`` (the target model's forward
step) and, under speculative decoding, ``draft`` (the quantized draft's step)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from speq.ir.graph import Graph


@dataclass(frozen=True)
class Program:
    graphs: tuple[Graph, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "graphs", tuple(self.graphs))
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
        rest = [g for g in self.graphs if g.name != graph.name]
        if graph.name in self:
            return Program(tuple(graph if g.name == graph.name else g for g in self.graphs))
        return Program((*rest, graph))

    def map(self, fn: Callable[[Graph], Graph]) -> Program:
        new = tuple(fn(g) for g in self.graphs)
        return self if all(a is b for a, b in zip(new, self.graphs)) else Program(new)

    def __str__(self) -> str:
        return "\n".join(str(g) for g in self.graphs)
