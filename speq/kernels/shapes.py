"""Routed-expert shapes of the MoE models speq targets, shared by the tuner and the benchmarks.

Only the routed experts matter to the fused MoE kernel: Qwen1.5-MoE's shared expert and
DeepSeek-V2-Lite's shared experts and leading dense layer are ordinary dense MLPs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

__all__ = ["PRESETS", "MoEShape", "get_shape"]


@dataclass(frozen=True)
class MoEShape:
    """One MoE layer: E routed experts, top-k of them per token, each expert
    ``w13 [2I, H]`` (gate rows then up rows) and ``w2 [H, I]``."""

    name: str
    num_experts: int
    top_k: int
    hidden: int
    intermediate: int

    def expert_bytes(self, bytes_per_weight: float) -> float:
        """Bytes of one expert's three matrices (gate, up, down)."""
        return 3 * self.hidden * self.intermediate * bytes_per_weight

    def scaled(self, divisor: int) -> MoEShape:
        """The same layer with hidden and intermediate sizes divided by ``divisor`` (for CPU runs)."""
        return MoEShape(
            f"{self.name}/{divisor}",
            self.num_experts,
            self.top_k,
            max(1, self.hidden // divisor),
            max(1, self.intermediate // divisor),
        )


PRESETS: Mapping[str, MoEShape] = MappingProxyType(
    {
        s.name: s
        for s in (
            MoEShape("mixtral-8x7b", num_experts=8, top_k=2, hidden=4096, intermediate=14336),
            MoEShape("phi-3.5-moe", num_experts=16, top_k=2, hidden=4096, intermediate=6400),
            MoEShape("qwen1.5-moe-a2.7b", num_experts=60, top_k=4, hidden=2048, intermediate=1408),
            MoEShape("deepseek-v2-lite", num_experts=64, top_k=6, hidden=2048, intermediate=1408),
        )
    }
)


def get_shape(name: str) -> MoEShape:
    """The preset called ``name`` (case-insensitive)."""
    try:
        return PRESETS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown model preset {name!r}; known: {', '.join(PRESETS)}") from None
