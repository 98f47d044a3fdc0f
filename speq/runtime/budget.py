"""Device memory budgets: parsing "6GB" / "512MB" / bytes, and the minimum a model needs."""

from __future__ import annotations

import re
from dataclasses import dataclass

_UNITS = {
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


@dataclass(frozen=True)
class Budget:
    """A number of bytes and the unit the user wrote it in (for error messages)."""

    nbytes: int
    unit: str = "B"

    def format(self, nbytes: int | None = None) -> str:
        """``nbytes`` (default: the budget) in bytes and in the user's unit."""
        n = self.nbytes if nbytes is None else nbytes
        if self.unit == "B":
            return f"{n:,} bytes"
        return f"{n / _UNITS[self.unit.upper()]:.3f} {self.unit} ({n:,} bytes)"


def parse_budget(value: int | str) -> Budget:
    """``123456``, ``"64MB"``, ``"1.5 GB"``, ``"512MiB"`` (1 GB = 1e9 bytes, 1 GiB = 2**30)."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"device_memory must be bytes (int) or a string like '6GB', got {value!r}")
    if isinstance(value, int):
        if value <= 0:
            raise ValueError(f"device_memory must be positive, got {value}")
        return Budget(value)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", value)
    unit = (m.group(2) if m else "") or "B"
    if not m or unit.upper() not in _UNITS:
        raise ValueError(
            f"cannot read device_memory {value!r}: expected a number and a unit among "
            "B, KB, MB, GB, TB, KiB, MiB, GiB, TiB"
        )
    nbytes = int(float(m.group(1)) * _UNITS[unit.upper()])
    if nbytes <= 0:
        raise ValueError(f"device_memory must be positive, got {value!r}")
    return Budget(nbytes, unit)


@dataclass(frozen=True)
class MemoryPlan:
    """How a budget is spent: resident non-expert weights, the KV cache, the draft, expert slots."""

    budget: Budget | None
    non_expert_bytes: int
    kv_bytes: int
    draft_bytes: int
    expert_bytes: int
    slots: int

    @property
    def used_bytes(self) -> int:
        return (
            self.non_expert_bytes
            + self.kv_bytes
            + self.draft_bytes
            + self.slots * self.expert_bytes
        )


def plan_memory(
    budget: Budget | None,
    *,
    non_expert_bytes: int,
    kv_bytes: int,
    draft_bytes: int,
    expert_bytes: int,
    min_slots: int,
    max_slots: int,
) -> MemoryPlan:
    """Slots for as many experts as fit (at most ``max_slots``); an error below ``min_slots``."""
    fixed = non_expert_bytes + kv_bytes + draft_bytes
    if budget is None:
        return MemoryPlan(None, non_expert_bytes, kv_bytes, draft_bytes, expert_bytes, max_slots)
    minimum = fixed + min_slots * expert_bytes
    if budget.nbytes < minimum:
        parts = [
            f"non-expert weights {budget.format(non_expert_bytes)}",
            f"KV cache {budget.format(kv_bytes)}",
        ]
        if draft_bytes:
            parts.append(f"quantized draft experts {budget.format(draft_bytes)}")
        parts.append(f"{min_slots} expert slots of {budget.format(expert_bytes)}")
        raise ValueError(
            f"device_memory {budget.format()} is below the minimum {budget.format(minimum)}: "
            + " + ".join(parts)
        )
    slots = min(max_slots, (budget.nbytes - fixed) // expert_bytes)
    return MemoryPlan(budget, non_expert_bytes, kv_bytes, draft_bytes, expert_bytes, slots)
