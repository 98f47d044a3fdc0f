"""`Governor`: the online side of the cost model, re-solving k after every cycle."""

from __future__ import annotations

from collections.abc import Sequence

from speq.cost.roofline import Policy, estimate
from speq.models.config import MoEConfig


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
        if needs:  # the reuse of windows of this k
            was = self.cache.reuse_for(k)
            reuse = was + a * (self.cache.observed_reuse(needs, new, k) - was)
            self.cache = self.cache.measured_at(k, reuse)
        return self.best_k()

    def best_k(self) -> int:
        phase2 = self.policy.spec.phase2_start

        def theta(k: int) -> float:
            e = estimate(k, self.cfg, self.policy.hardware, self.acceptance, self.cache, phase2)
            return e.tokens_per_cycle / e.cycle_s

        return max(range(self.k_min, self.policy.k_slo + 1), key=theta)
