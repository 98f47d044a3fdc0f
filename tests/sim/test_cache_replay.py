"""Per-layer expert-cache replay (speq.sim.cache_replay): hit counts by hand on a small trace,
the edge cases, Belady against a brute-force optimum, and the real Mixtral traces if present."""

from __future__ import annotations

import functools
import json
import os
import random
from pathlib import Path

import pytest

from speq.sim.cache_replay import REPLAY_POLICIES, replay, replay_belady, replay_lru
from speq.sim.traces import read_routing_log

# One sequence, two layers, top-2 of experts 0..2 (layer 0) and 5, 6 (layer 1); tokens[t][layer] = experts.
# Layer 0 with 2 slots, caches written oldest first:
#   token  experts  LRU                          Belady (next use after the token)
#   t0     [0, 1]   0 miss [0]; 1 miss [0 1]      0 miss {0}; 1 miss {0 1}
#   t1     [2, 0]   2 miss, evicts 0 -> [1 2];    2 miss: 0 is t1's own (now), 1 next at t2:
#                   0 miss, evicts 1 -> [2 0]     evicts 1 -> {0 2}; 0 hit
#   t2     [0, 1]   0 hit [2 0]; 1 miss,          0 hit; 1 miss: 0 own, 2 next at t3:
#                   evicts 2 -> [0 1]             evicts 2 -> {0 1}
#   t3     [2, 1]   2 miss, evicts 0 -> [1 2];    2 miss: 1 own, 0 never again: evicts 0
#                   1 hit                         -> {1 2}; 1 hit
#   layer 0: LRU 2 hits / 8, Belady 3 hits / 8.
# Layer 1 routes every token to [5, 6]: two compulsory misses, then 6 hits / 8 for both.
SEQ = [
    [[0, 1], [5, 6]],
    [[2, 0], [5, 6]],
    [[0, 1], [6, 5]],
    [[2, 1], [5, 6]],
]


def test_hit_counts_by_hand():
    lru, belady = replay_lru([SEQ], 2), replay_belady([SEQ], 2)
    assert (lru.layer_hits, lru.layer_lookups) == ((2, 6), (8, 8))
    assert (belady.layer_hits, belady.layer_lookups) == ((3, 6), (8, 8))
    assert (lru.hits, lru.lookups, lru.hit_rate) == (8, 16, 0.5)
    assert (belady.hits, belady.lookups, belady.hit_rate) == (9, 16, 9 / 16)
    assert belady.layer_hit_rates == (3 / 8, 6 / 8)
    assert (lru.sequences, lru.tokens, lru.layers, lru.slots_per_layer) == (1, 4, 2, 2)
    d = belady.as_dict()
    assert d["cache_policy"] == "belady" and d["hit_rate"] == 9 / 16 and d["layers"] == 2
    assert json.loads(json.dumps(d)) == d


@pytest.mark.parametrize("policy", sorted(REPLAY_POLICIES))
@pytest.mark.parametrize("slots", [3, 4, 8])
def test_enough_slots_leave_only_compulsory_misses(policy, slots):
    """N >= the experts a layer uses: one miss per (sequence, layer, distinct expert)."""
    r = replay([SEQ, SEQ[:2]], slots, policy)
    # distinct experts: SEQ's layer 0 {0 1 2}, layer 1 {5 6}; SEQ[:2]'s {0 1 2}, {5 6}
    assert r.layer_lookups == (8 + 4, 8 + 4)
    assert r.layer_hits == (8 - 3 + 4 - 3, 8 - 2 + 4 - 2)


@pytest.mark.parametrize("policy", sorted(REPLAY_POLICIES))
def test_each_sequence_starts_with_empty_caches(policy):
    once = replay([SEQ], 2, policy)
    twice = replay([SEQ, SEQ], 2, policy)
    assert (twice.hits, twice.lookups, twice.sequences) == (2 * once.hits, 2 * once.lookups, 2)
    # with room for every expert: two sequences miss each expert twice, one joined sequence once
    twice, joined = replay([SEQ, SEQ], 8, policy), replay([SEQ + SEQ], 8, policy)
    assert (twice.lookups - twice.hits, joined.lookups - joined.hits) == (2 * (3 + 2), 3 + 2)


@pytest.mark.parametrize(
    ("rows", "slots", "lru_hits", "belady_hits"),
    [
        ([[[3]]], 1, 0, 0),  # one token, one expert
        ([[[3]], [[3]], [[3]]], 1, 2, 2),  # k = 1, always the same expert
        ([[[0, 1]], [[0, 1]]], 1, 0, 0),  # N < k: each lookup evicts the one before
        ([[[0, 1]], [[1, 0]]], 1, 1, 1),  # ... unless the next token starts with it
        # N = k: a token's experts never evict each other (Belady's [2, 3] evicts 0 and 1)
        ([[[0, 1]], [[2, 3]], [[0, 1]]], 2, 0, 0),
        ([[[0, 1, 2]], [[0, 1, 2]]], 3, 3, 3),  # k = E = N
    ],
)
def test_edge_cases(rows, slots, lru_hits, belady_hits):
    assert replay_lru([rows], slots).hits == lru_hits
    assert replay_belady([rows], slots).hits == belady_hits


def test_belady_keeps_a_tokens_own_experts():
    """Cache {0 1} (both used at t2), token t1 = [2, 3] never used again: 2 evicts 0 (a tie
    at t2 goes to the lowest id), then 3 must evict 1, not the 2 just inserted."""
    rows = [[[0, 1]], [[2, 3]], [[1, 0]]]
    assert replay_belady([rows], 2).hits == 0
    # 2 evicts 0 (never used again), 3 still evicts 1, not 2; t2 then finds 2
    rows = [[[0, 1]], [[2, 3]], [[1, 2]]]
    assert replay_belady([rows], 2).hits == 1


def _fewest_misses(rows: list[list[int]], slots: int) -> int:
    """The fewest misses of any eviction choice that keeps the current token's experts (all
    choices tried)."""

    @functools.cache
    def go(t: int, j: int, cache: frozenset[int]) -> int:
        if t == len(rows):
            return 0
        if j == len(rows[t]):
            return go(t + 1, 0, cache)
        e = rows[t][j]
        if e in cache:
            return go(t, j + 1, cache)
        if len(cache) < slots:
            return 1 + go(t, j + 1, cache | {e})
        victims = [c for c in cache if c not in rows[t]]
        return 1 + min(go(t, j + 1, (cache - {c}) | {e}) for c in victims)

    return go(0, 0, frozenset())


def test_belady_misses_as_little_as_any_policy():
    rng = random.Random(0)
    for _ in range(150):
        experts = rng.randint(2, 6)
        k = rng.randint(1, min(3, experts))
        slots = rng.randint(k, experts)
        rows = [rng.sample(range(experts), k) for _ in range(rng.randint(1, 8))]
        belady = replay_belady([[[r] for r in rows]], slots)
        lru = replay_lru([[[r] for r in rows]], slots)
        best = _fewest_misses(rows, slots)
        assert belady.lookups - belady.hits == best, (rows, slots)
        assert lru.hits <= belady.hits


def test_bad_arguments():
    with pytest.raises(ValueError, match="slots_per_layer must be >= 1"):
        replay_lru([SEQ], 0)
    with pytest.raises(ValueError, match=r"unknown cache policy 'fifo'.*'lru', 'belady'"):
        replay([SEQ], 2, "fifo")
    with pytest.raises(TypeError, match="slots_per_layer must be an integer"):
        replay_lru([SEQ], 2.0)
    empty = replay_belady([], 2)
    assert (empty.hits, empty.lookups, empty.hit_rate, empty.layers) == (0, 0, 0.0, 0)


# The real traces live outside the repository (never copied into it): ../shared/traces
ROOT = Path(__file__).resolve().parents[2]
TRACES = Path(os.environ.get("SPEQ_ROUTING_TRACES", ROOT.parent / "shared" / "traces"))


@pytest.mark.skipif(not TRACES.is_dir(), reason=f"the real routing traces ({TRACES}) are absent")
@pytest.mark.parametrize("name", ["gsm8k_2_routing.jsonl", "humaneval_2_routing.jsonl"])
def test_real_mixtral_traces(name):
    log = read_routing_log(TRACES / name)
    assert (log.num_layers, log.num_experts, log.top_k, len(log.sequences)) == (32, 8, 2, 2)
    seqs = [s.tokens for s in log.sequences]
    for slots in (2, 4, 6):
        lru, belady = replay_lru(seqs, slots), replay_belady(seqs, slots)
        assert lru.lookups == belady.lookups == 2 * 32 * log.num_tokens
        assert 0 < lru.hit_rate < belady.hit_rate < 1
    full = replay_lru(seqs, 8)
    assert full.lookups - full.hits <= 2 * 32 * 8  # compulsory misses only


@pytest.mark.skipif(not TRACES.is_dir(), reason=f"the real routing traces ({TRACES}) are absent")
def test_the_reference_statistics_are_the_real_traces():
    from speq.sim.trace_gen import REFERENCE_STATS
    from speq.sim.trace_stats import fit_stats
    from speq.sim.traces import to_routing_trace

    seqs = [s for f in sorted(TRACES.glob("*.jsonl")) for s in read_routing_log(f).sequences]
    fitted = fit_stats([to_routing_trace(s, 8) for s in seqs])
    for name in ("entropy", "reuse", "coupling"):
        mean = sum(getattr(fitted, name)) / len(getattr(fitted, name))
        assert getattr(REFERENCE_STATS, name)[0] == pytest.approx(mean, abs=0.002), name
