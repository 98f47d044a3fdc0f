"""`CacheModel`: which experts a window of k+1 tokens needs, and how many of them are already
resident when its cycle starts (see speq.cost.roofline for where it enters the cost model)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from speq.models.config import MoEConfig
from speq.sim.cost import expected_distinct_experts

# The largest k the governor considers. A window's distinct experts saturate as it grows (the
# same experts serve more of its tokens), so when drafts are accepted often, long windows keep
# paying off; k_SLO (the time-to-first-token budget) caps it further.
K_MAX = 16


@dataclass(frozen=True)
class CacheModel:
    """Which experts a window of k+1 tokens needs, and how many are resident when its cycle
    starts.

    A layer's tokens in one window are routed as if uniformly over a ``pool`` of experts (None:
    all E of them); real text reuses experts from token to token, so a window needs fewer
    distinct experts than uniform routing over all E would: W(k) = layers * pool * (1 - (1 -
    top_k/pool)^(k+1)). At most kept(W(k)) of them can be resident when the cycle starts and
    stay until used, and a fraction of that many are; the rest, E_new(k), are copied during the
    cycle. That fraction depends on the window's length (a short window's prefetches churn the
    cache more per token than a long one's): ``measured`` holds it for the k's a probe or a run
    measured, `reuse_for` interpolates between them, and ``reuse`` serves where none was."""

    reuse: float  # in [0, 1]
    slots: float = math.inf  # expert cache slots
    pool: float | None = None  # effective experts per layer within a window; None: all
    measured: tuple[tuple[int, float], ...] = ()  # (k, reuse) measured at k, ascending k

    def __post_init__(self) -> None:
        if not 0 <= self.reuse <= 1:
            raise ValueError(f"CacheModel.reuse must be in [0, 1], got {self.reuse}")
        if not self.slots > 0:
            raise ValueError(f"CacheModel.slots must be > 0, got {self.slots}")
        if self.pool is not None and not self.pool > 0:
            raise ValueError(f"CacheModel.pool must be > 0 or None, got {self.pool}")
        ks = [k for k, _ in self.measured]
        if ks != sorted(set(ks)) or not all(0 <= r <= 1 for _, r in self.measured):
            raise ValueError(
                f"CacheModel.measured must be ascending in k, reuse in [0, 1]: {self.measured}"
            )

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

    def observed_reuse(self, needs: float, new: float, k: int | None = None) -> float:
        """The reuse a cycle of ``k`` drafts showed: ``needs`` experts at verification, ``new``
        of them copied during the cycle. A window of twice the cache or more does not show it
        (nothing can be kept); the current estimate (at ``k``) stays."""
        kept = self.kept(needs)
        if kept <= 0:
            return self.reuse if k is None else self.reuse_for(k)
        return min(1.0, max(0.0, (needs - new) / kept))

    def reuse_for(self, k: int) -> float:
        """The reuse of windows of ``k`` drafts: as measured at ``k``; between two measured k's,
        linear in k; beyond them, the nearest one's; ``reuse`` where none was measured."""
        if not self.measured:
            return self.reuse
        lower = [(j, r) for j, r in self.measured if j <= k] or [self.measured[0]]
        upper = [(j, r) for j, r in self.measured if j >= k] or [self.measured[-1]]
        (j0, r0), (j1, r1) = lower[-1], upper[0]
        return r0 if j0 == j1 else r0 + (r1 - r0) * (k - j0) / (j1 - j0)

    def measured_at(self, k: int, reuse: float) -> CacheModel:
        """This model with ``reuse`` measured at ``k`` (replacing an earlier measurement there)."""
        pairs = {**dict(self.measured), k: reuse}
        return dataclasses.replace(self, reuse=reuse, measured=tuple(sorted(pairs.items())))

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
        return w - self.reuse_for(k) * self.kept(w)

    def largest_fitting_k(self, cfg: MoEConfig, k_max: int = K_MAX) -> int:
        """The largest k whose window fits in the cache (0: not even k = 1)."""
        return max((k for k in range(1, k_max + 1) if self.window(cfg, k) <= self.slots), default=0)

    def describe(self) -> str:
        slots = "unbounded" if math.isinf(self.slots) else f"{self.slots:g} slots"
        pool = "" if self.pool is None else f", windows routed over {self.pool:.1f} experts a layer"
        reuse = f"reuse {self.reuse:.2f}"
        if len(self.measured) > 1:
            reuse = "reuse " + ", ".join(f"{r:.2f} at k = {k}" for k, r in self.measured)
        return f"{reuse} of the cache ({slots}){pool}"


def distinct_experts(cfg: MoEConfig, tokens: float, pool: float | None = None) -> float:
    """Expected distinct experts per MoE layer for ``tokens`` tokens routed uniformly over
    ``pool`` experts (None: all of the layer's)."""
    return expected_distinct_experts(pool or cfg.num_experts, cfg.top_k, tokens)
