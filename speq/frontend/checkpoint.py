"""A checkpoint folder as speq's spec and weights (speq.models.checkpoint reads it: speq's own
format or a Hugging Face one), memory-mapped: no expert is read until it is first copied to the
device."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from speq.models.checkpoint import read_checkpoint, stored_dtype
from speq.models.spec import ModelSpec


def from_checkpoint(
    folder: str | Path,
    dtype: torch.dtype | None = None,
    progress: Callable[[int], None] | None = None,
) -> tuple[ModelSpec, dict[str, torch.Tensor]]:
    """The spec and the weights of a checkpoint folder (speq's format or a supported Hugging Face
    family's). Weights stay memory-mapped; a ``dtype`` conversion happens expert by expert as
    they are read. Every error names the file at fault (and the tensor or config field);
    ``progress(n)``: shards opened so far."""
    config, params = read_checkpoint(folder, progress)
    dtype = dtype or stored_dtype(params)
    params = {k: (v if v.dtype == dtype else v.to(dtype)) for k, v in params.items()}
    return ModelSpec(config, dtype), params
