"""The offloading policies, by name: `POLICIES` (name → class) is the registry that options are
validated against and runs look policies up in. Each says how experts get onto the device:

- ``speq``: a quantized draft predicts the experts and they are prefetched while it drafts
  (speq.runtime.speculative).
- ``resident``: every expert is on the device from the start (the compute bound).
- ``ondemand``: an LRU cache; a miss is fetched when the layer needs it (Mixtral-Offloading
  without speculation).
- ``nextgate``: ``ondemand`` plus, at each MoE layer, a prefetch of the experts that the *next*
  layer's router picks for the current hidden state (Mixtral-Offloading's speculative loading).
- ``hostcompute``: no expert on the device: the host computes every routed expert from host
  memory and only activations move (the layout of llama.cpp's ``--n-cpu-moe`` and KTransformers).
- ``fiddler``: experts placed on the device when the model loads (every slot filled, an equal
  share of each layer's), the misses computed on the host instead of copied whenever that
  finishes first by the cost model, else copied into an LRU cache (Fiddler, arXiv 2402.07033: at
  one token the host nearly always wins, so the placement stays as loaded).
- ``oracle``: knows the run's routing from a first recording pass. It plans Belady's fetches
  offline (each miss evicts the resident expert whose next use is farthest) and issues each one
  as early as its slot allows: right after the last use of the expert it replaces. It moves the
  fewest experts a demand-paged cache of that size can, each as early as possible: the I/O bound.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import torch

from speq.cost import Policy
from speq.runtime.cache import next_use_from_schedule
from speq.runtime.link import Priority
from speq.runtime.offload import OffloadPolicy, OffloadRuntime
from speq.runtime.speculative import Speq
from speq.runtime.store import ExpertKey

Schedule = Sequence[tuple[int, frozenset[int]]]  # (layer, experts) of every need, in order


class Resident(OffloadPolicy):
    name = "resident"
    all_resident = True


class OnDemand(OffloadPolicy):
    name = "ondemand"


class NextGate(OffloadPolicy):
    """Prefetching happens at the PREFETCH nodes that insert_prefetch places for this policy."""

    name = "nextgate"
    next_layer_prefetch = True


class HostCompute(OffloadPolicy):
    name = "hostcompute"
    host_compute = True
    host_only = True

    def host_experts(self, rt: OffloadRuntime, layer: int, tokens: Mapping[int, int]) -> list[int]:
        return list(tokens)


class Fiddler(OffloadPolicy):
    """``always``: every miss on the host, whatever the cost model says (speq's draftless runs
    under ``CompileOptions.host_compute=True``)."""

    name = "fiddler"
    host_compute = True
    places_at_load = True

    def __init__(self, always: bool = False) -> None:
        self.always = always

    def host_experts(self, rt: OffloadRuntime, layer: int, tokens: Mapping[int, int]) -> list[int]:
        return rt.host_choice(layer, tokens, self.always)


def draftless(host_compute: bool | str, governed: Policy | None = None) -> OffloadPolicy:
    """What speq runs without its draft: ``ondemand``'s policy (every miss copied) where
    ``host_compute`` (`CompileOptions.host_compute`) is False or, under ``"auto"``, where the
    governor's calibration (``governed``) measured it waiting less for its misses than
    ``fiddler``'s (misses computed on the host where faster, by the cost model; with
    ``host_compute=True``, every miss)."""
    if host_compute is False or (
        host_compute == "auto" and governed is not None and not governed.plain_host
    ):
        return OnDemand()
    return Fiddler(host_compute is True)


@dataclass(frozen=True)
class PlannedFetch:
    """Fetch ``key`` for need ``need``, into ``victim``'s slot (None: a free slot), once the
    needs up to ``after`` (the victim's last use before ``need``) are done."""

    need: int
    key: ExpertKey
    victim: ExpertKey | None
    after: int


def belady_plan(
    schedule: Schedule, group_of: Mapping[int, int], capacity: Sequence[int]
) -> list[PlannedFetch]:
    """Belady's demand fetches for ``schedule`` in slot groups of the given capacities."""
    at = next_use_from_schedule(list(schedule))
    resident: dict[int, set[ExpertKey]] = {}
    last_use: dict[ExpertKey, int] = {}
    plan = []
    for p, (layer, experts) in enumerate(schedule):
        g = group_of[layer]
        group = resident.setdefault(g, set())
        keys = {ExpertKey(layer, e) for e in experts}
        for key in sorted(keys - group, key=lambda k: k.expert):
            victim, after = None, -1
            if len(group) >= capacity[g]:
                nxt = at(p + 1)
                victim = max(group - keys, key=lambda k: (nxt(k), -last_use[k], k.expert))
                group.remove(victim)
                after = last_use[victim]
            group.add(key)
            plan.append(PlannedFetch(p, key, victim, after))
        for key in keys:
            last_use[key] = p
    return plan


class Oracle(OffloadPolicy):
    name = "oracle"
    eviction = "lookahead"
    knows_future = True

    @classmethod
    def for_run(cls, engine: Any, prompt: torch.Tensor, n: int, sampling: Any) -> Oracle:
        """Record the run's routing first (a virtual-clock pass; its cost is not measured)."""
        return cls(*engine.record_needs(prompt, n, sampling))

    def __init__(
        self, schedule: Schedule, group_of: Mapping[int, int], capacity: Sequence[int]
    ) -> None:
        self.schedule = list(schedule)
        self.plan = belady_plan(self.schedule, group_of, capacity)
        self._at = next_use_from_schedule(self.schedule)
        self.position = -1
        self._issued = 0

    def next_use(self, key: ExpertKey) -> float:
        return (
            self._at(max(self.position, 0))(key) if self.position < len(self.schedule) else math.inf
        )

    def before_ensure(self, rt: OffloadRuntime, layer: int, experts: Sequence[int]) -> None:
        self.position += 1
        p = self.position
        if p >= len(self.schedule) or self.schedule[p] != (layer, frozenset(experts)):
            raise RuntimeError(
                f"oracle: need {p} (layer {layer}, experts {list(experts)}) differs from the recording"
            )
        # every planned fetch whose slot is free by now, in the order of need (none is needed
        # for an expert already cached: where every expert fits, all are preloaded)
        while self._issued < len(self.plan) and self.plan[self._issued].after < p:
            f = self.plan[self._issued]
            if f.key not in rt.cache:
                rt.fetch_into(f.key, f.victim, Priority.NORMAL)
            self._issued += 1


POLICIES: Mapping[str, type[OffloadPolicy]] = MappingProxyType(
    {p.name: p for p in (Speq, Resident, OnDemand, NextGate, HostCompute, Fiddler, Oracle)}
)


def get_policy(name: str) -> type[OffloadPolicy]:
    """The policy class called ``name``, or a ValueError listing those that exist."""
    try:
        return POLICIES[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown policy {name!r}: expected one of {tuple(POLICIES)}") from None
