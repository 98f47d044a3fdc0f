"""The Amortization Roofline cost model (PAPER.md): the hardware and cache models, the estimate of
one speculative cycle, `govern` (the policy of highest modelled throughput), the online
`Governor`, the prefetch-phase plan `SpecPolicy`, and the roofline plot. A leaf: it imports the
model configuration and the per-node cost model (speq.sim), nothing of the passes, the runtime
or the compiler, which all read it."""

from speq.cost.cache import K_MAX, CacheModel, distinct_experts
from speq.cost.governor import Governor
from speq.cost.hardware import HardwareModel
from speq.cost.phases import DEFAULT_K, SpecPolicy
from speq.cost.roofline import (
    Calibration,
    Estimate,
    Policy,
    estimate,
    expected_tokens,
    govern,
    plain_estimate,
    switch_to_draft,
)

__all__ = [
    "DEFAULT_K",
    "K_MAX",
    "CacheModel",
    "Calibration",
    "Estimate",
    "Governor",
    "HardwareModel",
    "Policy",
    "SpecPolicy",
    "distinct_experts",
    "estimate",
    "expected_tokens",
    "govern",
    "plain_estimate",
    "switch_to_draft",
]
