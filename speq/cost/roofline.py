"""The Amortization Roofline cost model, and the policy it chooses (`govern`).

For a speculative cycle with k drafted tokens (PAPER.md, "The Amortization Roofline Model"):

    tokens(k)  = 1 + sum_{i=1..k} prod_{j<=i} p_j        committed per cycle (the bonus included)
    T_draft(k) = (k + 1) * t_draft                        k proposals and one routing-only pass
    T_io(k)    = E_new(k) * t_copy                        experts verification needs that are not
                                                          resident when the cycle starts, one copy each
    overlap(k) = min((1 - phase2_start) * T_draft(k),     copies start with phase II, and at most
                     min(E_new(k), slots) * t_copy)       a cache's worth land before verification
    T_cycle(k) = T_draft(k) + T_stall(k) + T_verify(k + 1),  T_stall(k) = max(0, T_io(k) - overlap(k))
    with host compute faster than a copy (t_host < t_copy), the experts not landed by then are
    computed on the host instead: T_stall(k) = (E_new(k) - overlap(k) / t_copy) * t_host
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
plain one-token decoding, whose TPOT is T_verify(1) + the seconds a token waits for its misses
(measured: copies, and experts computed on the host where the draftless policy does that);
when that is predicted faster, the policy is to drop the draft. It is a pure function of its inputs;
`Governor` re-solves k from live acceptance and reuse estimates (exponential moving averages) at
run time with the same model. The split is chosen on one calibration prompt, whose routing may
reuse experts far more than the text decoded later: `switch_to_draft` re-weighs it mid-run
against the copies per token actually observed without the draft.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from speq.cost.cache import K_MAX, CacheModel
from speq.cost.hardware import HardwareModel
from speq.cost.phases import SpecPolicy
from speq.models.config import MoEConfig


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
    plain_host: bool = False  # whether that decoding computes misses on the host (fiddler's way)

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
                "without a draft (its memory as expert cache, one token per pass, misses "
                + ("computed on the host where faster" if self.plain_host else "copied")
                + "): predicted "
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
            + (
                f", expert on the host {self.hardware.host_s * 1e3:.3f} ms"
                if math.isfinite(self.hardware.host_s)
                else ""
            )
        )


def plain_estimate(hw: HardwareModel, io_s: float) -> Estimate:
    """One-token decoding without a draft (k = 0): each token pays a target pass and waits
    ``io_s`` seconds for its missing experts (copied, or computed on the host)."""
    return Estimate(0, 1.0, hw.verify(1) + io_s, 0.0, io_s, io_s, hw.verify(1))


def switch_to_draft(
    policy: Policy,
    cfg: MoEConfig,
    io_s: float,
    pool: float,
    remaining: int,
    switch_s: float,
) -> Policy | None:
    """Mid-run, decoding without a draft: speculate from here on if, at the ``io_s`` a token
    was observed to wait for its misses and with windows routed over the ``pool`` experts a layer the text has shown,
    speculating is predicted to save more than ``switch_s`` (bringing the draft back and
    refilling the smaller cache) over the ``remaining`` tokens. Returns the policy to speculate
    with (k* re-solved, within k_SLO), or None to go on without a draft."""
    cache = dataclasses.replace(policy.cache, pool=pool)
    hw, p2 = policy.hardware, policy.spec.phase2_start
    ests = tuple(estimate(e.k, cfg, hw, policy.acceptance, cache, p2) for e in policy.estimates)
    best = max(
        (e for e in ests if e.k <= policy.k_slo), key=lambda e: e.tokens_per_cycle / e.cycle_s
    )
    plain = plain_estimate(hw, io_s)
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
    landed = min((1 - phase2_start) * draft, min(new, cache.slots) * hw.copy_s)
    stall = max(0.0, io - landed)
    if hw.host_s < hw.copy_s:  # what does not land by verification is computed on the host
        stall = min(stall, (new - landed / hw.copy_s) * hw.host_s)
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
    plain_io_s: float | None = None,
    plain_host: bool = False,
) -> Policy:
    """The policy of highest modelled throughput (see the module docstring).

    ``plain_io_s``: seconds one-token decoding waits for its misses a token when the draft's
    memory goes to the expert cache instead (``plain_host``: computing them on the host where
    faster, else copying each); given, the policy also decides that split (no draft at all when
    plain decoding is predicted faster)."""
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
    plain = None if plain_io_s is None else plain_estimate(hw, plain_io_s)
    return Policy(spec, ests, k_slo, tuple(acceptance), cache, hw, plain, plain_host)


@dataclass(frozen=True)
class Calibration:
    """What the governor decides from, measured on the backend in use: pass and copy times,
    acceptance by draft position, the cache model (routing pool and reuse), the seconds a token
    of one-token decoding with the draft's memory as cache waits for its misses (None: that
    split is not weighed) and whether it computes them on the host, and the time-to-first-token
    budget of one cycle."""

    hardware: HardwareModel
    acceptance: tuple[float, ...]
    cache: CacheModel
    plain_io_s: float | None = None
    plain_host: bool = False
    ttft_budget_s: float = math.inf

    def govern(self, cfg: MoEConfig) -> Policy:
        """`govern` on these measurements."""
        return govern(
            cfg,
            self.hardware,
            self.acceptance,
            self.cache,
            ttft_budget_s=self.ttft_budget_s,
            plain_io_s=self.plain_io_s,
            plain_host=self.plain_host,
        )
