"""`HardwareModel`: the seconds of the pieces of a speculative cycle on one backend."""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class HardwareModel:
    """Seconds of the pieces of a cycle on the backend in use (measured, or from a profile)."""

    draft_pass_s: float  # one one-token draft pass
    verify_s: Mapping[int, float]  # target pass time by tokens T (interpolated between)
    copy_s: float  # one expert over the link
    source: str = "measured"
    host_s: float = math.inf  # one expert computed on the host for a token (inf: no host compute)

    @property
    def miss_s(self) -> float:
        """What one expert the device does not hold costs when it is needed now: a demand copy,
        or its computation on the host where that is faster."""
        return min(self.copy_s, self.host_s)

    def wait_s(self, copies: int, host_runs: int) -> float:
        """Seconds ``copies`` expert copies and ``host_runs`` experts computed on the host cost
        (no host time where there were none: ``host_s`` is inf without host compute)."""
        return copies * self.copy_s + (host_runs * self.host_s if host_runs else 0.0)

    def verify(self, tokens: int) -> float:
        pts = sorted(self.verify_s.items())
        if tokens <= pts[0][0] or len(pts) == 1:
            return pts[0][1]
        for (t0, s0), (t1, s1) in itertools.pairwise(pts):
            if tokens <= t1:
                return s0 + (s1 - s0) * (tokens - t0) / (t1 - t0)
        (t0, s0), (t1, s1) = pts[-2], pts[-1]
        return s1 + (s1 - s0) / (t1 - t0) * (tokens - t1)
