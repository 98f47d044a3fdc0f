"""A checkpoint folder opened lazily: ``config.json`` read as JSON, its safetensors shards through
the ``safetensors`` library's memory maps.

No tensor is read when a folder opens: `safe_open` returns copy-on-write views of a memory map of
its shard, so weights are paged in from disk only when first used (an expert when it is first
copied to the device) and never held twice in host memory. A folder is data, never code: only
``*.safetensors`` files are read (pickle checkpoints are refused with how to convert them) and
``config.json`` is parsed as JSON, so nothing it names (``auto_map``, a remote model class) is
ever imported.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from speq.models.weights import checkpoint_folder, read_json

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
INDEX = "model.safetensors.index.json"


@dataclass(frozen=True)
class Folder:
    """An opened checkpoint folder: its config (a JSON object), and every tensor of its shards as
    a memory-mapped view, with the shard each came from."""

    path: Path
    config: dict[str, Any]
    tensors: dict[str, torch.Tensor] = field(repr=False)
    where: dict[str, Path] = field(repr=False)

    @property
    def config_path(self) -> Path:
        return self.path / "config.json"

    @property
    def files(self) -> str:
        """The shard, or "the shards of FOLDER", for messages about a missing tensor."""
        shards = sorted(set(self.where.values()))
        return str(shards[0]) if len(shards) == 1 else f"the shards of {self.path}"


def read_config(folder: Path) -> dict[str, Any]:
    """``folder/config.json`` as a JSON object, or an error naming the file."""
    path = folder / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: not a checkpoint folder")
    return read_json(path, "a JSON object")


def shard_paths(folder: Path) -> list[Path]:
    """The safetensors shards of ``folder``: those its index lists, else every ``*.safetensors``.
    A folder with only pickle weights gets an error that says how to convert them."""
    index = folder / INDEX
    if index.is_file():
        shards = [folder / s for s in _index_shards(index)]
        missing = [s.name for s in shards if not s.is_file()]
        if missing:
            raise FileNotFoundError(f"checkpoint shard(s) {missing} listed in {index} are missing")
        return shards
    shards = sorted(folder.glob("*.safetensors"))
    if shards:
        return shards
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise ValueError(
            f"{folder} holds only pickle weights ({', '.join(pickles[:3])}), which speq never "
            "reads (loading a pickle runs code from the file). Convert them to safetensors in a "
            "trusted environment, e.g. `AutoModelForCausalLM.from_pretrained(folder)"
            ".save_pretrained(out)` with transformers, which writes model.safetensors"
        )
    raise FileNotFoundError(
        f"{folder / 'model.safetensors'} is missing: no *.safetensors shard in {folder}"
    )


def open_folder(path: str | Path, progress: Callable[[int], None] | None = None) -> Folder:
    """Open a checkpoint folder: its config and every tensor of its shards, memory-mapped.
    ``progress(n)`` is called after each shard with the shards opened so far. Every fault is a
    FileNotFoundError or ValueError naming the file (and the tensor)."""
    folder = checkpoint_folder(path)
    config = read_config(folder)
    tensors: dict[str, torch.Tensor] = {}
    where: dict[str, Path] = {}
    for n, shard in enumerate(shard_paths(folder), 1):
        for name, t in read_shard(shard).items():
            if name in tensors:
                raise ValueError(f"tensor {name!r} is in both {where[name]} and {shard}")
            tensors[name], where[name] = t, shard
        if progress is not None:
            progress(n)
    return Folder(folder, config, tensors, where)


def read_shard(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of one safetensors file, memory-mapped; errors name the file."""
    import safetensors
    from safetensors import safe_open

    corrupt = getattr(safetensors, "SafetensorError", Exception)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint shard {path} is missing")
    size = path.stat().st_size
    if size == 0:
        raise ValueError(f"corrupt safetensors file {path}: the file is empty (0 bytes)")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
    except OSError as e:
        raise type(e)(f"cannot read {path}: {e.strerror or e}") from None
    except corrupt as e:
        raise ValueError(f"corrupt safetensors file {path} ({size} bytes): {e}") from None


def _index_shards(index: Path) -> list[str]:
    """The shard files ``model.safetensors.index.json`` lists, or a ValueError naming it."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(
            f"{index} is not a safetensors index (a JSON object with a weight_map): {e}"
        ) from None
    if not all(isinstance(s, str) and "/" not in s and s != ".." for s in shards):
        raise ValueError(f"{index}: weight_map values must be shard file names in the folder")
    return shards
