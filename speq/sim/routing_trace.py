"""A routing trace: for one sequence, what decides where experts are needed and how speculation
goes, by absolute position (prompt positions first):

* ``target[pos][i]``: the experts the target routes position ``pos`` to in its i-th MoE layer
  (in the router's order; the token processed at ``pos`` is the true one);
* ``draft[pos][i]``: the same for the draft's routers (speculative policies);
* ``accept[pos]``: whether the draft's greedy token for position ``pos`` (after the true prefix)
  equals the target's: a verification window accepts its longest run of such positions;
* ``node_seconds`` / ``pass_overhead``: optionally, the node times (stalls excluded) and the
  host's time outside them (between nodes, and the decode loop's between passes) measured in
  the recorded run, which a simulation can take instead of the cost model's, and
  ``host_time_scale``: the recorded run's host time over the profile's model (`HostRate`; on the
  cpu backend the emulated host's slow-down, 1 where not recorded);
* ``passes``: optionally, every forward pass of one recorded run in order, keyed by (graph,
  start position, tokens), with the routing of each of its tokens (experts and weights; the
  draft's weights feed the Expert Lookahead Buffer) and the next-layer predictions of its
  PREFETCH nodes. A simulation of the same configuration consumes them in order and so sees
  exactly the recorded routing, including that of drafted tokens that were rejected; any other
  pass (another k, another policy) reads the per-position tables, which hold the routing of the
  true tokens.

Traces are recorded from real runs (speq.simulate.record_trace), read from external routing logs
(speq.sim.traces) or generated (speq.sim.trace_gen); the ``trace`` backend
(speq.runtime.trace_routing) runs on them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["FORMAT", "PassKey", "PassRouting", "RoutingTrace"]

FORMAT = "speq-routing-trace/1"

PassKey = tuple[str, int, int]  # (graph, start position, tokens)
# a recorded pass: per MoE layer index, the routed experts of each token ("route"), their
# weights ("gates") and the experts a PREFETCH node predicted ("prefetch")
PassRouting = dict[str, dict[int, Any]]


@dataclass
class RoutingTrace:
    """One sequence's routing (see the module docstring)."""

    num_experts: int
    top_k: int
    moe_layers: int
    prompt_len: int = 1
    target: dict[int, list[list[int]]] = field(default_factory=dict)
    draft: dict[int, list[list[int]]] = field(default_factory=dict)
    accept: dict[int, bool] = field(default_factory=dict)
    passes: list[tuple[PassKey, PassRouting]] = field(default_factory=list)
    # measured on the recording machine (stalls excluded): seconds summed and counted per
    # (graph, node index, tokens), and the host's time between nodes per (graph, tokens)
    node_seconds: dict[tuple[str, int, int], list[float]] = field(default_factory=dict)
    pass_overhead: dict[tuple[str, int], list[float]] = field(default_factory=dict)
    host_time_scale: float = 1.0

    @property
    def positions(self) -> int:
        """Positions with target routing: the prompt and the decode passes after it."""
        return len(self.target)

    @property
    def decode_tokens(self) -> int:
        """New tokens a decode from the prompt can make with routing for every pass."""
        return max(0, self.positions - self.prompt_len + 1)

    def to_json(self) -> dict:
        return dict(
            format=FORMAT,
            num_experts=self.num_experts,
            top_k=self.top_k,
            moe_layers=self.moe_layers,
            prompt_len=self.prompt_len,
            target={str(p): v for p, v in sorted(self.target.items())},
            draft={str(p): v for p, v in sorted(self.draft.items())},
            accept={str(p): v for p, v in sorted(self.accept.items())},
            node_seconds=[[*k, *v] for k, v in sorted(self.node_seconds.items())],
            pass_overhead=[[*k, *v] for k, v in sorted(self.pass_overhead.items())],
            host_time_scale=self.host_time_scale,
            passes=[
                dict(
                    graph=k[0],
                    pos=k[1],
                    tokens=k[2],
                    route={str(i): r for i, r in sorted(v["route"].items())},
                    gates={str(i): r for i, r in sorted(v["gates"].items())},
                    prefetch={str(i): e for i, e in sorted(v["prefetch"].items())},
                )
                for k, v in self.passes
            ],
        )

    @classmethod
    def from_json(cls, d: dict) -> RoutingTrace:
        if d.get("format") != FORMAT:
            raise ValueError(
                f"not a speq routing trace (format {d.get('format')!r}, want {FORMAT})"
            )
        return cls(
            d["num_experts"],
            d["top_k"],
            d["moe_layers"],
            d["prompt_len"],
            {int(p): v for p, v in d["target"].items()},
            {int(p): v for p, v in d["draft"].items()},
            {int(p): bool(v) for p, v in d["accept"].items()},
            [
                (
                    (x["graph"], x["pos"], x["tokens"]),
                    dict(
                        route={int(i): r for i, r in x["route"].items()},
                        gates={int(i): r for i, r in x["gates"].items()},
                        prefetch={int(i): e for i, e in x["prefetch"].items()},
                    ),
                )
                for x in d["passes"]
            ],
            {(g, i, t): [s, n] for g, i, t, s, n in d.get("node_seconds", [])},
            {(g, t): [s, n] for g, t, s, n in d.get("pass_overhead", [])},
            d.get("host_time_scale", 1.0),
        )

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json()))

    @classmethod
    def load(cls, path: str | Path) -> RoutingTrace:
        return cls.from_json(json.loads(Path(path).read_text()))
