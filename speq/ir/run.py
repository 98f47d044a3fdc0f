"""The run loop: execute a graph node by node with an implementation table.

The IR holds no implementations. A backend supplies an `ImplTable`: named sets of op
implementations, searched in order. `lower` records in each node's ``kernel`` meta which one it
chose (``"<set>:<op>"``); the run loop dispatches on that name, and on the op for graphs that were
never lowered (the captured graph in tests).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from speq.ir.graph import Graph, Node
from speq.ir.ops import Op


@dataclass
class RunContext:
    """What a graph reads besides its inputs: weights, the KV cache and the start position; the
    offloading ``runtime`` when there is one; and an ``observer(node, args, outs, seconds)``
    called after every node (the sim backend advances its clock there, timelines record)."""

    params: Mapping[str, Any]
    cache: Any  # a speq.models.KVCache
    pos: int = 0
    runtime: Any = None
    observer: Callable[[Node, tuple[Any, ...], tuple[Any, ...], float], None] | None = None


Impl = Callable[[Node, tuple[Any, ...], RunContext], tuple[Any, ...]]


def implements(table: dict[Op, Impl], op: Op) -> Callable[[Impl], Impl]:
    """A decorator that makes a function ``table``'s implementation of ``op``."""

    def deco(f: Impl) -> Impl:
        table[op] = f
        return f

    return deco


@dataclass(frozen=True)
class ImplTable:
    """Sets of op implementations by name, searched in order: ``(("offload", {...}), ("eager",
    {...}))`` runs an op from ``offload`` when that set has it, else from ``eager``. The names
    are resolved once, here: the run loop looks them up for every node of every step."""

    sets: tuple[tuple[str, Mapping[Op, Impl]], ...]
    _by_kernel: dict[str, Impl] = field(init=False, repr=False, compare=False)
    _first: dict[Op, str] = field(init=False, repr=False, compare=False)
    # graph id -> (the graph, its plan): `plan_implementations` once per graph, not per run
    _plans: dict[int, tuple[Graph, dict[int, Impl]]] = field(
        init=False, repr=False, compare=False, default_factory=dict
    )

    def __post_init__(self) -> None:
        by_kernel: dict[str, Impl] = {}
        first: dict[Op, str] = {}
        for name, impls in self.sets:
            for op, impl in impls.items():
                kernel = f"{name}:{op.name.lower()}"
                by_kernel[kernel] = impl
                first.setdefault(op, kernel)
        object.__setattr__(self, "_by_kernel", by_kernel)
        object.__setattr__(self, "_first", first)

    def kernel(self, op: Op) -> str:
        """``"<set>:<op>"``: the first set that implements ``op``."""
        if op not in self._first:
            names = tuple(name for name, _ in self.sets)
            raise NotImplementedError(f"no implementation of {op.name.lower()} in {names}")
        return self._first[op]

    def kernels(self) -> dict[Op, str]:
        """The kernel of every op some set implements."""
        return dict(self._first)

    def impl(self, kernel: str) -> Impl:
        """The implementation a ``"<set>:<op>"`` name stands for (KeyError: none)."""
        return self._by_kernel[kernel]


def plan_implementations(graph: Graph, table: ImplTable) -> dict[int, Impl]:
    """The implementation of every node of ``graph`` (by ``id``): the one its ``kernel`` meta
    names (a ValueError when ``table`` lacks it), else the first for its op. Resolved once per
    graph and table (graphs are immutable)."""
    cached = table._plans.get(id(graph))
    if cached is not None and cached[0] is graph:
        return cached[1]
    out: dict[int, Impl] = {}
    missing = set()
    for node in graph:
        if node.op in (Op.INPUT, Op.OUTPUT):
            continue
        kernel = node.meta.get("kernel") or table.kernel(node.op)
        try:
            out[id(node)] = table.impl(kernel)
        except KeyError:
            missing.add(kernel)
    if missing:
        names = tuple(name for name, _ in table.sets)
        raise ValueError(
            f"the lowered plan names kernels {sorted(missing)} that {names} do not provide"
        )
    table._plans[id(graph)] = (graph, out)
    return out


def run_node(node: Node, env: dict[str, Any], ctx: RunContext, impl: Impl, observer=None) -> None:
    """Run one node on the values in ``env`` and store its outputs there; ``observer(node, args,
    outs, seconds)`` after it when given."""
    args = tuple(env[v.name] for v in node.inputs)
    if observer is None:  # no timer when nothing observes
        outs = impl(node, args, ctx)
    else:
        t0 = time.perf_counter()
        outs = impl(node, args, ctx)
        observer(node, args, outs, time.perf_counter() - t0)
    for v, t in zip(node.outputs, outs, strict=True):
        env[v.name] = t


def run_graph(
    graph: Graph, inputs: Mapping[str, Any], ctx: RunContext, table: ImplTable
) -> tuple[torch.Tensor, ...]:
    """Run ``graph`` and return the tensors of its OUTPUT node."""
    env: dict[str, Any] = {}
    impls = plan_implementations(graph, table)
    for node in graph.nodes:
        if node.op is Op.INPUT:
            env[node.out.name] = inputs[node.attrs["name"]]
            continue
        if node.op is Op.OUTPUT:
            return tuple(env[v.name] for v in node.inputs)
        run_node(node, env, ctx, impls[id(node)], ctx.observer)
    raise ValueError(f"graph {graph.name} has no output node")
