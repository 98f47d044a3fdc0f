"""`ModelSpec`: what speq needs to know of a model, independent of where its weights come from."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from speq.models.config import MoEConfig


@dataclass(frozen=True)
class ModelSpec:
    """The architecture and compute dtype. Weight names follow `speq.models.MoEForCausalLM`."""

    config: MoEConfig
    dtype: torch.dtype

    def expert_param(self, layer: int, which: str) -> str:
        """Name of the stacked routed-expert tensor ``w13`` or ``w2`` of a MoE layer."""
        return f"layers.{layer}.mlp.{which}"

    @property
    def head_param(self) -> str:
        return "embed" if self.config.tie_word_embeddings else "lm_head"
