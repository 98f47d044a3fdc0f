"""Routing from a trace instead of from tensors: what the ``trace`` backend reads, and what a
real run records. `TraceRouting` answers the backend's ROUTER, PREFETCH and logits from a
`speq.sim.routing_trace.RoutingTrace`; `TraceRecorder` builds one from a real run's session.
"""

from __future__ import annotations

import time
from collections import defaultdict

import torch

from speq.sim.routing_trace import PassKey, PassRouting, RoutingTrace

DRAFT_TOKEN, OTHER_TOKEN = 1, 2  # the token ids crafted logits choose (any two distinct ids)


class TraceRouting:
    """Answers the ``trace`` backend's routing questions from a `RoutingTrace`. `begin` starts
    a pass (the engine calls it); `route`, `prefetch` and `logits` answer for that pass."""

    def __init__(
        self, trace: RoutingTrace, moe_layers: tuple[int, ...], program=None, measured=False
    ) -> None:
        """``program``/``measured``: take node times from the trace's measurements (by each
        node's index in its graph of ``program``) where it has them."""
        if measured and not trace.node_seconds:
            raise ValueError("the trace has no measured node times (profile 'measured')")
        self.measured = measured
        self._index = _node_index(program) if measured else {}
        if len(moe_layers) != trace.moe_layers:
            raise ValueError(
                f"the trace has {trace.moe_layers} MoE layers, the model {len(moe_layers)}"
            )
        self.trace = trace
        self.index = {layer: i for i, layer in enumerate(moe_layers)}
        self._recorded: dict[PassKey, list[PassRouting]] = defaultdict(list)
        for key, routing in trace.passes:
            self._recorded[key].append(routing)
        self._used: dict[PassKey, int] = defaultdict(int)
        self._pass: tuple[str, int, int, PassRouting | None] = ("step", 0, 1, None)
        self.replayed = self.reconstructed = 0  # passes served from `passes` / the tables

    def begin(self, graph: str, pos: int, tokens: int) -> None:
        key = (graph, pos, tokens)
        recorded = self._recorded.get(key, ())
        n = self._used[key]
        routing = recorded[n] if n < len(recorded) else None
        self._used[key] = n + 1
        self.replayed += routing is not None
        self.reconstructed += routing is None
        self._pass = (graph, pos, tokens, routing)

    def node_seconds(self, node) -> float | None:
        """The measured seconds of ``node`` in the current pass (its mean over the recording),
        or None: not measured."""
        graph, _, tokens, _ = self._pass
        found = self.trace.node_seconds.get((graph, self._index.get(id(node), -1), tokens))
        return None if found is None else found[0] / found[1]

    def overhead(self) -> float:
        """The measured host time of the current pass outside its nodes (0: not measured)."""
        graph, _, tokens, _ = self._pass
        found = self.trace.pass_overhead.get((graph, tokens)) if self.measured else None
        return 0.0 if found is None else found[0] / found[1]

    def route(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(expert ids [T, k] int64, routing weights [T, k] fp32) of the current pass."""
        graph, pos, tokens, routing = self._pass
        i = self.index[layer]
        if routing is not None:
            rows = routing["route"][i]
        else:
            table = self.trace.draft if graph == "draft" else self.trace.target
            if graph == "draft" and not table:
                raise ValueError("the trace has no draft routing: it cannot drive a draft")
            missing = [p for p in range(pos, pos + tokens) if p not in table]
            if missing:
                raise ValueError(
                    f"the trace has no {graph} routing for positions {missing[:3]}... "
                    f"(it covers {len(table)} positions): decode fewer tokens"
                )
            rows = [table[p][i] for p in range(pos, pos + tokens)]
        ids = torch.tensor(rows, dtype=torch.int64)
        if routing is not None:
            weights = torch.tensor(routing["gates"][i], dtype=torch.float32)
        else:
            weights = torch.full(ids.shape, 1.0 / ids.shape[-1], dtype=torch.float32)
        return ids, weights

    def prefetch(self, layer: int) -> list[int]:
        """The experts a next-layer PREFETCH at ``layer`` predicts in the current pass."""
        routing = self._pass[3]
        if routing is None or self.index[layer] not in routing["prefetch"]:
            raise ValueError(
                "next-layer prefetching needs its predictions in the trace (a recorded "
                "nextgate run): this pass has none"
            )
        return routing["prefetch"][self.index[layer]]

    def logits(self, vocab: int) -> torch.Tensor:
        """Logits that make the speculative loop accept as the trace says: the draft proposes
        `DRAFT_TOKEN`; the target's row i chooses it where the draft's token at the next
        position is accepted, else `OTHER_TOKEN` (a position the trace does not know counts
        as a rejection)."""
        graph, pos, tokens, _ = self._pass
        out = torch.zeros(tokens, vocab)
        for i in range(tokens):
            agree = graph == "draft" or self.trace.accept.get(pos + i + 1, False)
            out[i, DRAFT_TOKEN if agree else OTHER_TOKEN] = 1.0
        return out


class TraceRecorder:
    """Records a real run into a `RoutingTrace`: every pass with its routing, the routing of
    true tokens by position, and the acceptance of each verified position. The engine calls
    `begin` and `end` around each pass; the session's observer calls `route` and `prefetch`."""

    def __init__(
        self, num_experts: int, top_k: int, moe_layers: tuple[int, ...], program=None
    ) -> None:
        """``program``: the compiled program, to name each timed node by its index."""
        self.index = {layer: i for i, layer in enumerate(moe_layers)}
        self.trace = RoutingTrace(num_experts, top_k, len(moe_layers))
        self._nodes = _node_index(program)
        self._pass_nodes_s = self._gap_s = 0.0
        self._last_end: float | None = None
        self._pass: tuple[str, int, list[int]] = ("step", 0, [])
        self._routing: PassRouting = {}
        self._drafted: dict[int, list[list[int]]] = {}  # draft routing of this cycle's tokens

    def begin(self, graph: str, pos: int, tokens: list[int]) -> None:
        now = time.perf_counter()
        # the host's time since the last pass (the decode loop's own work) counts to this one
        self._gap_s = 0.0 if self._last_end is None else now - self._last_end
        self._pass = (graph, pos, tokens)
        self._pass_nodes_s = 0.0
        self._routing = dict(route={}, gates={}, prefetch={})
        self.trace.passes.append(((graph, pos, len(tokens)), self._routing))

    def route(self, layer: int, ids: torch.Tensor, weights: torch.Tensor) -> None:
        i = self.index[layer]
        self._routing["route"][i] = ids.reshape(ids.shape[0], -1).tolist()
        self._routing["gates"][i] = weights.reshape(weights.shape[0], -1).float().tolist()

    def prefetch(self, layer: int, experts: list[int]) -> None:
        self._routing["prefetch"][self.index[layer]] = list(experts)

    def node(self, node, seconds: float, stalled: float) -> None:
        """A node took ``seconds``, of which ``stalled`` waiting for copies."""
        self._pass_nodes_s += seconds
        graph, _, tokens = self._pass
        key = (graph, self._nodes.get(id(node), -1), len(tokens))
        acc = self.trace.node_seconds.setdefault(key, [0.0, 0])
        acc[0] += max(0.0, seconds - stalled)
        acc[1] += 1

    def end(self, logits: torch.Tensor, seconds: float | None = None) -> None:
        """After a pass (of ``seconds`` wall time, when timed): the rows of true tokens go to the
        per-position tables; a verification's rows say which drafted positions the target
        accepted."""
        graph, pos, tokens = self._pass
        if seconds is not None:
            acc = self.trace.pass_overhead.setdefault((graph, len(tokens)), [0.0, 0])
            acc[0] += max(0.0, seconds - self._pass_nodes_s) + self._gap_s
            acc[1] += 1
        self._last_end = time.perf_counter()
        route = self._routing["route"]
        rows = [[route[i][j] for i in range(len(self.index))] for j in range(len(tokens))]
        if graph == "draft":  # true only if the verification accepts it
            self._drafted[pos] = rows[0]
            return
        true = len(tokens)  # a prefill or a one-token step: every token is true
        if len(tokens) > 1 and self._drafted:  # a verification window: tokens[0] is true
            choice = torch.argmax(logits, dim=-1).tolist()
            true = 1
            for i in range(len(tokens) - 1):
                ok = choice[i] == tokens[i + 1]
                self.trace.accept.setdefault(pos + i + 1, ok)
                if not ok:
                    break
                true += 1
        for j in range(true):
            self.trace.target[pos + j] = rows[j]
            if pos + j in self._drafted:
                self.trace.draft[pos + j] = self._drafted[pos + j]
        self._drafted.clear()


def _node_index(program) -> dict[int, int]:
    """id(node) -> its index in its graph, over every graph of ``program``."""
    if program is None:
        return {}
    return {id(n): i for graph in program for i, n in enumerate(graph.nodes)}
