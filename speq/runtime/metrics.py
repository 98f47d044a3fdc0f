"""What a generate call measured, and an optional Chrome-trace timeline of compute and copies."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

# Every key of `Metrics`, in order: (unit, meaning). The same keys for every policy and run; a
# figure that does not apply to a run is None. Times are wall-clock ms on the cpu and cuda
# backends and virtual ms (from the hardware profile) on the sim backend.
FIELDS: Mapping[str, tuple[str, str]] = MappingProxyType(
    {
        "policy": ("name", "the policy that ran (CompileOptions.policy)"),
        "backend": ("name", "the backend it ran on"),
        "prompt_tokens": ("tokens", "prompt length"),
        "tokens": ("tokens", "new tokens generated"),
        "prefill_ms": ("ms", "processing the prompt but its last token"),
        "tpot_ms": ("ms / token", "decode time per new token: decode_ms / tokens"),
        "decode_ms": ("ms", "time to decode the new tokens"),
        "hit_rate": (
            "fraction",
            "(layer, expert) needs resident and loaded when needed (host-computed ones are not)",
        ),
        "covered_rate": ("fraction", "needs resident or already being copied (no demand fetch)"),
        "stalls_per_token": ("copies / token", "copies the compute waited for, per new token"),
        "token_hit_rate": (
            "fraction",
            "(token, layer, top-k choice) routings whose expert needed no waited-for copy",
        ),
        "needs": ("count", "(layer, expert) needs while decoding"),
        "hits": ("count", "of which resident and loaded"),
        "late": ("count", "of which still being copied by a prefetch"),
        "demand_fetches": ("count", "of which not cached: fetched on demand"),
        "experts_moved": ("count", "expert copies started while decoding (retries included)"),
        "bytes_moved": (
            "bytes",
            "bytes over the link while decoding, in the deployment dtype (memory_dtype)",
        ),
        "prefetches_issued": ("count", "prefetch copies over the whole run"),
        "prefetches_used": ("count", "prefetched experts later needed"),
        "prefetches_wasted": ("count", "prefetched experts evicted or left unused"),
        "stall_ms": (
            "ms",
            "time the compute waited for copies (and for host compute) while decoding",
        ),
        "prefill_bytes_moved": ("bytes", "bytes over the link during the prefill (as bytes_moved)"),
        "cache_slots": ("slots", "expert cache slots (full-precision experts on the device)"),
        "full_precision_slots": (
            "experts",
            "experts held at full precision (cached, copy landed) when the run ended",
        ),
        "demotions": (
            "count",
            "evicted full-precision experts quantized into the draft's INT4 slots while decoding "
            '(CompileOptions.draft_memory="shared"; 0 otherwise)',
        ),
        "copy_retries": ("count", "failed copies that were tried again"),
        "host_expert_runs": (
            "count",
            "(layer, expert) needs computed on the host instead of the device while decoding",
        ),
        "host_compute_ms": ("ms", "time the host spent computing them (its own lane)"),
        "draft_bytes": (
            "bytes",
            "the draft's quantized experts on the device at the end; None: no draft",
        ),
        "calibration_s": (
            "s",
            "wall-clock time of the governor's calibration this run's policy came from (not in "
            "any other time); None: no governor",
        ),
        "switched_to_draft_after": (
            "tokens",
            "new tokens decoded before the run switched to the draft; None: it did not",
        ),
        "acceptance_rate": ("fraction", "accepted drafted tokens / drafted tokens (speq)"),
        "tokens_per_cycle": ("tokens", "committed tokens per draft-verify cycle (speq)"),
        "acceptance_by_position": ("fractions", "acceptance of the i-th drafted token (speq)"),
        "cycles": ("count", "draft-verify cycles (speq)"),
        "k_per_cycle": ("tokens", "tokens drafted in each cycle (speq)"),
        "elb_precision": ("fraction", "predicted experts that verification used (speq)"),
        "elb_recall": ("fraction", "experts verification used that were predicted (speq)"),
        "elb_precision_by_layer": ("fractions", "elb_precision by MoE layer (speq)"),
        "elb_recall_by_layer": ("fractions", "elb_recall by MoE layer (speq)"),
        "verify_hit_rate": ("fraction", "hit_rate of the verification passes (speq)"),
        "verify_covered_rate": ("fraction", "covered_rate of the verification passes (speq)"),
        "verify_miss_rate": ("fraction", "1 - verify_hit_rate (speq)"),
        "verify_new_rate": ("fraction", "verification needs copied during their cycle (speq)"),
        "verify_needs": ("count", "(layer, expert) needs of the verification passes (speq)"),
        "draft_ms": ("ms", "time spent drafting (speq)"),
        "verify_ms": ("ms", "time spent verifying (speq)"),
    }
)


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
    copy_retries: int = 0  # failed copies tried again
    host_expert_runs: int = 0  # (layer, expert) computations done on the host
    host_s: float = 0.0  # time the host spent on them
    demotions: int = 0  # evicted full-precision experts quantized into INT4 slots

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
    cpu and cuda backends and virtual milliseconds on the sim backend. `FIELDS` lists every key
    with its unit and meaning; every run has them all. Readable as ``m.x`` or
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
    copy_retries: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        """``extra`` holds every key of `FIELDS` that is not a field (None where not given)."""
        fields = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(self.extra) - set(FIELDS))
        if unknown:
            raise ValueError(f"Metrics: undocumented keys {unknown} (add them to FIELDS)")
        self.extra = {k: self.extra.get(k) for k in FIELDS if k not in fields}

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
        """Every key of `FIELDS`, in its order."""
        return list(FIELDS)

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
