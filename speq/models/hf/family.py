"""`Family`: how one Hugging Face model family maps onto speq's model (config fields and tensor
names), in both directions. Data and pure functions only: reading folders and live models is the
frontend's (speq.frontend.hf)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from speq.models.config import MoEConfig
from speq.models.weights import ExpertStack

Tensors = Mapping[str, torch.Tensor]
Params = dict[str, "torch.Tensor | ExpertStack"]


@dataclass(frozen=True)
class Family:
    """One routing family of transformers MoE models.

    ``model_types``: the ``model_type`` values of its ``config.json``; ``classes``: its
    transformers model classes; ``config``: a transformers config (as a dict) to a `MoEConfig`,
    or a ValueError naming the setting speq cannot run; ``weights``: the model's tensors (a live
    model's state dict, or a folder's tensors in either expert layout) to speq's weight names;
    ``hf_config`` / ``hf_tensors``: the reverse, for export (None: speq does not export to it)."""

    name: str
    model_types: tuple[str, ...]
    classes: tuple[str, ...]
    config: Callable[[Mapping[str, Any]], MoEConfig]
    weights: Callable[[MoEConfig, Tensors, Callable[[str], str]], Params]
    hf_config: Callable[[MoEConfig], dict[str, Any]] | None = None
    hf_tensors: Callable[[MoEConfig, Tensors], dict[str, torch.Tensor]] | None = None


def field(d: Mapping[str, Any], name: str, kind: type | tuple[type, ...], source: str) -> Any:
    """``d[name]`` checked to be a ``kind`` (JSON booleans are not numbers), or a ValueError
    naming the field and ``source`` (the config file, or the model class)."""
    if name not in d:
        raise ValueError(f"{source}: missing field {name!r}")
    value = d[name]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
        want = " or ".join(k.__name__ for k in kinds)
        raise ValueError(f"{source}: {name} = {value!r} has the wrong type: expected {want}")
    return value


def take(
    tensors: Tensors, name: str, shape: tuple[int, ...], missing: Callable[[str], str]
) -> torch.Tensor:
    """The tensor ``name`` of ``tensors``, checked to have ``shape``; ``missing(name)`` says where
    it was looked for (an error names the tensor, its file and the shape expected)."""
    t = tensors.get(name)
    if t is None:
        raise ValueError(f"{missing(name)} lacks tensor {name!r}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(
            f"{missing(name)}: tensor {name!r} has shape {list(t.shape)}, expected {list(shape)}"
        )
    return t
