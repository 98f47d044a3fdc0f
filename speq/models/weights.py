"""Checking a checkpoint folder, and its tensors against the shapes its config requires."""

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


def checkpoint_folder(path: str | Path) -> Path:
    """``path`` as a folder that exists, or a FileNotFoundError / ValueError saying what it is."""
    folder = Path(path)
    if not folder.exists():
        raise FileNotFoundError(f"checkpoint folder {folder} does not exist")
    if not folder.is_dir():
        raise ValueError(
            f"{folder} is not a folder: a speq checkpoint is a folder with config.json and "
            "model.safetensors"
        )
    return folder
