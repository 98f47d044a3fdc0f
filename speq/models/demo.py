"""The demo model: until a trained checkpoint ships, a seeded random MoE of this shape."""

from __future__ import annotations

from speq.models.config import MoEConfig
from speq.models.model import MoEForCausalLM

DEMO_CONFIG = MoEConfig(
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
    """A randomly initialised model of the demo's shape (untrained: its text is noise)."""
    return MoEForCausalLM(DEMO_CONFIG, seed=seed)
