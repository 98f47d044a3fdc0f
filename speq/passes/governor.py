"""The governor: the Amortization Roofline cost model, and the policy it chooses.

For a speculative cycle with k drafted tokens (PAPER.md, "The Amortization Roofline Model"):

    tokens(k)  = 1 + sum_{i=1..k} prod_{j<=i} p_j        committed per cycle (the bonus included)
    T_draft(k) = (k + 1) * t_draft                        k proposals and one routing-only pass
    T_io(k)    = E_new(k) * t_copy                        experts verification needs that are not
                                                          resident when the cycle starts, one copy each
    overlap(k) = min((1 - phase2_start) * T_draft(k),     copies start with phase II, and at most
                     min(E_new(k), slots) * t_copy)       a cache's worth land before verification
    T_cycle(k) = T_draft(k) + max(0, T_io(k) - overlap(k)) + T_verify(k + 1)
    Theta(k)   = tokens(k) / T_cycle(k)                   and TPOT(k) = 1 / Theta(k)

E_new(k) = W(k) - reuse * kept(W(k)) (`CacheModel`): the window needs W(k) = layers * E * (1 -
(1 - top_k/E)^(k+1)) experts (distinct experts of k+1 uniformly routed tokens per layer), and of
those, at most kept(W) = max(0, min(W, 2 * slots - W)) can be resident when the cycle starts and
stay until they are used: a window larger than the cache's ``slots`` evicts W - slots of them on
its way through (measured: a window twice the cache copies every expert it needs). A measured
fraction ``reuse`` of that many are resident. A constant miss rate would not do. The
governor picks k* = argmax Theta(k) over [1, k_SLO], k_SLO being the largest k whose cycle fits the
time-to-first-token budget, and sizes phase II to the copies the link completes during one draft
pass. It also splits the device memory: the draft's bytes could instead be expert cache slots for
plain one-token decoding, whose TPOT is T_verify(1) + (copies per token) * t_copy; when that is
predicted faster, the policy is to drop the draft. It is a pure function of its inputs;
`Governor` re-solves k from live acceptance and reuse estimates (exponential moving averages) at
run time with the same model. The split is chosen on one calibration prompt, whose routing may
reuse experts far more than the text decoded later: `switch_to_draft` re-weighs it mid-run
against the copies per token actually observed without the draft.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from speq.models.config import MoEConfig
from speq.runtime.speculative import SpecPolicy
from speq.sim.cost import expected_distinct_experts

# The largest k the governor considers. A window's distinct experts saturate as it grows (the
# same experts serve more of its tokens), so when drafts are accepted often, long windows keep
# paying off; k_SLO (the time-to-first-token budget) caps it further.
K_MAX = 16


@dataclass(frozen=True)
class HardwareModel:
    """Seconds of the pieces of a cycle on the backend in use (measured, or from a profile)."""

    draft_pass_s: float  # one one-token draft pass
    verify_s: Mapping[int, float]  # target pass time by tokens T (interpolated between)
    copy_s: float  # one expert over the link
    source: str = "measured"

    def verify(self, tokens: int) -> float:
        pts = sorted(self.verify_s.items())
        if tokens <= pts[0][0] or len(pts) == 1:
            return pts[0][1]
        for (t0, s0), (t1, s1) in itertools.pairwise(pts):
            if tokens <= t1:
                return s0 + (s1 - s0) * (tokens - t0) / (t1 - t0)
        (t0, s0), (t1, s1) = pts[-2], pts[-1]
        return s1 + (s1 - s0) / (t1 - t0) * (tokens - t1)


@dataclass(frozen=True)
class CacheModel:
    """Which experts a window of k+1 tokens needs, and how many are resident when its cycle
    starts.

    A layer's tokens in one window are routed as if uniformly over a ``pool`` of experts (None:
    all E of them); real text reuses experts from token to token, so a window needs fewer
    distinct experts than uniform routing over all E would: W(k) = layers * pool * (1 - (1 -
    top_k/pool)^(k+1)). At most kept(W(k)) of them can be resident when the cycle starts and
    stay until used, and a fraction ``reuse`` of that many are; the rest, E_new(k), are copied
    during the cycle."""

    reuse: float  # in [0, 1]
    slots: float = math.inf  # expert cache slots
    pool: float | None = None  # effective experts per layer within a window; None: all

    def __post_init__(self) -> None:
        if not 0 <= self.reuse <= 1:
            raise ValueError(f"CacheModel.reuse must be in [0, 1], got {self.reuse}")
        if not self.slots > 0:
            raise ValueError(f"CacheModel.slots must be > 0, got {self.slots}")
        if self.pool is not None and not self.pool > 0:
            raise ValueError(f"CacheModel.pool must be > 0 or None, got {self.pool}")

    @classmethod
    def from_miss_rate(cls, miss_rate: float) -> CacheModel:
        """An unbounded cache missing ``miss_rate`` of every window's experts."""
        if not 0 <= miss_rate <= 1:
            raise ValueError(f"miss_rate must be in [0, 1], got {miss_rate}")
        return cls(1 - miss_rate)

    @classmethod
    def observed(
        cls, cfg: MoEConfig, slots: float, needs: float, new: float, tokens: float
    ) -> CacheModel:
        """The model a run showed: per cycle, ``needs`` experts at verification (over all MoE
        layers) for windows of ``tokens`` tokens, ``new`` of them copied during the cycle. A
        window twice the cache says nothing of reuse: it is then 0 (see `observed_reuse`)."""
        pool = cls.observed_pool(cfg, needs / len(cfg.moe_layers), tokens)
        return cls(cls(0.0, slots).observed_reuse(needs, new), slots, pool)

    def observed_reuse(self, needs: float, new: float) -> float:
        """The reuse a cycle showed: ``needs`` experts at verification, ``new`` of them copied
        during the cycle. A window of twice the cache or more does not show it (nothing can be
        kept); the current estimate stays."""
        kept = self.kept(needs)
        if kept <= 0:
            return self.reuse
        return min(1.0, max(0.0, (needs - new) / kept))

    def kept(self, window: float) -> float:
        """How many of a window's experts can be resident when its cycle starts and stay until
        verification uses them: all of a window that fits; of a larger one, those the W - slots
        it copies do not evict."""
        return max(0.0, min(window, 2 * self.slots - window))

    @staticmethod
    def observed_pool(cfg: MoEConfig, needs_per_layer: float, tokens: float) -> float:
        """The pool under which ``tokens`` tokens need ``needs_per_layer`` distinct experts per
        layer on average (bisection; between top_k and E)."""
        lo, hi = float(cfg.top_k), float(cfg.num_experts)
        if needs_per_layer >= distinct_experts(cfg, tokens, hi):
            return hi
        for _ in range(50):
            mid = (lo + hi) / 2
            lo, hi = (
                (mid, hi) if distinct_experts(cfg, tokens, mid) < needs_per_layer else (lo, mid)
            )
        return (lo + hi) / 2

    def window(self, cfg: MoEConfig, k: int) -> float:
        """W(k): expected experts the k+1 tokens of a window need, over all MoE layers."""
        return len(cfg.moe_layers) * distinct_experts(cfg, k + 1, self.pool)

    def new_experts(self, cfg: MoEConfig, k: int) -> float:
        """E_new(k): expected experts copied during a cycle of k drafts."""
        w = self.window(cfg, k)
        return w - self.reuse * self.kept(w)

    def largest_fitting_k(self, cfg: MoEConfig, k_max: int = K_MAX) -> int:
        """The largest k whose window fits in the cache (0: not even k = 1)."""
        return max((k for k in range(1, k_max + 1) if self.window(cfg, k) <= self.slots), default=0)

    def describe(self) -> str:
        slots = "unbounded" if math.isinf(self.slots) else f"{self.slots:g} slots"
        pool = "" if self.pool is None else f", windows routed over {self.pool:.1f} experts a layer"
        return f"reuse {self.reuse:.2f} of the cache ({slots}){pool}"


@dataclass(frozen=True)
class Estimate:
    """What the model predicts for one k."""

    k: int
    tokens_per_cycle: float
    cycle_s: float
    draft_s: float
    io_s: float
    stall_s: float
    verify_s: float

    @property
    def tpot_ms(self) -> float:
        return self.cycle_s / self.tokens_per_cycle * 1e3


@dataclass(frozen=True)
class Policy:
    """The governor's choice and the estimates behind it."""

    spec: SpecPolicy
    estimates: tuple[Estimate, ...]
    k_slo: int
    acceptance: tuple[float, ...]
    cache: CacheModel
    hardware: HardwareModel = field(repr=False)
    plain: Estimate | None = None  # one-token decoding, the draft's memory given to the cache

    @property
    def chosen(self) -> Estimate:
        return next(e for e in self.estimates if e.k == self.spec.k)

    @property
    def use_draft(self) -> bool:
        """Whether speculating at k* beats giving the draft's memory to the expert cache."""
        return self.plain is None or self.chosen.tpot_ms <= self.plain.tpot_ms

    def describe(self) -> str:
        c = self.chosen
        p = ", ".join(f"{x:.2f}" for x in self.acceptance)
        split = ""
        if self.plain is not None:
            split = (
                f"without a draft (its memory as expert cache, one token per pass): predicted "
                f"TPOT {self.plain.tpot_ms:.2f} ms, so "
                + ("speculate; " if self.use_draft else "NO DRAFT: decode one token at a time; ")
            )
        return split + (
            f"k* = {c.k} (k_SLO = {self.k_slo}): predicted TPOT {c.tpot_ms:.2f} ms, "
            f"{c.tokens_per_cycle:.2f} tokens per {c.cycle_s * 1e3:.2f} ms cycle; phases "
            f"II from {self.spec.phase2_start:.2f}, III from {self.spec.phase3_start:.2f} of the "
            f"draft, {self.spec.phase2_width} copies per pass in II; acceptance p_j = [{p}], "
            f"{self.cache.describe()}; {self.hardware.source} times: draft pass "
            f"{self.hardware.draft_pass_s * 1e3:.3f} ms, expert copy {self.hardware.copy_s * 1e3:.3f} ms"
        )


def plain_estimate(hw: HardwareModel, copies_per_token: float) -> Estimate:
    """One-token decoding without a draft (k = 0): each token pays a target pass and waits for
    its ``copies_per_token`` missing experts."""
    io = copies_per_token * hw.copy_s
    return Estimate(0, 1.0, hw.verify(1) + io, 0.0, io, io, hw.verify(1))


def switch_to_draft(
    policy: Policy,
    cfg: MoEConfig,
    copies_per_token: float,
    pool: float,
    remaining: int,
    switch_s: float,
) -> Policy | None:
    """Mid-run, decoding without a draft: speculate from here on if, at the ``copies_per_token``
    observed and with windows routed over the ``pool`` experts a layer the text has shown,
    speculating is predicted to save more than ``switch_s`` (bringing the draft back and
    refilling the smaller cache) over the ``remaining`` tokens. Returns the policy to speculate
    with (k* re-solved, within k_SLO), or None to go on without a draft."""
    cache = dataclasses.replace(policy.cache, pool=pool)
    hw, p2 = policy.hardware, policy.spec.phase2_start
    ests = tuple(estimate(e.k, cfg, hw, policy.acceptance, cache, p2) for e in policy.estimates)
    best = max(
        (e for e in ests if e.k <= policy.k_slo), key=lambda e: e.tokens_per_cycle / e.cycle_s
    )
    plain = plain_estimate(hw, copies_per_token)
    if (plain.tpot_ms - best.tpot_ms) / 1e3 * remaining <= switch_s:
        return None
    spec = dataclasses.replace(policy.spec, k=best.k)
    return dataclasses.replace(policy, spec=spec, estimates=ests, cache=cache, plain=plain)


def expected_tokens(p: Sequence[float], k: int) -> float:
    """1 + sum_{i=1..k} prod_{j<=i} p_j (positions past ``len(p)`` reuse the last estimate)."""
    total, run = 1.0, 1.0
    for i in range(k):
        run *= p[min(i, len(p) - 1)] if p else 0.0
        total += run
    return total


def distinct_experts(cfg: MoEConfig, tokens: float, pool: float | None = None) -> float:
    """Expected distinct experts per MoE layer for ``tokens`` tokens routed uniformly over
    ``pool`` experts (None: all of the layer's)."""
    return expected_distinct_experts(pool or cfg.num_experts, cfg.top_k, tokens)


def estimate(
    k: int,
    cfg: MoEConfig,
    hw: HardwareModel,
    acceptance: Sequence[float],
    cache: CacheModel,
    phase2_start: float,
) -> Estimate:
    draft = (k + 1) * hw.draft_pass_s
    new = cache.new_experts(cfg, k)
    io = new * hw.copy_s
    stall = max(0.0, io - min((1 - phase2_start) * draft, min(new, cache.slots) * hw.copy_s))
    verify = hw.verify(k + 1)
    return Estimate(
        k, expected_tokens(acceptance, k), draft + stall + verify, draft, io, stall, verify
    )


def govern(
    cfg: MoEConfig,
    hw: HardwareModel,
    acceptance: Sequence[float],
    cache: CacheModel,
    *,
    k_min: int = 1,
    k_max: int = K_MAX,
    ttft_budget_s: float = math.inf,
    phase2_start: float = 0.0,
    phase3_start: float = 0.5,
    plain_copies_per_token: float | None = None,
) -> Policy:
    """The policy of highest modelled throughput (see the module docstring).

    ``plain_copies_per_token``: experts one-token decoding copies per token when the draft's
    memory goes to the expert cache instead; given, the policy also decides that split (no
    draft at all when plain decoding is predicted faster)."""
    if not 1 <= k_min <= k_max:
        raise ValueError(f"need 1 <= k_min <= k_max, got {k_min}, {k_max}")
    ests = tuple(
        estimate(k, cfg, hw, acceptance, cache, phase2_start) for k in range(k_min, k_max + 1)
    )
    fitting = [e for e in ests if e.cycle_s <= ttft_budget_s] or [ests[0]]
    k_slo = max(e.k for e in fitting)
    best = max(fitting, key=lambda e: e.tokens_per_cycle / e.cycle_s)
    width = max(1, int(hw.draft_pass_s // hw.copy_s)) if hw.copy_s > 0 else 1
    spec = SpecPolicy(best.k, phase2_start, phase3_start, width)
    plain = None if plain_copies_per_token is None else plain_estimate(hw, plain_copies_per_token)
    return Policy(spec, ests, k_slo, tuple(acceptance), cache, hw, plain)


class Governor:
    """Re-solves k after every cycle from exponential moving averages of the per-position
    acceptance and of the cache's reuse, with the same cost model."""

    def __init__(self, policy: Policy, cfg: MoEConfig, alpha: float = 0.2) -> None:
        self.policy, self.cfg, self.alpha = policy, cfg, alpha
        self.acceptance = list(policy.acceptance) or [0.5]
        self.cache = policy.cache
        self.k_max = max(e.k for e in policy.estimates)
        self.k_min = min(e.k for e in policy.estimates)

    def update(self, tries: Sequence[bool], needs: int, new: int, k: int) -> int:
        """Fold one cycle of ``k`` drafts in: ``tries[i]`` whether draft i was accepted (given
        the ones before were); ``needs`` experts at verification, ``new`` of them copied during
        the cycle. Returns k for the next cycle."""
        a = self.alpha
        for i, ok in enumerate(tries):
            while len(self.acceptance) <= i:
                self.acceptance.append(self.acceptance[-1])
            self.acceptance[i] += a * (float(ok) - self.acceptance[i])
        if needs:
            reuse = self.cache.reuse + a * (
                self.cache.observed_reuse(needs, new) - self.cache.reuse
            )
            self.cache = dataclasses.replace(self.cache, reuse=reuse)
        return self.best_k()

    def best_k(self) -> int:
        phase2 = self.policy.spec.phase2_start

        def theta(k: int) -> float:
            e = estimate(k, self.cfg, self.policy.hardware, self.acceptance, self.cache, phase2)
            return e.tokens_per_cycle / e.cycle_s

        return max(range(self.k_min, self.policy.k_slo + 1), key=theta)
