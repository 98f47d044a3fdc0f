"""`plan_engine_memory`: how an engine's device budget is spent (speq.runtime.budget's plan for its
model, policy, draft and options)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from speq.models.kv_cache import KVCache
from speq.runtime.budget import (
    MemoryPlan,
    SharedDraft,
    parse_budget,
    plan_memory,
    workspace_estimate,
)

if TYPE_CHECKING:
    from speq.runtime.engine import Engine


def plan_engine_memory(engine: Engine) -> MemoryPlan:
    """The plan for ``engine`` now (its draft on the device or not): the non-expert weights,
    the KV cache, the workspace, the draft (under shared draft memory, its INT4 slots beside
    the full-precision ones) and as many expert slots as fit, every size counted in the
    deployment dtype."""
    cfg, store, options = engine.config, engine.store, engine.options
    total = len(store.keys())
    if engine.policy_class.all_resident:
        min_slots = total
    elif engine.policy_class.host_only:
        min_slots = total = 0  # every routed expert is computed on the host
    elif options.cache_allocation == "per_layer":
        min_slots = cfg.top_k * len(store.layers)
    else:
        min_slots = cfg.top_k
    budget = None if options.device_memory is None else parse_budget(options.device_memory)

    def size(nbytes: int) -> int:  # bytes of a weight or cache tensor in the counted dtype
        return nbytes * engine.deployment_dtype.itemsize // engine.spec.dtype.itemsize

    draft = engine.draft
    shared = None
    if draft.shared and draft.on_device:
        shared = SharedDraft(draft.expert_int4_bytes, total)
    return plan_memory(
        budget,
        workspace_bytes=workspace_bytes(engine),
        non_expert_bytes=size(store.resident_bytes),
        kv_bytes=size(KVCache(cfg, 1, engine.spec.dtype, "meta").nbytes),
        draft_bytes=draft.device_bytes,
        expert_bytes=size(store.expert_bytes),
        min_slots=min_slots,
        max_slots=total,
        shared=shared,
    )


def workspace_bytes(engine: Engine) -> int:
    """Device memory set aside for activations and libraries (CompileOptions
    .workspace_memory, else an estimate on a GPU and nothing elsewhere)."""
    value = engine.options.workspace_memory
    if value is not None:
        return 0 if value == 0 else parse_budget(value, "workspace_memory").nbytes
    if engine.backend.device_type != "cuda":
        return 0
    return workspace_estimate(engine.config, engine.deployment_dtype.itemsize)
