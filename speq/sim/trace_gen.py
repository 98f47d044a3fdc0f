"""Synthetic routing traces with the statistics of recorded ones (speq.sim.trace_stats), at any
shape (experts E, top-k, MoE layers, length): for shapes no recorded model has.

`generate_trace` takes the statistics in their shape-free form (a rate's excess over its random
baseline; per-layer lists by relative depth) and draws:

* per layer, a popularity: Zipf over a seeded random ranking of the experts, p(rank r) ∝
  (r + 1)^-s, with s such that sets of k drawn from it one by one without replacement have the
  fitted usage entropy (floored at log k / log E: all use on k experts);
* the target's experts, in order, per position t and layer l: the first is, with probability c,
  the expert linked to the previous layer's first (of the same popularity rank), else with
  probability ρ one of position t-1's experts, else a fresh draw from the popularity (redrawn
  with probability δ if it is the expert the links fitted so far predict); each further one is,
  with probability ρ, an expert of t-1 not yet chosen, else a fresh draw among those not
  chosen. A fresh draw avoids t-1's experts with probability γ;
* the draft's i-th expert: the target's i-th with probability α (if not already chosen), else a
  fresh draw, which avoids the target's experts with probability β;
* acceptance per position from ``prompt_len`` on: the stationary two-state Markov chain.

The choices interact (a linked expert may be in t-1's set, a copied one may be the linked
one), so c, δ, ρ, γ, α and β are solved at each position from running estimates of how often each
kind of choice hits by chance, and nudged by the shortfall of the rate so far (a feedback with
a time constant of 16 positions): the rates of a generated trace, as `fit_stats` measures them,
come out at their targets, coupling as measured out of sample (each position's first expert
against the most frequent successor on the positions before it). Likewise every 16 positions
the fresh draws are reweighed towards each expert's usage share. A first-order chain cannot
have both reuse well below what its popularity gives independently and that skew (a greedy
decode caught in a loop routes periodically: skewed, yet rarely alike twice running): it keeps
the reuse, and the entropy comes out higher (by 0.04 on such a trace of the demo model).
"""

from __future__ import annotations

import math
import random
from bisect import bisect_right
from collections.abc import Sequence
from functools import lru_cache

import numpy as np

from speq.sim.routing_trace import RoutingTrace
from speq.sim.trace_stats import TraceStats

__all__ = [
    "DEFAULT_ACCEPTANCE",
    "DEFAULT_AGREEMENT",
    "REFERENCE_STATS",
    "generate_trace",
    "with_draft",
]

# Used when neither the statistics (a target-only trace) nor the caller give them. Assumed, on
# the conservative side: the shipped demo model's INT4 draft routes 97-100% of the target's
# experts and is accepted 98% of the time, a tiny random model's 91-100% and 85%, both on
# greedy decodes that fall into loops.
DEFAULT_AGREEMENT = 0.9
DEFAULT_ACCEPTANCE = (0.75, 0.85)  # P(accept), P(accept | previous accepted)

# The real Mixtral-8x7B routing logs' statistics (four GSM8K and HumanEval problems, 577 decode
# tokens; speq.sim.traces), as fit_stats measures them, averaged over layers: usage entropy 0.989
# of uniform, reuse 0.375 (1.5x random), coupling 0.267 (cross-validated; 2.1x random). What
# `speq simulate --model` generates from when no trace is given; tests/sim checks them against
# the logs where they are present.
REFERENCE_STATS = TraceStats(8, 2, 577, (0.989, 0.989), (0.375, 0.375), (0.267,))

_ZIPF_GRID = np.concatenate([np.linspace(0.0, 2.0, 41)[:-1], np.geomspace(2.0, 32.0, 16)])
_CALIBRATION_DRAWS = 4000
_TAU = 16.0  # positions over which a shortfall of a rate is made up


def generate_trace(
    stats: TraceStats,
    num_experts: int,
    top_k: int,
    moe_layers: int,
    tokens: int,
    prompt_len: int = 1,
    seed: int = 0,
    *,
    agreement: float | Sequence[float] | None = None,
    acceptance: float | tuple[float, float] | None = None,
) -> RoutingTrace:
    """A trace of the given shape with ``stats``' statistics (module docstring): target and
    draft routing for ``prompt_len + tokens`` positions, acceptance for each position from
    ``prompt_len`` on. Deterministic in ``seed``.

    ``agreement``: the draft-target agreement at this shape, one rate or one per layer, instead
    of the statistics' (or `DEFAULT_AGREEMENT` where they have none). ``acceptance``: P(accept)
    (positions independent) or (P(accept), P(accept | previous accepted)), instead of the
    statistics' (or `DEFAULT_ACCEPTANCE`)."""
    E, k, L, n = num_experts, top_k, moe_layers, prompt_len + tokens
    for name, value in (("num_experts", E), ("top_k", k), ("moe_layers", L), ("tokens", tokens)):
        if value < 1:
            raise ValueError(f"generate_trace: {name} must be at least 1, got {value}")
    if k > E:
        raise ValueError(f"generate_trace: top_k = {k} exceeds num_experts = {E}")
    if prompt_len < 1:
        raise ValueError(f"generate_trace: prompt_len must be at least 1, got {prompt_len}")
    agree = _agreement_rates(stats, agreement, E, k, L)
    p_acc, p_stay = _acceptance_chain(stats, acceptance)
    rng = random.Random(seed)

    zipf = _zipf_exponents(_resample(stats.entropy, L), E, k)
    reuse = _transfer(stats.excess("reuse"), L, k / E)
    coupling = [0.0, *_transfer(stats.excess("coupling"), L - 1, 1 / E)]  # into layer l
    layers = [
        _Layer(rng.sample(range(E), E), _zipf(s, E), _inclusion(s, E, k) / k, k) for s in zipf
    ]  # fmt: skip
    target = [[[0] * k for _ in range(L)] for _ in range(n)]
    for i in range(L):  # layer by layer: a layer's first experts link to the previous layer's
        link = {e: layers[i].ids[r] for r, e in enumerate(layers[i - 1].ids)} if i else None
        layers[i].fill_target(rng, target, i, link, coupling[i], reuse[i])
    draft = [[[] for _ in range(L)] for _ in range(n)]
    for i in range(L):
        layers[i].fill_draft(rng, target, draft, i, agree[i])
    accept = _accept_chain(rng, p_acc, p_stay, range(prompt_len, n))
    return RoutingTrace(
        E,
        k,
        L,
        prompt_len,
        target=dict(enumerate(target)),
        draft=dict(enumerate(draft)),
        accept=accept,
    )


def with_draft(
    trace: RoutingTrace,
    seed: int = 0,
    *,
    agreement: float | Sequence[float] | None = None,
    acceptance: float | tuple[float, float] | None = None,
) -> RoutingTrace:
    """``trace``'s target routing (a target-only trace, such as a routing log's) with draft
    routing and acceptance drawn as `generate_trace` draws them: the draft's disagreeing picks
    from each layer's expert usage in ``trace``; ``agreement`` and ``acceptance`` as there
    (default `DEFAULT_AGREEMENT`, `DEFAULT_ACCEPTANCE`). Deterministic in ``seed``."""
    E, k, L = trace.num_experts, trace.top_k, trace.moe_layers
    positions = sorted(trace.target)
    if positions != list(range(len(positions))):
        raise ValueError("with_draft: the trace's target routing must cover positions 0..n-1")
    stats = TraceStats(E, k, len(positions), (1.0,) * L, (0.0,) * L, (0.0,) * max(L - 1, 0))
    agree = _agreement_rates(stats, agreement, E, k, L)
    p_acc, p_stay = _acceptance_chain(stats, acceptance)
    rng = random.Random(seed)
    target = [trace.target[p] for p in positions]
    draft: list[list[list[int]]] = [[[] for _ in range(L)] for _ in positions]
    for i in range(L):
        counts = np.ones(E)  # add-one: an expert the trace never routes to may still be drafted
        for rows in target:
            counts[rows[i]] += 1
        ids = sorted(range(E), key=lambda e: (-counts[e], e))
        share = counts[ids] / counts.sum()
        _Layer(ids, share, share, k).fill_draft(rng, target, draft, i, agree[i])
    return RoutingTrace(
        E,
        k,
        L,
        trace.prompt_len,
        target=dict(trace.target),
        draft=dict(enumerate(draft)),
        accept=_accept_chain(rng, p_acc, p_stay, range(trace.prompt_len, len(positions))),
    )


def _accept_chain(rng: random.Random, p_acc: float, p_stay: float, positions: range) -> dict:
    """Acceptance at ``positions`` from the stationary two-state chain (P(accept) ``p_acc``,
    P(accept | previous accepted) ``p_stay``)."""
    accept, state = {}, rng.random() < p_acc
    p_go = p_acc * (1 - p_stay) / (1 - p_acc) if p_acc < 1 else 1.0  # P(accept | rejected)
    for p in positions:
        accept[p] = state
        state = rng.random() < (p_stay if state else p_go)
    return accept


class _Layer:
    """One MoE layer's generator: its popularity (``ids[r]``: the expert of rank r; ``cum``:
    cumulative weights by rank) and the running estimates its choices are solved from."""

    def __init__(self, ids: list[int], p: np.ndarray, usage: np.ndarray, k: int) -> None:
        """``p[r]``: the popularity of the expert of rank r; ``usage[r]``: the share of the
        layer's choices it gets when sets of k are drawn from ``p``."""
        self.ids, self.p, self.usage = ids, p, usage
        self.rank = {e: r for r, e in enumerate(ids)}
        self.used, self.positions, self.gain = [0] * len(ids), 0, np.ones(len(ids))
        self.cum = np.cumsum(p).tolist()
        self.fresh_hit = k * float(usage @ usage)  # P(a fresh draw is in an independent set)

    def count(self, row: list[int]) -> None:
        """Counts ``row``'s experts as used; every 16 positions, reweighs the fresh draws by how
        far each expert's use is from its share (which copies, links and avoidance change)."""
        for e in row:
            self.used[self.rank[e]] += 1
        self.positions += 1
        if self.positions % 16 == 0:
            used = np.array(self.used, dtype=np.float64)
            ratio = (self.usage * used.sum() + 4) / (used + 4)
            self.gain = np.clip(self.gain * np.sqrt(ratio), 1 / 64, 64)
            self.cum = np.cumsum(self.p * self.gain).tolist()

    def pick(self, rng: random.Random, chosen: list[int], avoid: Sequence[int] = ()) -> int:
        """A fresh draw from the popularity, excluding ``chosen`` (and ``avoid`` if it leaves
        any)."""
        ids, cum = self.ids, self.cum
        for _ in range(8):
            e = ids[min(bisect_right(cum, rng.random() * cum[-1]), len(ids) - 1)]
            if e not in chosen and e not in avoid:
                return e
        left = [r for r, e in enumerate(ids) if e not in chosen and e not in avoid]
        if not left:
            return self.pick(rng, chosen)
        weights = [cum[r] - (cum[r - 1] if r else 0.0) for r in left]
        return ids[rng.choices(left, weights=weights)[0]]

    def fill_target(self, rng, target, layer: int, link, coupling: float, reuse: float) -> None:
        """target[t][layer] for every position t (module docstring). ``link``: an expert of the
        previous layer -> the one of the same rank here (None at the first layer)."""
        k, prev = len(target[0][layer]), None
        fresh, linked = _Hits(self.fresh_hit), _Hits(self.fresh_hit)
        unlinked, on_link = _Hits(1 / len(self.ids)), _Hits(1.0)
        coupled, reused = _Steer(coupling), _Steer(reuse)
        seen: dict[tuple[int, int], int] = {}  # (top at layer-1, top here) -> count
        best: dict[int, int] = {}  # top at layer-1 -> its most frequent successor so far
        for rows in target:
            row = rows[layer]
            c = shun = 0.0
            a = guess = -1
            if link:  # coupling = c on_link + (1 - c) unlinked, as hits of the guess
                a = rows[layer - 1][0]
                guess = best.get(a, link[a])
                want = coupled.want()
                c = _mix(want, unlinked.p, on_link.p)
                shun = 1 - want / unlinked.p if want < unlinked.p else 0.0
            rho = avoid = 0.0
            if prev is not None:  # k reuse = c linked + (k - c) (rho + (1 - rho) fresh)
                want = (k * reused.want() - c * linked.p) / max(k - c, 1e-9)
                rho = _mix(want, fresh.p)
                avoid = 1 - want / fresh.p if want < fresh.p else 0.0
            u = rng.random()
            if u < c:
                row[0] = link[a]
                on_link.add(row[0] == guess)
                if prev is not None:
                    linked.add(row[0] in prev)
            else:
                if prev is not None and u < c + (1 - c) * rho:
                    row[0] = prev[rng.randrange(k)]
                else:
                    row[0] = self._fresh(rng, row[:0], prev, avoid, fresh)
                if link:
                    unlinked.add(row[0] == guess)
                    if row[0] == guess and rng.random() < shun:
                        row[0] = self.pick(rng, [], (guess,))
            if link:
                coupled.add(row[0] == guess)
                n = seen[a, row[0]] = seen.get((a, row[0]), 0) + 1
                if n > seen.get((a, guess), 0):
                    best[a] = row[0]
            for i in range(1, k):
                left = [e for e in prev if e not in row[:i]] if prev is not None else []
                if left and rng.random() < rho:
                    row[i] = left[rng.randrange(len(left))]
                else:
                    row[i] = self._fresh(rng, row[:i], prev, avoid, fresh)
            if prev is not None:
                reused.add(sum(e in prev for e in row) / k)
            self.count(row)
            prev = row

    def _fresh(self, rng, chosen, prev, avoid: float, fresh: _Hits) -> int:
        """A fresh draw that avoids ``prev`` (a set to hit or avoid) with probability ``avoid``;
        the unavoiding ones update ``fresh``, the estimate of how often they land in it."""
        if prev is None:
            return self.pick(rng, chosen)
        if avoid and rng.random() < avoid:
            return self.pick(rng, chosen, prev)
        e = self.pick(rng, chosen)
        fresh.add(e in prev)
        return e

    def fill_draft(self, rng, target, draft, layer: int, agreement: float) -> None:
        """draft[t][layer] for every position t: each expert is the target's with probability
        alpha (agreement = alpha + (1 - alpha) fresh), else a fresh draw, which avoids the
        target's experts with probability gamma (agreement below chance)."""
        fresh, agreed = _Hits(self.fresh_hit), _Steer(agreement)
        for rows, out in zip(target, draft):
            tgt, row = rows[layer], out[layer]
            want = agreed.want()
            alpha = _mix(want, fresh.p)
            avoid = 1 - want / fresh.p if want < fresh.p else 0.0
            for e in tgt:
                if rng.random() < alpha and e not in row:
                    row.append(e)
                else:
                    row.append(self._fresh(rng, row, tgt, avoid, fresh))
            agreed.add(sum(e in row for e in tgt) / len(tgt))


class _Hits:
    """A running hit rate, starting at ``prior`` (worth 8 draws)."""

    __slots__ = ("hits", "n")

    def __init__(self, prior: float) -> None:
        self.hits, self.n = 8.0 * prior, 8.0

    def add(self, hit: float) -> None:
        self.hits += hit
        self.n += 1

    @property
    def p(self) -> float:
        return self.hits / self.n


class _Steer(_Hits):
    """A rate steered to ``target``: `want` is the target plus the shortfall so far over
    `_TAU` positions."""

    __slots__ = ("target",)

    def __init__(self, target: float) -> None:
        self.hits = self.n = 0.0
        self.target = target

    def want(self) -> float:
        return min(1.0, max(0.0, self.target + (self.target * self.n - self.hits) / _TAU))


def _resample(values: Sequence[float], n: int) -> list[float]:
    """``values`` over n layers by relative depth (linear interpolation)."""
    if n <= 0:
        return []
    if len(values) == n:
        return list(values)
    if len(values) == 1:
        return [values[0]] * n
    return np.interp(np.linspace(0, 1, n), np.linspace(0, 1, len(values)), values).tolist()


def _transfer(excess: Sequence[float] | None, n: int, baseline: float) -> list[float]:
    """Rates at a shape of random ``baseline`` with the given per-layer ``excess`` (a negative
    one scales the baseline down)."""
    e = _resample(excess or [0.0], n)
    return [baseline + x * (1 - baseline) if x >= 0 else baseline * (1 + x) for x in e]


def _mix(target: float, chance: float, hit: float = 1.0) -> float:
    """The mixing probability m with m hit + (1 - m) chance = target, in [0, 1]."""
    if hit <= chance:
        return float(target > chance)
    return min(1.0, max(0.0, (target - chance) / (hit - chance)))


def _zipf(s: float, E: int) -> np.ndarray:
    w = np.arange(1, E + 1, dtype=np.float64) ** -s
    return w / w.sum()


def _inclusion(s: float, E: int, k: int) -> np.ndarray:
    """Per rank, the probability that k draws from Zipf(s) one by one without replacement
    include it (Monte Carlo: Gumbel keys from a fixed stream)."""
    if k >= E:
        return np.ones(E)
    keys = np.log(_zipf(s, E)) + _gumbel(E)
    top = np.argpartition(-keys, k - 1, axis=1)[:, :k]
    return np.bincount(top.ravel(), minlength=E) / _CALIBRATION_DRAWS


@lru_cache(maxsize=8)
def _gumbel(E: int) -> np.ndarray:
    u = np.random.default_rng(12345).random((_CALIBRATION_DRAWS, E))
    return -np.log(-np.log(u))


def _zipf_exponents(entropy: Sequence[float], E: int, k: int) -> list[float]:
    """Per layer, the Zipf exponent whose drawn sets have usage entropy ``entropy`` (normalised;
    clamped to what Zipf reaches)."""
    if k >= E:
        return [0.0] * len(entropy)
    h = np.array([_set_entropy(_inclusion(s, E, k)) for s in _ZIPF_GRID])
    h = np.minimum.accumulate(h)  # monotone in s despite the sampling noise
    return [float(np.interp(-x, -h, _ZIPF_GRID)) for x in entropy]


def _set_entropy(inclusion: np.ndarray) -> float:
    q = inclusion[inclusion > 0] / inclusion.sum()
    return float(-(q * np.log(q)).sum() / math.log(len(inclusion)))


def _agreement_rates(stats: TraceStats, agreement, E: int, k: int, L: int) -> list[float]:
    if agreement is None:
        if stats.agreement is not None:
            return _transfer(stats.excess("agreement"), L, k / E)
        agreement = DEFAULT_AGREEMENT
    rates = [agreement] * L if isinstance(agreement, (int, float)) else list(agreement)
    if len(rates) != L or not all(0 <= a <= 1 for a in rates):
        raise ValueError(
            f"generate_trace: agreement must be a rate in [0, 1] or one per layer ({L}), "
            f"got {agreement!r}"
        )
    return [float(a) for a in rates]


def _acceptance_chain(stats: TraceStats, acceptance) -> tuple[float, float]:
    """(P(accept), P(accept | previous accepted)), the latter raised to the least a stationary
    chain allows, (2p - 1) / p."""
    if acceptance is None:
        if stats.accept is None:
            acceptance = DEFAULT_ACCEPTANCE
        else:
            after = stats.accept_after_accept
            acceptance = (stats.accept, stats.accept if after is None else after)
    p, stay = (acceptance, acceptance) if isinstance(acceptance, (int, float)) else acceptance
    if not (0 <= p <= 1 and 0 <= stay <= 1):
        raise ValueError(f"generate_trace: acceptance rates must be in [0, 1], got {acceptance}")
    return float(p), max(float(stay), (2 * p - 1) / p if p > 0 else 0.0)
