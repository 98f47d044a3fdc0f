"""Transformers-style layer-wise offloading, in closed form: the baseline of
``from_pretrained(device_map="auto", max_memory=...)``.

accelerate fills the device with whole modules in order and leaves the rest on the host; an
offloaded module's weights are copied to the device by a hook before each forward call and
dropped after it, synchronously, so every decode step moves every offloaded layer again and
nothing overlaps the copies. Modelled here: the non-expert weights and the KV cache stay on the
device (more generous than accelerate, which streams whole decoder layers, attention included),
then the MoE layers' experts fill what is left, whole layers in order; each other MoE layer's
experts, all of them (three weight tensors each), cross the link every step, one copy per
tensor at the profile's link rate and latency.
"""

from __future__ import annotations

from dataclasses import dataclass

from speq.models.config import MoEConfig
from speq.sim.presets import expert_bytes
from speq.sim.profiles import HardwareProfile

__all__ = ["LayerwiseOffload", "layerwise_offload"]

TENSORS_PER_EXPERT = 3  # gate, up and down projections: one copy each


@dataclass(frozen=True)
class LayerwiseOffload:
    """Per decode step: MoE layers whose experts stay resident and that are streamed, the bytes
    streamed and the seconds the copies take (on top of the compute, which they do not
    overlap). ``hit_rate``: the fraction of routed experts found on the device."""

    resident_layers: int
    streamed_layers: int
    bytes_per_token: int
    copy_seconds: float

    @property
    def hit_rate(self) -> float:
        return self.resident_layers / (self.resident_layers + self.streamed_layers)


def layerwise_offload(
    cfg: MoEConfig,
    profile: HardwareProfile,
    budget_bytes: int,
    fixed_bytes: int,
    bytes_per_param: float = 2,
) -> LayerwiseOffload:
    """Layer-wise offloading of ``cfg`` in ``budget_bytes`` of device memory, ``fixed_bytes`` of
    which hold the non-expert weights and the KV cache (a ValueError when they do not fit)."""
    if fixed_bytes > budget_bytes:
        raise ValueError(
            f"layer-wise offloading: the non-expert weights and KV cache ({fixed_bytes:,} bytes) "
            f"exceed the budget ({budget_bytes:,} bytes)"
        )
    layer = cfg.num_experts * expert_bytes(cfg, bytes_per_param)
    moe_layers = len(cfg.moe_layers)
    resident = min(moe_layers, (budget_bytes - fixed_bytes) // layer)
    streamed = moe_layers - resident
    copies = streamed * cfg.num_experts * TENSORS_PER_EXPERT
    seconds = streamed * layer / (profile.link_gbps * 1e9) + copies * profile.link_latency_us * 1e-6
    return LayerwiseOffload(resident, streamed, streamed * layer, seconds)
