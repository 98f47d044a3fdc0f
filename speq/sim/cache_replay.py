"""Expert-cache replay: the hit rate of a per-layer cache of N expert slots over logged routing.

Each layer has its own cache of ``slots_per_layer`` experts, empty at the start of each
sequence. The tokens go in order; a token's experts are looked up in the order the router
listed them, each a hit, or a miss that inserts the expert (evicting one when the cache is full)
before the next lookup. ``hit rate = hits / lookups`` over all sequences and layers.

The eviction policies (`REPLAY_POLICIES`):

* ``lru``: the least recently looked-up expert.
* ``belady``: the expert whose next use in this layer is farthest (Belady's MIN, which knows
  the future): the current token's own experts, those looked up already and those still to be,
  count as used now, so with N >= top_k a token never evicts one of its own; an expert not used
  again in the sequence is farthest; ties go to the lowest expert id. With N >= top_k this
  misses as little as any policy can when a token's experts must be resident together.

A sequence is ``tokens[t][layer] = experts`` (`speq.sim.traces.RoutedSequence.tokens`).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from types import MappingProxyType

__all__ = ["REPLAY_POLICIES", "CacheReplay", "replay", "replay_belady", "replay_lru"]

Tokens = Seq[Seq[Seq[int]]]  # tokens[t][layer] = the experts, in the router's order


@dataclass(frozen=True)
class CacheReplay:
    """The lookups and hits of one replay, per layer (index = the layer in the sequences)."""

    policy: str
    slots_per_layer: int
    sequences: int
    tokens: int
    layer_hits: tuple[int, ...]
    layer_lookups: tuple[int, ...]

    @property
    def layers(self) -> int:
        return len(self.layer_lookups)

    @property
    def hits(self) -> int:
        return sum(self.layer_hits)

    @property
    def lookups(self) -> int:
        return sum(self.layer_lookups)

    @property
    def hit_rate(self) -> float:
        """hits / lookups (0.0 with no lookup)."""
        return self.hits / self.lookups if self.lookups else 0.0

    @property
    def layer_hit_rates(self) -> tuple[float, ...]:
        return tuple(h / n if n else 0.0 for h, n in zip(self.layer_hits, self.layer_lookups))

    def as_dict(self) -> dict:
        return dict(
            cache_policy=self.policy,
            slots_per_layer=self.slots_per_layer,
            hit_rate=self.hit_rate,
            hits=self.hits,
            lookups=self.lookups,
            sequences=self.sequences,
            tokens=self.tokens,
            layers=self.layers,
            layer_hit_rates=list(self.layer_hit_rates),
            layer_hits=list(self.layer_hits),
            layer_lookups=list(self.layer_lookups),
        )


# A layer's replay over one sequence: (that layer's rows, one per token; slots) -> hits.
LayerReplay = Callable[[list[Seq[int]], int], int]


def _lru(rows: list[Seq[int]], slots: int) -> int:
    cache: OrderedDict[int, None] = OrderedDict()
    hits = 0
    for experts in rows:
        for e in experts:
            if e in cache:
                hits += 1
                cache.move_to_end(e)
                continue
            if len(cache) == slots:
                cache.popitem(last=False)
            cache[e] = None
    return hits


def _belady(rows: list[Seq[int]], slots: int) -> int:
    # next_use[t][e]: the first token after t that uses e (absent: never again)
    next_use: list[dict[int, int]] = [{}] * len(rows)
    upcoming: dict[int, int] = {}
    for t in range(len(rows) - 1, -1, -1):
        next_use[t] = upcoming
        upcoming = {**upcoming, **dict.fromkeys(rows[t], t)}
    cache: set[int] = set()
    hits = 0
    for t, experts in enumerate(rows):
        later = next_use[t]
        for e in experts:
            if e in cache:
                hits += 1
                continue
            if len(cache) == slots:
                cache.remove(_farthest(cache, t, experts, later))
            cache.add(e)
    return hits


def _farthest(cache: set[int], t: int, experts: Seq[int], later: dict[int, int]) -> int:
    """The cached expert used farthest ahead: token t's own count as used at t, one not in
    ``later`` (next use after t) as never; among equals, the lowest id."""
    return max(cache, key=lambda c: (t if c in experts else later.get(c, math.inf), -c))


REPLAY_POLICIES: Mapping[str, LayerReplay] = MappingProxyType({"lru": _lru, "belady": _belady})


def replay(sequences: Iterable[Tokens], slots_per_layer: int, policy: str) -> CacheReplay:
    """Replay ``sequences`` (each ``tokens[t][layer] = experts``) through a per-layer cache of
    ``slots_per_layer`` experts evicting by ``policy`` (a key of `REPLAY_POLICIES`)."""
    if policy not in REPLAY_POLICIES:
        known = tuple(REPLAY_POLICIES)
        raise ValueError(f"unknown cache policy {policy!r}: expected one of {known}")
    if isinstance(slots_per_layer, bool) or not isinstance(slots_per_layer, int):
        raise TypeError(f"slots_per_layer must be an integer, got {slots_per_layer!r}")
    if slots_per_layer < 1:
        raise ValueError(f"slots_per_layer must be >= 1, got {slots_per_layer}")
    layer_replay = REPLAY_POLICIES[policy]
    hits: list[int] = []
    lookups: list[int] = []
    count = tokens = 0
    for seq in sequences:
        count += 1
        tokens += len(seq)
        num_layers = max((len(layers) for layers in seq), default=0)
        grow = num_layers - len(hits)
        hits += [0] * grow
        lookups += [0] * grow
        for layer in range(num_layers):
            rows = [layers[layer] for layers in seq if layer < len(layers)]
            hits[layer] += layer_replay(rows, slots_per_layer)
            lookups[layer] += sum(len(r) for r in rows)
    return CacheReplay(policy, slots_per_layer, count, tokens, tuple(hits), tuple(lookups))


def replay_lru(sequences: Iterable[Tokens], slots_per_layer: int) -> CacheReplay:
    """`replay` with the ``lru`` policy: a miss evicts the least recently looked-up expert."""
    return replay(sequences, slots_per_layer, "lru")


def replay_belady(sequences: Iterable[Tokens], slots_per_layer: int) -> CacheReplay:
    """`replay` with the ``belady`` policy: a miss evicts the expert used farthest ahead (see
    the module docstring for the current token and ties)."""
    return replay(sequences, slots_per_layer, "belady")
