"""speq: speculative quantized decoding with proactive expert prefetching for MoE models."""

import os

from speq.compiler import CompiledModel, CompileOptions, compile
from speq.models.model import MoEForCausalLM
from speq.runtime.errors import TransferError

__version__ = "0.1.0"


def load(path: str | os.PathLike) -> MoEForCausalLM:
    """Load a speq checkpoint folder (``config.json`` + ``model.safetensors``).

    A fault in the folder is a FileNotFoundError or ValueError naming the file at fault (and the
    tensor or config field); a ``path`` that is not a path is a TypeError."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(
            f"speq.load(path): path must be a checkpoint folder (str or os.PathLike), "
            f"got {type(path).__name__}"
        )
    return MoEForCausalLM.from_pretrained(path)


__all__ = ["CompileOptions", "CompiledModel", "TransferError", "__version__", "compile", "load"]
