"""speq: speculative quantized decoding with proactive expert prefetching for MoE models."""

from speq.compiler import CompiledModel, CompileOptions, compile
from speq.models.model import MoEForCausalLM
from speq.runtime.errors import TransferError

__version__ = "0.1.0"


def load(path: str) -> MoEForCausalLM:
    """Load a speq checkpoint folder (``config.json`` + ``model.safetensors``)."""
    return MoEForCausalLM.from_pretrained(path)


__all__ = ["CompileOptions", "CompiledModel", "TransferError", "__version__", "compile", "load"]
