"""speq: speculative quantized decoding with proactive expert prefetching for MoE models."""

import os
from collections.abc import Callable

from speq.compiler import CompiledModel, CompileOptions, compile
from speq.runtime.errors import TransferError

__version__ = "0.1.0"


def load(
    path: str | os.PathLike,
    options: CompileOptions | None = None,
    progress: Callable[[int], None] | None = None,
) -> CompiledModel:
    """Open a checkpoint folder (speq's format, or a Hugging Face one of a supported family:
    ``config.json`` + safetensors shards) and compile it with ``options``. Weights are
    memory-mapped, not loaded; only safetensors files are read and no code from the folder runs.

    A fault in the folder is a FileNotFoundError or ValueError naming the file at fault (and the
    tensor or config field); a ``path`` that is not a path is a TypeError."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(
            f"speq.load(path): path must be a checkpoint folder (str or os.PathLike), "
            f"got {type(path).__name__}"
        )
    return compile(path, options, progress)


__all__ = ["CompileOptions", "CompiledModel", "TransferError", "__version__", "compile", "load"]
