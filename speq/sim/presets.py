"""Model presets at the sizes of the paper's models (and two more), with parameter counts.

Counts follow `speq.models.MoEForCausalLM`, the architecture every preset is expressed in: per layer
two RMSNorms and attention (q, k, v, o without biases), then a dense SwiGLU MLP or a router, the
routed experts (``w13 [E, 2I, H]``, ``w2 [E, H, I]``) and an optional shared expert; an embedding
table, a final norm and an untied head. Small terms the real models have and this family lacks
(attention biases, LayerNorm biases, Qwen's shared-expert gate) are left out.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from types import MappingProxyType

from speq.kernels.routing import routing_function
from speq.models.config import MoEConfig

_PRESETS = {
    # Phi-3.5-MoE-instruct config.json: 16 experts (the paper's table says 8; 41.9B needs 16),
    # the SparseMixer router, LayerNorms, biased attention and head. Its LongRoPE scaling changes
    # no shape.
    "phi-3.5-moe": MoEConfig(
        vocab_size=32064,
        hidden_size=4096,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        num_experts=16,
        top_k=2,
        expert_intermediate_size=6400,
        max_seq_len=4096,
        rms_norm_eps=1e-5,
        router_mode="sparsemixer",
        router_jitter_eps=0.01,
        norm="layer",
        qkv_bias=True,
        o_bias=True,
        lm_head_bias=True,
    ),
    # Qwen1.5-MoE-A2.7B config.json (a Qwen2-MoE): one shared expert 4x as wide as a routed one,
    # scaled by a sigmoid gate; q, k, v biases; no renormalising.
    "qwen1.5-moe-a2.7b": MoEConfig(
        vocab_size=151936,
        hidden_size=2048,
        num_layers=24,
        num_heads=16,
        num_kv_heads=16,
        num_experts=60,
        top_k=4,
        expert_intermediate_size=1408,
        shared_expert_intermediate_size=5632,
        shared_expert_gate=True,
        qkv_bias=True,
        norm_topk_prob=False,
        max_seq_len=4096,
        rope_theta=1000000.0,
    ),
    # DeepSeek-V2-Lite config.json: MLA (a 512 latent and a 64 rotary key cached per token; heads
    # of 128 + 64 for q and k, 128 for v; no q bottleneck). Its 2 shared experts of width 1408 are
    # one shared expert of width 2 * 1408; its YaRN RoPE scaling changes no shape.
    "deepseek-v2-lite": MoEConfig(
        vocab_size=102400,
        hidden_size=2048,
        num_layers=27,
        num_heads=16,
        num_kv_heads=16,
        head_dim=192,
        kv_lora_rank=512,
        qk_rope_head_dim=64,
        v_head_dim=128,
        num_experts=64,
        top_k=6,
        expert_intermediate_size=1408,
        shared_expert_intermediate_size=2 * 1408,
        first_dense_layers=1,
        dense_intermediate_size=10944,
        norm_topk_prob=False,
        max_seq_len=4096,
    ),
    # Mixtral-8x7B-v0.1 config.json. Its router is top-k logits then softmax.
    "mixtral-8x7b": MoEConfig(
        vocab_size=32000,
        hidden_size=4096,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        num_experts=8,
        top_k=2,
        expert_intermediate_size=14336,
        max_seq_len=4096,
        router_mode="topk_softmax",
        rope_theta=1000000.0,
        rms_norm_eps=1e-5,
    ),
    # Qwen3-30B-A3B config.json: heads of 128 (q and o are 2048 x 4096), each q and k head
    # RMS-normalised, top-8 renormalised.
    "qwen3-30b-a3b": MoEConfig(
        vocab_size=151936,
        hidden_size=2048,
        num_layers=48,
        num_heads=32,
        num_kv_heads=4,
        head_dim=128,
        qk_norm="head",
        num_experts=128,
        top_k=8,
        expert_intermediate_size=768,
        norm_topk_prob=True,
        max_seq_len=4096,
        rope_theta=1000000.0,
    ),
}

MODEL_PRESETS: Mapping[str, MoEConfig] = MappingProxyType(_PRESETS)


def get_preset(name: str) -> MoEConfig:
    """The named model preset; a ValueError lists the known names."""
    try:
        return MODEL_PRESETS[name]
    except KeyError:
        raise ValueError(
            f"unknown model preset {name!r}; known presets: {', '.join(sorted(MODEL_PRESETS))}"
        ) from None


def expert_params(cfg: MoEConfig) -> int:
    """Parameters of one routed expert: gate and up ``[2I, H]`` plus down ``[H, I]``."""
    return 3 * cfg.hidden_size * cfg.expert_intermediate_size


def non_expert_params(cfg: MoEConfig) -> int:
    """Everything but the routed experts: embeddings, head, attention, norms, routers, dense MLPs
    of the leading dense layers and shared experts (the weights that stay on the device)."""
    h = cfg.hidden_size
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    if cfg.is_mla:
        attn = _mla_params(cfg)
    else:
        attn = 2 * h * q + 2 * h * kv  # q and o, k and v
        attn += (q + 2 * kv) * cfg.qkv_bias + h * cfg.o_bias
        attn += {"none": 0, "head": 2 * cfg.head_dim, "full": q + kv}[cfg.qk_norm]
    norm = 2 * h if cfg.norm == "layer" else h  # LayerNorm has a bias
    per_layer = attn + 2 * norm + cfg.num_heads * cfg.attention_sinks  # plus the norms, sinks
    n_moe = len(cfg.moe_layers)
    n_dense = cfg.num_layers - n_moe
    dense_mlp = 3 * h * (cfg.dense_intermediate_size or 0)
    moe_rest = cfg.num_experts * h + 3 * h * cfg.shared_expert_intermediate_size
    moe_rest += (
        h * cfg.shared_expert_gate + cfg.num_experts * routing_function(cfg.router_mode).bias
    )
    moe_rest += cfg.num_experts * cfg.router_logit_bias
    moe_rest += cfg.num_experts * cfg.expert_bias * (2 * cfg.expert_intermediate_size + h)
    tables = cfg.vocab_size * h * (1 if cfg.tie_word_embeddings else 2)
    tables += cfg.vocab_size * cfg.lm_head_bias
    return tables + norm + cfg.num_layers * per_layer + n_dense * dense_mlp + n_moe * moe_rest


def _mla_params(cfg: MoEConfig) -> int:
    """One MLA layer: q (direct, or its bottleneck and norm), the KV down-projection and norm,
    the expansion to every head's key and value, the output projection."""
    h, r, rope, heads = cfg.hidden_size, cfg.kv_lora_rank, cfg.qk_rope_head_dim, cfg.num_heads
    q = heads * cfg.head_dim
    q_params = cfg.q_lora_rank * (h + 1 + q) if cfg.q_lora_rank else h * q
    kv = (r + rope) * h + r + heads * (cfg.head_dim - rope + cfg.v_head_dim) * r
    return q_params + kv + h * cfg.attn_out_dim


def total_params(cfg: MoEConfig) -> int:
    """All parameters: the non-expert ones plus every routed expert of every MoE layer."""
    return non_expert_params(cfg) + len(cfg.moe_layers) * cfg.num_experts * expert_params(cfg)


def active_params(cfg: MoEConfig) -> int:
    """Parameters one token uses: the non-expert ones (whole embedding table and head included)
    plus ``top_k`` routed experts per MoE layer."""
    return non_expert_params(cfg) + len(cfg.moe_layers) * cfg.top_k * expert_params(cfg)


def expert_bytes(cfg: MoEConfig, bytes_per_param: float = 2) -> int:
    """Bytes of one routed expert (what one host -> device expert copy moves)."""
    return math.ceil(expert_params(cfg) * bytes_per_param)


def non_expert_bytes(cfg: MoEConfig, bytes_per_param: float = 2) -> int:
    """Bytes of the non-expert weights (see `non_expert_params`)."""
    return math.ceil(non_expert_params(cfg) * bytes_per_param)
