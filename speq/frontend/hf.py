"""A live transformers model as speq's spec and weights, through its family's mapping
(speq.models.hf). transformers itself is never imported here: the model is recognised by its class
name and its config, so `import speq` works without transformers installed."""

from __future__ import annotations

import torch

from speq.ir.dtypes import DTYPE_NAMES, FLOAT_DTYPES
from speq.models.hf import family_of, supported
from speq.models.spec import ModelSpec


def is_hf_model(model: object) -> bool:
    """Whether ``model`` is a transformers model (a module with a transformers config)."""
    return isinstance(model, torch.nn.Module) and hasattr(
        getattr(model, "config", None), "model_type"
    )


def from_hf_model(
    model: torch.nn.Module, dtype: torch.dtype | None = None
) -> tuple[ModelSpec, dict[str, torch.Tensor]]:
    """The spec and weights of a transformers ``...ForCausalLM`` of a supported family: detached
    views of its parameters (shared with the model unless ``dtype`` converts them)."""
    name = type(model).__name__
    family = family_of(model.config.model_type, name)
    if name not in family.classes:
        raise ValueError(
            f"speq.compile needs a causal LM with its head ({', '.join(family.classes)}), got "
            f"{name}; supported: {supported()}"
        )
    config = family.config(model.config.to_dict(), name)
    state = {k: v.detach() for k, v in model.state_dict().items()}
    params = family.weights(config, state, lambda _: f"{name}'s state dict")
    dtype = dtype or model.dtype
    if DTYPE_NAMES.get(dtype) not in FLOAT_DTYPES:
        raise ValueError(
            f"unsupported compute dtype {dtype}: use float16, bfloat16, float32 or float64"
        )
    return ModelSpec(config, dtype), {k: v.to(dtype) for k, v in params.items()}
