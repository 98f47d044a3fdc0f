"""`ExpertCache`: which experts occupy which device slots, who is using them, and who goes next.

The cache is bookkeeping only: the slot pool (device tensors) and the copies live elsewhere. A
slot holds one expert; an entry is *pinned* while a running step uses it and *loading* until its
copy completes. Neither a pinned nor a loading entry is ever evicted. Slots are allocated from one
global group or from a fixed group per MoE layer.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

from speq.runtime.link import Copy
from speq.runtime.store import ExpertKey

EVICTIONS = ("lru", "lfu", "lookahead")
ALLOCATIONS = ("global", "per_layer")

# Next known use of an expert, in any increasing unit (smaller = sooner); math.inf if unknown.
NextUse = Callable[[ExpertKey], float]


class NoSlotError(RuntimeError):
    pass


@dataclass(eq=False)
class Entry:
    key: ExpertKey
    slot: int
    copy: Copy | None = None  # None: preloaded, readable
    pins: int = 0
    last_use: int = 0
    uses: int = 0
    prefetched: bool = False  # brought in by a prefetch and not used yet
    loading: bool = field(default=False)
    failed: BaseException | None = None  # its copy failed for good: no longer cached


class ExpertCache:
    def __init__(
        self,
        num_slots: int,
        layers: Iterable[int],
        num_experts: int,
        *,
        allocation: str = "global",
        eviction: str = "lru",
        next_use: NextUse | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        layers = tuple(layers)
        if allocation not in ALLOCATIONS:
            raise ValueError(
                f"unknown cache allocation {allocation!r}: expected one of {ALLOCATIONS}"
            )
        if eviction not in EVICTIONS:
            raise ValueError(f"unknown eviction policy {eviction!r}: expected one of {EVICTIONS}")
        if eviction == "lookahead" and next_use is None:
            raise ValueError("lookahead eviction needs a next_use function")
        self.num_slots, self.layers, self.num_experts = num_slots, layers, num_experts
        self.allocation, self.eviction, self.next_use = allocation, eviction, next_use
        if allocation == "global":
            self.group_of = dict.fromkeys(layers, 0)
            groups = [list(range(num_slots))]
        else:
            per = num_slots // len(layers)
            self.group_of = {layer: g for g, layer in enumerate(layers)}
            groups = [list(range(g * per, (g + 1) * per)) for g in range(len(layers))]
        self._free: list[list[int]] = [list(reversed(g)) for g in groups]
        self.group_slots = [len(g) for g in groups]
        self.entries: dict[ExpertKey, Entry] = {}
        # LRU order, oldest first: entries never used in insertion order, then used ones by
        # last use (a dict keeps the order; touch moves an entry to the end)
        self._unused: dict[ExpertKey, Entry] = {}
        self._used: dict[ExpertKey, Entry] = {}
        self.slot_owner: list[ExpertKey | None] = [None] * num_slots
        self._clock = 0
        # expert id -> slot per layer (-1: not resident), read by the fused MoE kernels
        self.slot_tables = {
            layer: torch.full((num_experts,), -1, dtype=torch.int32, device=device)
            for layer in layers
        }
        self.evicted_prefetches = 0
        # called with an entry about to lose its slot (its weights still there): the shared
        # draft memory's demotion (speq.runtime.draft_slots)
        self.on_evict: Callable[[Entry], None] | None = None

    # ------------------------------------------------------------------ queries
    def capacity(self, layer: int) -> int:
        """The most experts of ``layer`` that can be resident at once."""
        return self.group_slots[self.group_of[layer]]

    def get(self, key: ExpertKey) -> Entry | None:
        return self.entries.get(key)

    def __contains__(self, key: ExpertKey) -> bool:
        return key in self.entries

    def __len__(self) -> int:
        return len(self.entries)

    # ------------------------------------------------------------------ updates
    def touch(self, entry: Entry) -> None:
        self._clock += 1
        entry.last_use = self._clock
        entry.uses += 1
        if self._unused.pop(entry.key, None) is None:
            self._used.pop(entry.key, None)
        self._used[entry.key] = entry

    def pin(self, entry: Entry) -> None:
        entry.pins += 1

    def unpin(self, entry: Entry) -> None:
        if entry.pins <= 0:
            raise RuntimeError(f"expert {entry.key} unpinned more often than pinned")
        entry.pins -= 1

    def insert(
        self,
        key: ExpertKey,
        protect: frozenset[ExpertKey] = frozenset(),
        victim: ExpertKey | None = None,
    ) -> Entry:
        """A slot for ``key``: ``victim``'s when given, else a free one, else the eviction
        policy's victim's. Raises `NoSlotError` when every slot of the group is pinned, loading
        or protected."""
        if key in self.entries:
            raise ValueError(f"expert {key} is already cached")
        group = self.group_of[key.layer]
        if victim is not None:
            if victim not in self.entries or self.group_of[victim.layer] != group:
                raise ValueError(
                    f"cannot put {key} in the slot of {victim}: not cached in its group"
                )
            slot = self.evict(self.entries[victim])
        elif self._free[group]:
            slot = self._free[group].pop()
        else:
            victim = self.victim(group, protect)
            if victim is None:
                raise NoSlotError(
                    f"no evictable slot for {key}: all {self.group_slots[group]} busy"
                )
            slot = self.evict(victim)
        entry = Entry(key, slot)
        self.entries[key] = entry
        self._unused[key] = entry
        self.slot_owner[slot] = key
        self.slot_tables[key.layer][key.expert] = slot
        return entry

    def has_free(self, layer: int) -> bool:
        """Whether ``layer``'s group has a free slot (an insert then evicts nothing)."""
        return bool(self._free[self.group_of[layer]])

    def evict(self, entry: Entry) -> int:
        if entry.pins or entry.loading:
            raise RuntimeError(f"cannot evict {entry.key}: pinned or loading")
        if self.on_evict is not None:
            self.on_evict(entry)
        self._forget(entry)
        self.slot_owner[entry.slot] = None
        self.slot_tables[entry.key.layer][entry.key.expert] = -1
        if entry.prefetched:
            self.evicted_prefetches += 1
        return entry.slot

    def discard(self, entry: Entry) -> None:
        """Drop an entry whose copy failed for good, pinned or not: its slot is free again and
        the expert is no longer resident (it holds no valid weights)."""
        self._forget(entry)
        self.slot_owner[entry.slot] = None
        self.slot_tables[entry.key.layer][entry.key.expert] = -1
        self._free[self.group_of[entry.key.layer]].append(entry.slot)

    def _forget(self, entry: Entry) -> None:
        del self.entries[entry.key]
        if self._unused.pop(entry.key, None) is None:
            self._used.pop(entry.key, None)

    def victim(self, group: int, protect: frozenset[ExpertKey] = frozenset()) -> Entry | None:
        """The entry to evict from ``group``, or None if none may go."""
        if self.eviction == "lru":  # the first that may go, in LRU order
            for order in (self._unused, self._used):
                for e in order.values():
                    if (
                        not e.pins
                        and not e.loading
                        and self.group_of[e.key.layer] == group
                        and e.key not in protect
                    ):
                        return e
            return None
        cands = [
            e
            for e in self.entries.values()
            if self.group_of[e.key.layer] == group
            and not e.pins
            and not e.loading
            and e.key not in protect
        ]
        if not cands:
            return None
        if self.eviction == "lfu":
            return min(cands, key=lambda e: (e.uses, e.last_use))
        return max(cands, key=lambda e: (self.next_use(e.key), -e.last_use))

    def evictable_for(self, key: ExpertKey, before: float) -> bool:
        """Whether a slot for ``key`` can be had without evicting an entry needed before ``before``
        (prefetching's "do no harm" rule)."""
        group = self.group_of[key.layer]
        if self._free[group]:
            return True
        v = self.victim(group)
        return v is not None and (self.next_use is None or self.next_use(v.key) > before)

    def check_invariants(self) -> None:
        """The residency table matches the slot owners and the per-layer slot tables."""
        assert len(self.entries) <= self.num_slots
        for key, e in self.entries.items():
            assert self.slot_owner[e.slot] == key, (key, e.slot)
            assert int(self.slot_tables[key.layer][key.expert]) == e.slot
            assert e.pins >= 0
        owned = [k for k in self.slot_owner if k is not None]
        assert len(owned) == len(self.entries) == len(set(owned))
        for layer, table in self.slot_tables.items():
            for expert, slot in enumerate(table.tolist()):
                key = ExpertKey(layer, expert)
                assert (slot == -1) == (key not in self.entries), (key, slot)
        free = sum(len(f) for f in self._free)
        assert free + len(self.entries) == sum(self.group_slots)


def next_use_from_schedule(schedule: list[tuple[int, frozenset[int]]]) -> Callable[[int], NextUse]:
    """From a schedule of needs ``[(layer, experts), ...]`` in execution order, a function that for
    a position p returns the `NextUse` function "first need at or after p" (Belady's rule)."""
    import bisect

    positions: dict[ExpertKey, list[int]] = {}
    for p, (layer, experts) in enumerate(schedule):
        for e in experts:
            positions.setdefault(ExpertKey(layer, e), []).append(p)

    def at(p: int) -> NextUse:
        def next_use(key: ExpertKey) -> float:
            lst = positions.get(key)
            if not lst:
                return math.inf
            i = bisect.bisect_left(lst, p)
            return lst[i] if i < len(lst) else math.inf

        return next_use

    return at
