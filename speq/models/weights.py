"""Checking a checkpoint's tensors against the shapes its config requires."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import torch


def check_tensors(
    expected: Mapping[str, tuple[int, ...]],
    tensors: Mapping[str, torch.Tensor],
    file_of: Callable[[str], object],
    files: object,
    config: Path,
) -> None:
    """A ValueError naming the file and the tensor when a tensor ``expected`` names is missing
    from ``tensors`` (``files``: where they were looked for) or has another shape (``file_of``:
    the file a tensor came from); ``config``: the config.json that requires them."""
    missing = sorted(set(expected) - set(tensors))
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise ValueError(
            f"{files} lacks tensor(s) {', '.join(map(repr, missing[:5]))}{more} that {config} "
            "requires"
        )
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != tuple(shape):
            raise ValueError(
                f"{file_of(name)}: tensor {name!r} has shape {list(tensors[name].shape)}, but "
                f"{config} requires {list(shape)}"
            )
