"""Simulation: hardware profiles, model presets at paper scale, and the per-node cost model."""

from speq.sim.cost import (
    NodeCost,
    expected_distinct_experts,
    link_seconds,
    node_cost,
    node_seconds,
    resolve_dim,
    step_breakdown,
    step_cost,
    step_seconds,
)
from speq.sim.presets import (
    MODEL_PRESETS,
    active_params,
    expert_bytes,
    expert_params,
    get_preset,
    non_expert_bytes,
    non_expert_params,
    total_params,
)
from speq.sim.profiles import PROFILES, HardwareProfile, get_profile
from speq.sim.trace_gen import DEFAULT_ACCEPTANCE, DEFAULT_AGREEMENT, generate_trace, with_draft
from speq.sim.trace_stats import (
    TraceStats,
    compare_stats,
    fit_stats,
    measure_stats,
    trace_stats_table,
)

__all__ = [
    "DEFAULT_ACCEPTANCE",
    "DEFAULT_AGREEMENT",
    "MODEL_PRESETS",
    "PROFILES",
    "HardwareProfile",
    "NodeCost",
    "TraceStats",
    "active_params",
    "compare_stats",
    "expected_distinct_experts",
    "expert_bytes",
    "expert_params",
    "fit_stats",
    "generate_trace",
    "get_preset",
    "get_profile",
    "link_seconds",
    "measure_stats",
    "node_cost",
    "node_seconds",
    "non_expert_bytes",
    "non_expert_params",
    "resolve_dim",
    "step_breakdown",
    "step_cost",
    "step_seconds",
    "total_params",
    "trace_stats_table",
    "with_draft",
]
