"""`ModelSpec`: what speq needs to know of a model, independent of where its weights come from."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from speq.models.config import MoEConfig

DTYPE_NAMES: dict[torch.dtype, str] = {
    torch.float16: "f16",
    torch.bfloat16: "bf16",
    torch.float32: "f32",
    torch.float64: "f64",
    torch.int32: "i32",
    torch.int64: "i64",
}
DTYPES: dict[str, torch.dtype] = {v: k for k, v in DTYPE_NAMES.items()}


@dataclass(frozen=True)
class ModelSpec:
    """The architecture and compute dtype. Weight names follow `speq.models.MoEForCausalLM`."""

    config: MoEConfig
    dtype: torch.dtype

    @property
    def dtype_name(self) -> str:
        return DTYPE_NAMES[self.dtype]

    def expert_param(self, layer: int, which: str) -> str:
        """Name of the stacked routed-expert tensor ``w13`` or ``w2`` of a MoE layer."""
        return f"layers.{layer}.mlp.{which}"

    @property
    def head_param(self) -> str:
        return "embed" if self.config.tie_word_embeddings else "lm_head"
