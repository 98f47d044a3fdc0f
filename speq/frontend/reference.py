"""The adapter for speq's own reference model."""

from __future__ import annotations

import torch

from speq.ir.dtypes import DTYPE_NAMES, FLOAT_DTYPES
from speq.models.hf import supported
from speq.models.model import MoEForCausalLM
from speq.models.spec import ModelSpec


def from_reference(
    model: MoEForCausalLM, dtype: torch.dtype | None = None
) -> tuple[ModelSpec, dict[str, torch.Tensor]]:
    """The spec and the weights (detached, shared with the model unless ``dtype`` converts them)."""
    if not isinstance(model, MoEForCausalLM):
        raise TypeError(
            f"speq.compile expects a speq.models.MoEForCausalLM, a transformers causal LM of a "
            f"supported family ({supported()}) or a checkpoint folder, got {type(model).__name__}"
        )
    dtype = dtype or model.embed.dtype
    if DTYPE_NAMES.get(dtype) not in FLOAT_DTYPES:
        raise ValueError(
            f"unsupported compute dtype {dtype}: use float16, bfloat16, float32 or float64"
        )
    params = {k: v.detach().to(dtype) for k, v in model.state_dict().items()}
    return ModelSpec(model.config, dtype), params
