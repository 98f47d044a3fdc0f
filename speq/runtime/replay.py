"""Replay: run a lowered graph with each replay region captured once and replayed after.

`lower` marks replay regions: maximal runs of compute nodes between host syncs. `Replayer` runs
a lowered graph like the interpreter, except that a region runs as a unit over static buffers:

* the first time a region runs for a given key (the graph, the region, and the shape, dtype and
  device of each tensor it reads from outside; the identity of anything else it reads), its
  inputs are copied into new buffers and its nodes run on them; with ``capture`` (CUDA), they
  run once more on a side stream to warm up and are then captured as a CUDA graph;
* every later time, the inputs are copied into those buffers and the graph is replayed (without
  ``capture``, the nodes run again on the buffers), and the region's outputs are read from the
  tensors the capture produced.

Weights (PARAM nodes) are read in place, never copied: a region whose weight tensors changed is
captured again. The start position must be a 0-d device tensor for a region to be reused from one
position to the next (the eager ROPE, KV_WRITE and ATTENTION take either). A new KV cache drops
every capture (they write into the old one), and so does `clear`, which the engine calls when
weights leave the device (a dropped draft): a capture holds the weights it read and, on CUDA, its
graph's private memory pool, so until it goes the memory is not freed. Regions run for more than ``max_tokens`` new tokens
(a prefill) run node by node instead: one capture per prompt length would not pay for itself.

Only the CPU half (``capture=False``) runs in this project's CI; ``capture=True`` needs a CUDA
device and is exercised by the GPU test tier (tests/gpu).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from speq.ir.graph import Graph, Node
from speq.ir.ops import Op
from speq.ir.run import ImplTable, RunContext, plan_implementations, run_node


@dataclass(frozen=True)
class Segment:
    """A run of nodes: one node outside any region, or a whole region."""

    nodes: tuple[Node, ...]
    region: int | None
    inputs: tuple[str, ...] = ()  # values the region reads from outside it
    params: frozenset[str] = frozenset()  # of which weights (read in place)
    outputs: tuple[str, ...] = ()  # values read after the region


@dataclass
class Captured:
    """One region's static buffers, outputs and (with capture) CUDA graph."""

    buffers: dict[str, Any]
    outputs: dict[str, Any]
    graph: Any = None  # torch.cuda.CUDAGraph
    replays: int = 0


@dataclass
class ReplayStats:
    captures: int = 0
    replays: int = 0
    eager_nodes: int = 0  # nodes run one by one (outside regions, or in a prefill)


def segments(graph: Graph) -> list[Segment]:
    """``graph``'s nodes grouped into single nodes and whole replay regions, each region with
    the values it reads from outside and those read after it. Weights and inputs that the graph
    lists inside a region (they have no inputs) come just before it."""
    out: list[tuple[list[Node], int | None]] = []
    for node in graph.nodes:
        region = node.meta.get("region")
        if region is not None and out and out[-1][1] == region:
            out[-1][0].append(node)
        elif node.op in (Op.PARAM, Op.INPUT) and out and out[-1][1] is not None:
            out.insert(len(out) - 1, ([node], None))  # a source inside a region: run it first
        else:
            out.append(([node], region))
    producer = {v.name: n for n in graph.nodes for v in n.outputs}
    result = []
    for i, (nodes, region) in enumerate(out):
        if region is None:
            result.append(Segment(tuple(nodes), None))
            continue
        made = {v.name for n in nodes for v in n.outputs}
        inputs = list(dict.fromkeys(v.name for n in nodes for v in n.inputs if v.name not in made))
        later = {v.name for rest, _ in out[i + 1 :] for n in rest for v in n.inputs}
        outputs = tuple(name for name in dict.fromkeys(made) if name in later)
        params = frozenset(x for x in inputs if producer[x].op is Op.PARAM)
        result.append(Segment(tuple(nodes), region, tuple(inputs), params, outputs))
    return result


class Replayer:
    """Runs lowered graphs region by region (see the module docstring)."""

    def __init__(self, capture: bool, max_tokens: int = 17) -> None:
        if capture and not torch.cuda.is_available():
            raise ValueError("capturing CUDA graphs needs a CUDA device")
        self.capture, self.max_tokens = capture, max_tokens
        self.stats = ReplayStats()
        self._segments: dict[int, tuple[Graph, list[Segment]]] = {}
        self._captured: dict[tuple, Captured] = {}
        self._cache: Any = None

    def clear(self) -> None:
        """Drop every capture, with the buffers, weights and graph memory it holds."""
        self._captured.clear()

    def holds(self, tensor: torch.Tensor) -> bool:
        """Whether any capture holds ``tensor`` (by identity, or a tensor sharing its memory)."""
        ptr = tensor.untyped_storage().data_ptr()
        return any(
            x is tensor or (isinstance(x, torch.Tensor) and x.untyped_storage().data_ptr() == ptr)
            for cap in self._captured.values()
            for part in (cap.buffers, cap.outputs)
            for v in part.values()
            for x in _tensors(v)
        )

    def run(
        self,
        graph: Graph,
        inputs: Mapping[str, Any],
        ctx: RunContext,
        kernels: ImplTable,
    ) -> tuple[torch.Tensor, ...]:
        """Like `speq.ir.run.run_graph`; graph outputs are fresh tensors."""
        if ctx.cache is not self._cache:  # captures write into the cache they were made with
            self._captured.clear()
            self._cache = ctx.cache
        impls = plan_implementations(graph, kernels)
        tokens = inputs["tokens"].shape[0]
        env: dict[str, Any] = {}
        for seg in self._plan(graph):
            if seg.region is not None and tokens <= self.max_tokens:
                self._run_region(graph, seg, env, ctx, impls)
                continue
            for node in seg.nodes:
                if node.op is Op.INPUT:
                    env[node.out.name] = inputs[node.attrs["name"]]
                elif node.op is Op.OUTPUT:
                    return tuple(_fresh(env[v.name]) for v in node.inputs)
                else:
                    run_node(node, env, ctx, impls[id(node)], ctx.observer)
                    self.stats.eager_nodes += 1
        raise ValueError(f"graph {graph.name} has no output node")

    def _plan(self, graph: Graph) -> list[Segment]:
        entry = self._segments.get(id(graph))
        if entry is None or entry[0] is not graph:
            entry = self._segments[id(graph)] = (graph, segments(graph))
        return entry[1]

    def _key(self, graph: Graph, seg: Segment, env: dict) -> tuple:
        parts: list[Any] = [id(graph), seg.region]
        for name in seg.inputs:
            x = env[name]
            if isinstance(x, (bool, int, float, str)):
                parts.append((name, x))
            elif name in seg.params or not isinstance(x, torch.Tensor):
                parts.append((name, id(x)))  # kept alive by the capture's buffers
            else:
                parts.append((name, tuple(x.shape), x.dtype, x.device))
        return tuple(parts)

    def _run_region(self, graph: Graph, seg: Segment, env: dict, ctx: RunContext, impls) -> None:
        key = self._key(graph, seg, env)
        cap = self._captured.get(key)
        if cap is None:
            cap = self._captured[key] = self._capture(seg, env, ctx, impls)
        else:
            for name, buf in cap.buffers.items():
                if name not in seg.params and isinstance(buf, torch.Tensor):
                    buf.copy_(env[name])
            if cap.graph is not None:
                cap.graph.replay()
            else:
                cap.outputs = self._execute(seg, dict(cap.buffers), ctx, impls)
            cap.replays += 1
            self.stats.replays += 1
        env.update(cap.outputs)

    def _capture(self, seg: Segment, env: dict, ctx: RunContext, impls) -> Captured:
        buffers = {
            name: env[name].clone()
            if name not in seg.params and isinstance(env[name], torch.Tensor)
            else env[name]
            for name in seg.inputs
        }
        self.stats.captures += 1
        if not self.capture:
            return Captured(buffers, self._execute(seg, dict(buffers), ctx, impls))
        # CUDA graphs: warm up on a side stream (lazy initialisation, Triton compilation), then
        # capture; a capture records kernels without running them, so replay once for values
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._execute(seg, dict(buffers), ctx, impls)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outputs = self._execute(seg, dict(buffers), ctx, impls)
        graph.replay()
        return Captured(buffers, outputs, graph)

    def _execute(self, seg: Segment, env: dict, ctx: RunContext, impls) -> dict[str, Any]:
        """Run a region's nodes on ``env`` (its buffers); return its outputs. No observer: inside
        a captured graph there is no per-node time."""
        for node in seg.nodes:
            run_node(node, env, ctx, impls[id(node)])
        return {name: env[name] for name in seg.outputs}


def _tensors(x: Any) -> list[torch.Tensor]:
    """The tensors ``x`` is or holds (a quantized weight holds its codes and scales)."""
    if isinstance(x, torch.Tensor):
        return [x]
    if dataclasses.is_dataclass(x):
        parts = (getattr(x, f.name) for f in dataclasses.fields(x))
        return [v for v in parts if isinstance(v, torch.Tensor)]
    return []


def _fresh(x: Any) -> Any:
    return x.clone() if isinstance(x, torch.Tensor) else x
