"""speq's kernels: top-k routing, token->expert alignment, the fused MoE layer (dense and
weight-only INT4/INT8) and its autotuning.

Each kernel has a public module (input checks, allocation, launch, a ``*_torch`` reference)
with its ``@triton.jit`` code in a private ``_*_kernels.py`` module. Triton is optional: without
it (or for CPU tensors) every public function runs its torch implementation.
"""

from speq.kernels._triton import HAS_TRITON
from speq.kernels.alignment import ExpertPlan, align_experts
from speq.kernels.autotune import KernelConfig, default_config, get_config
from speq.kernels.fused_moe import fused_moe, fused_moe_torch
from speq.kernels.moe_cpu import expert_ffn
from speq.kernels.quant import QuantizedExperts, quantize_experts
from speq.kernels.routing import route_topk, route_topk_torch
from speq.kernels.shapes import PRESETS, MoEShape

__all__ = [
    "HAS_TRITON",
    "PRESETS",
    "ExpertPlan",
    "KernelConfig",
    "MoEShape",
    "QuantizedExperts",
    "align_experts",
    "default_config",
    "expert_ffn",
    "fused_moe",
    "fused_moe_torch",
    "get_config",
    "quantize_experts",
    "route_topk",
    "route_topk_torch",
]
