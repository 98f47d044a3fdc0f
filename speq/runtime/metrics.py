"""What a generate call measured, and an optional Chrome-trace timeline of compute and copies."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Counters:
    """Event counts of the expert cache and the link, accumulated over a run."""

    needs: int = 0  # (layer, expert) needs at MoE layers
    routings: int = 0  # (token, layer, top-k choice) routings those needs serve
    hits: int = 0  # needed experts resident and loaded when the layer needed them
    late: int = 0  # needed experts whose prefetch was still in flight
    demand_fetches: int = 0  # misses fetched on demand
    prefetches: int = 0  # prefetch copies issued
    prefetches_used: int = 0  # prefetched experts later needed (on time or late)
    experts_moved: int = 0
    bytes_moved: int = 0
    stall_s: float = 0.0  # time the compute waited for copies

    def minus(self, other: Counters) -> Counters:
        return Counters(
            **{
                f.name: getattr(self, f.name) - getattr(other, f.name)
                for f in dataclasses.fields(self)
            }
        )


@dataclass
class Metrics:
    """The numbers of one `generate` call. The prompt but its last token is processed first
    (``prefill_ms``, ``prefill_bytes_moved``); every other figure covers the decode phase that
    produces the ``tokens`` new tokens from there, so ``tpot_ms = decode_ms / tokens``. The
    prefetch counts cover the whole run.

    Two hit rates: ``hit_rate`` counts (layer, expert) needs, one per expert a pass uses at a
    layer however many tokens it serves; ``token_hit_rate`` counts the passes' routings (token,
    layer, top-k choice) and charges each copy the compute waited for as one miss, so it equals
    ``hit_rate`` when each pass decodes one token, while at speculative verification one copy
    serves every token of the window routed to that expert. ``stalls_per_token`` divides those
    copies by the new tokens, so the work spent on rejected drafts counts against it.
    Times are wall-clock milliseconds on the
    cpu and cuda backends and virtual milliseconds on the sim backend. Readable as ``m.x`` or
    ``m["x"]``."""

    policy: str
    backend: str
    prompt_tokens: int
    tokens: int  # new tokens generated
    prefill_ms: float
    tpot_ms: float  # decode time per output token
    decode_ms: float
    hit_rate: float  # needed experts resident and loaded when their layer needed them
    covered_rate: float  # needed experts resident or already being copied (no demand fetch)
    stalls_per_token: float  # copies the compute waited for (demand or late), per new token
    token_hit_rate: float  # routings whose expert needed no copy the compute waited for
    needs: int
    hits: int
    late: int
    demand_fetches: int
    experts_moved: int
    bytes_moved: int
    prefetches_issued: int
    prefetches_used: int
    prefetches_wasted: int
    stall_ms: float
    prefill_bytes_moved: int
    cache_slots: int
    extra: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, key: str) -> Any:
        if key in self.extra:
            return self.extra[key]
        if key in {f.name for f in dataclasses.fields(self)}:
            return getattr(self, key)
        raise KeyError(key)

    def __getattr__(self, key: str) -> Any:
        extra = self.__dict__.get("extra", {})
        if key in extra:
            return extra[key]
        raise AttributeError(key)

    def keys(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self) if f.name != "extra"] + list(self.extra)

    def as_dict(self) -> dict[str, Any]:
        return {k: self[k] for k in self.keys()}


class Timeline:
    """Spans on a compute lane and a copy lane, written as Chrome trace JSON (chrome://tracing,
    Perfetto)."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def span(self, lane: str, name: str, start_s: float, end_s: float, **args: Any) -> None:
        self.events.append(
            {
                "name": name,
                "ph": "X",
                "pid": 0,
                "tid": lane,
                "ts": start_s * 1e6,
                "dur": max(end_s - start_s, 0.0) * 1e6,
                "args": args,
            }
        )

    def write(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps({"traceEvents": self.events, "displayTimeUnit": "ms"}))
