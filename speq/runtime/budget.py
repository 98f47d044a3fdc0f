"""Device memory budgets: parsing "6GB" / "512MB" / bytes, the minimum a model needs, and the
workspace a GPU needs beside the weights (`workspace_estimate`)."""

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


class BudgetError(ValueError):
    """A device memory budget below what a configuration needs at the least."""


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


def parse_budget(value: int | str, name: str = "device_memory") -> Budget:
    """``123456``, ``"64MB"``, ``"1.5 GB"``, ``"512MiB"`` (1 GB = 1e9 bytes, 1 GiB = 2**30);
    ``name``: the option it is, for error messages."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"{name} must be bytes (int) or a string like '6GB', got {value!r}")
    if isinstance(value, int):
        if value <= 0:
            raise ValueError(f"{name} must be positive, got {value}")
        return Budget(value)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", value)
    unit = (m.group(2) if m else "") or "B"
    if not m or unit.upper() not in _UNITS:
        raise ValueError(
            f"cannot read {name} {value!r}: expected a number and a unit among "
            "B, KB, MB, GB, TB, KiB, MiB, GiB, TiB"
        )
    nbytes = int(float(m.group(1)) * _UNITS[unit.upper()])
    if nbytes <= 0:
        raise ValueError(f"{name} must be positive, got {value!r}")
    return Budget(nbytes, unit)


LIBRARY_WORKSPACE_BYTES = 32 * 2**20  # cuBLAS's default workspace on Hopper (8 x 4 MiB)


def workspace_estimate(cfg, itemsize: int, tokens: int = 17, captures: int = 18) -> int:
    """Bytes of device memory a GPU run needs beyond weights and the KV cache, for passes of up
    to ``tokens`` new tokens (a verification window; prefills are not counted): the transient
    activations of one pass (hidden states, q/k/v and fp32 attention scores over the whole
    context, the cache's keys and values read in fp32, the MoE intermediates and fp32
    accumulator, fp32 logits), the cuBLAS workspace, and one layer's activations for each of
    ``captures`` CUDA-graph captures (one per window size and the draft) kept in their graphs'
    private pools. An estimate from the shapes, rounded up to a MiB; a prefill of P tokens
    needs about ``num_heads * P * max_seq_len * 4`` bytes more for its scores."""
    t, h, s = tokens, cfg.hidden_size, cfg.max_seq_len
    heads, kv = cfg.num_heads, cfg.num_kv_heads
    hd = cfg.head_dim if not cfg.is_mla else cfg.head_dim + cfg.v_head_dim
    width = max(cfg.expert_intermediate_size, cfg.dense_intermediate_size or 0)
    layer = (
        6 * t * h * itemsize  # residual, normed, attention and MoE outputs
        + t * (heads + 2 * kv) * hd * itemsize  # q, k, v
        + heads * t * s * 4  # scores (fp32)
        + 2 * s * kv * hd * 4  # the cache's keys and values, read in fp32
        + t * cfg.top_k * 3 * width * itemsize  # gate/up and activated intermediates
        + t * cfg.top_k * h * 4  # the fp32 accumulator (per pair when deterministic)
    )
    total = layer + t * cfg.vocab_size * 4 + LIBRARY_WORKSPACE_BYTES + captures * layer
    return -(-total // 2**20) * 2**20


# INT4 slots shared draft memory keeps beyond one per expert the cache does not hold: the victim
# of the one copy that may be in flight while the cache is full (a second waits for it to land;
# speq.runtime.draft_slots). One, so that every full-precision slot past the first saves an INT4
# expert's bytes.
SPARE_INT4_SLOTS = 1


def int4_slots_needed(experts: int, full_slots: int) -> int:
    """INT4 slots shared draft memory needs beside a cache of ``full_slots`` among ``experts``
    experts (none when every expert fits at full precision: nothing is ever evicted)."""
    return 0 if full_slots >= experts else experts - full_slots + SPARE_INT4_SLOTS


@dataclass(frozen=True)
class SharedDraft:
    """The draft's INT4 experts sharing the experts' memory (``draft_memory="shared"``):
    ``int4_bytes`` of one expert's codes and scales, ``experts`` in all."""

    int4_bytes: int
    experts: int

    def slots(self, full_slots: int) -> int:
        return int4_slots_needed(self.experts, full_slots)


@dataclass(frozen=True)
class MemoryPlan:
    """How a budget is spent: resident non-expert weights, the KV cache, the draft, the
    workspace set aside for activations and libraries, expert slots (and under shared draft
    memory, ``int4_slots`` of the draft's INT4 experts, whose bytes ``draft_bytes`` counts)."""

    budget: Budget | None
    non_expert_bytes: int
    kv_bytes: int
    draft_bytes: int
    expert_bytes: int
    slots: int
    workspace_bytes: int = 0
    int4_slots: int = 0

    @property
    def used_bytes(self) -> int:
        return (
            self.non_expert_bytes
            + self.kv_bytes
            + self.draft_bytes
            + self.workspace_bytes
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
    workspace_bytes: int = 0,
    shared: SharedDraft | None = None,
) -> MemoryPlan:
    """Slots for as many experts as fit (at most ``max_slots``); an error below ``min_slots``.
    With ``shared``, the draft's bytes are not ``draft_bytes`` but one INT4 slot per expert
    not in a slot (`int4_slots_needed`): each full-precision slot costs its expert's INT4
    bytes less."""
    if shared is not None:
        return _plan_shared(
            budget,
            non_expert_bytes,
            kv_bytes,
            expert_bytes,
            min_slots,
            max_slots,
            workspace_bytes,
            shared,
        )
    fixed = non_expert_bytes + kv_bytes + draft_bytes + workspace_bytes
    sizes = (non_expert_bytes, kv_bytes, draft_bytes, expert_bytes)
    if budget is None:
        return MemoryPlan(None, *sizes, max_slots, workspace_bytes)
    minimum = fixed + min_slots * expert_bytes
    if budget.nbytes < minimum:
        parts = [
            f"non-expert weights {budget.format(non_expert_bytes)}",
            f"KV cache {budget.format(kv_bytes)}",
        ]
        if draft_bytes:
            parts.append(f"quantized draft experts {budget.format(draft_bytes)}")
        if workspace_bytes:
            parts.append(f"workspace {budget.format(workspace_bytes)}")
        parts.append(f"{min_slots} expert slots of {budget.format(expert_bytes)}")
        raise BudgetError(
            f"device_memory {budget.format()} is below the minimum {budget.format(minimum)}: "
            + " + ".join(parts)
        )
    slots = min(max_slots, (budget.nbytes - fixed) // expert_bytes)
    return MemoryPlan(
        budget, non_expert_bytes, kv_bytes, draft_bytes, expert_bytes, slots, workspace_bytes
    )


def _plan_shared(
    budget: Budget | None,
    non_expert_bytes: int,
    kv_bytes: int,
    expert_bytes: int,
    min_slots: int,
    max_slots: int,
    workspace_bytes: int,
    shared: SharedDraft,
) -> MemoryPlan:
    fixed = non_expert_bytes + kv_bytes + workspace_bytes

    def plan(slots: int) -> MemoryPlan:
        int4 = shared.slots(slots)
        return MemoryPlan(
            budget,
            non_expert_bytes,
            kv_bytes,
            int4 * shared.int4_bytes,
            expert_bytes,
            slots,
            workspace_bytes,
            int4,
        )

    if budget is None or plan(max_slots).used_bytes <= budget.nbytes:
        return plan(max_slots)
    minimum = plan(min_slots)
    if budget.nbytes < minimum.used_bytes:
        raise BudgetError(
            f"device_memory {budget.format()} is below the minimum "
            f"{budget.format(minimum.used_bytes)}: non-expert weights "
            f"{budget.format(non_expert_bytes)} + KV cache {budget.format(kv_bytes)}"
            + (f" + workspace {budget.format(workspace_bytes)}" if workspace_bytes else "")
            + f" + {min_slots} expert slots of {budget.format(expert_bytes)} + "
            f"{minimum.int4_slots} INT4 draft experts of {budget.format(shared.int4_bytes)}"
        )
    # below every expert: each full-precision slot costs its expert's INT4 bytes less
    room = budget.nbytes - fixed - (shared.experts + SPARE_INT4_SLOTS) * shared.int4_bytes
    slots = min(max_slots - 1, room // (expert_bytes - shared.int4_bytes))
    return plan(max(min_slots, slots))
