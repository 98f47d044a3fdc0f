"""`SpecPolicy`: the speculative plan the governor chooses: k, and the three prefetch phases
over a cycle's draft passes (PAPER.md, step 2)."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_K = 4  # SpecPolicy's default k (speq.compile with k=None lets the governor choose)


@dataclass(frozen=True)
class SpecPolicy:
    """The speculative policy: ``k`` drafted tokens per cycle, and the prefetch phases over the
    k+1 draft passes of a cycle. Pass s is in phase I while ``s < phase2_start * (k+1)``, in phase
    III from ``phase3_start * (k+1)`` on, in phase II between; phase II starts at most
    ``phase2_width`` copies per draft pass."""

    k: int = DEFAULT_K
    phase2_start: float = 0.0
    phase3_start: float = 0.5
    phase2_width: int = 2

    def __post_init__(self) -> None:
        if not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"k must be an int >= 1, got {self.k!r}")
        if not 0 <= self.phase2_start <= self.phase3_start <= 1:
            raise ValueError("phase boundaries must satisfy 0 <= phase2_start <= phase3_start <= 1")
        if self.phase2_width < 0:
            raise ValueError(f"phase2_width must be >= 0, got {self.phase2_width}")

    def phase(self, s: int, k: int) -> int:
        """The phase (1, 2 or 3) of draft pass ``s`` of ``k + 1``; the last pass is always in
        phase III, as drafting ends there."""
        if s >= k or s >= self.phase3_start * (k + 1):
            return 3
        return 2 if s >= self.phase2_start * (k + 1) else 1
