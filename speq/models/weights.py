"""Checking a checkpoint folder and its tensors against the shapes its config requires, and
`ExpertStack`: routed experts kept per expert, as a per-expert checkpoint stores them."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
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


def read_json(path: Path, expected: str) -> object:
    """The JSON in the file ``path``; an error names the file, the fault and what was
    ``expected`` (e.g. "a JSON object of MoEConfig fields")."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} is missing") from None
    except OSError as e:
        raise type(e)(f"cannot read {path}: {e.strerror or e}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(
            f"{path} is not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}); "
            f"expected {expected}"
        ) from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(
            f"{path} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}"
        ) from None


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


class ExpertStack:
    """A routed-expert weight ``[E, rows, cols]`` kept as one tensor per expert part, stacked only
    on demand: a checkpoint that stores each expert's projections separately (gate, up, down) is
    read this way without building the stacked tensor, so its memory-mapped experts are never
    all materialised. ``stack[e]`` is expert e's ``[rows, cols]`` (its parts concatenated along
    the rows: a copy of one expert when there are several, a view when there is one);
    `materialize` builds the whole ``[E, rows, cols]``. ``dtype`` converts each expert as it is
    read."""

    def __init__(self, parts: Sequence[Sequence[torch.Tensor]], dtype: torch.dtype | None = None):
        if not parts or not all(parts):
            raise ValueError("ExpertStack needs at least one expert of at least one part")
        self.parts = tuple(tuple(p) for p in parts)
        shapes = {(sum(t.shape[0] for t in e), e[0].shape[-1]) for e in self.parts}
        flat = all(t.dim() == 2 and t.shape[1] == e[0].shape[1] for e in self.parts for t in e)
        if not flat or len(shapes) != 1:
            raise ValueError("ExpertStack: every expert must be 2-d parts of the same total shape")
        self.dtype = dtype or self.parts[0][0].dtype
        self.shape = torch.Size((len(self.parts), *shapes.pop()))

    def __len__(self) -> int:
        return len(self.parts)

    def __getitem__(self, e: int) -> torch.Tensor:
        parts = self.parts[e]
        t = parts[0] if len(parts) == 1 else torch.cat(parts, 0)
        return t if t.dtype == self.dtype else t.to(self.dtype)

    def to(self, dtype: torch.dtype) -> ExpertStack:
        return self if dtype == self.dtype else ExpertStack(self.parts, dtype)

    def element_size(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    def numel(self) -> int:
        return self.shape.numel()

    def copy_pairs(self, e: int, dst: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(source part, destination rows) pairs that copy expert e into ``dst [rows, cols]``
        part by part, with no temporary (``dst.copy_`` converts the dtype)."""
        pairs, row = [], 0
        for t in self.parts[e]:
            pairs.append((t, dst[row : row + t.shape[0]]))
            row += t.shape[0]
        return pairs

    def materialize(self) -> torch.Tensor:
        """The stacked ``[E, rows, cols]`` tensor (reads and copies every expert)."""
        out = torch.empty(self.shape, dtype=self.dtype)
        for e in range(len(self)):
            out[e].copy_(self[e])
        return out


def expert_copy_pairs(
    w: torch.Tensor | ExpertStack, e: int, dst: torch.Tensor
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(source, destination) pairs that copy expert e of ``w`` into ``dst``."""
    return w.copy_pairs(e, dst) if isinstance(w, ExpertStack) else [(w[e], dst)]


def stacked(w: torch.Tensor | ExpertStack) -> torch.Tensor:
    """``w`` as one ``[E, rows, cols]`` tensor (an `ExpertStack` is materialised)."""
    return w.materialize() if isinstance(w, ExpertStack) else w
