"""The demo models: the trained checkpoint shipped in the package, and a seeded random MoE."""

from __future__ import annotations

from pathlib import Path

import torch

from speq.models.config import MoEConfig
from speq.models.model import MoEForCausalLM
from speq.models.tokenizer import Tokenizer

DEMO_CHECKPOINT = Path(__file__).resolve().parent / "checkpoints" / "demo-moe"

# The shape of `random_demo_model`: the demo's family, smaller than the shipped checkpoint (whose
# config is the checkpoint's own config.json: 4 layers, 8 experts top-2, hidden 192, vocab 4096)
RANDOM_DEMO_CONFIG = MoEConfig(
    vocab_size=512,
    hidden_size=128,
    num_layers=4,
    num_heads=4,
    num_kv_heads=2,
    num_experts=8,
    top_k=2,
    expert_intermediate_size=256,
    max_seq_len=256,
)


def random_demo_model(seed: int = 0) -> MoEForCausalLM:
    """A randomly initialised model of `RANDOM_DEMO_CONFIG`'s shape (untrained: its text is
    noise)."""
    return MoEForCausalLM(RANDOM_DEMO_CONFIG, seed=seed)


def demo_model(dtype: torch.dtype | None = None) -> tuple[MoEForCausalLM, Tokenizer]:
    """The trained demo MoE shipped in the package and its tokenizer (see docs/MODEL_CARD.md).

    A 4-layer, 8-expert, top-2 model of about 8.3 M parameters trained for a few minutes on a
    CPU on public-domain and freely licensed text; a test and demo model, not for any real use.
    Weights are stored in bf16 and keep that dtype unless ``dtype`` is given.
    """
    model = MoEForCausalLM.from_pretrained(DEMO_CHECKPOINT, dtype=dtype)
    return model.eval(), Tokenizer(DEMO_CHECKPOINT / "tokenizer.json")


def model_with_tokenizer(
    folder: str | Path | None, dtype: torch.dtype | None = None
) -> tuple[MoEForCausalLM, Tokenizer, str]:
    """A model that takes text, with a description of it: the shipped demo MoE (``folder``
    None), or a checkpoint folder of either format (speq's, or a Hugging Face one) with its
    tokenizer.json (a FileNotFoundError names it when missing)."""
    if folder is None:
        model, tok = demo_model(dtype)
        return model, tok, "the shipped demo MoE"
    path = Path(folder, "tokenizer.json")
    if not path.is_file():
        raise FileNotFoundError(f"--model {folder}: {path} is missing (the prompts are text)")
    return (
        MoEForCausalLM.from_pretrained(folder, dtype),
        Tokenizer(path),
        f"the checkpoint {folder}",
    )
