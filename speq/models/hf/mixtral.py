"""Mixtral (``MixtralForCausalLM``): Llama attention, RMSNorm, softmax top-k routing renormalised
over the chosen experts, SwiGLU experts. speq's own model is this architecture, so the mapping
is one of names (and of the expert layout: transformers 5 holds ``gate_up_proj [E, 2I, H]`` and
``down_proj [E, H, I]`` in memory, as speq's ``w13`` / ``w2``; checkpoints store each expert's
``w1`` (gate), ``w3`` (up) and ``w2`` (down))."""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from typing import Any

import torch

from speq.models.config import MoEConfig
from speq.models.hf.decoder import (
    Layout,
    attention_fields,
    decoder_weights,
    moe_config,
    window_fields,
)
from speq.models.hf.family import Family, Tensors, field

CLASS = "MixtralForCausalLM"


LAYOUT = Layout(blocks=("mlp", "block_sparse_moe"), gate="w1", up="w3", down="w2")


def config(d: Mapping[str, Any], source: str = "config.json") -> MoEConfig:
    """A transformers Mixtral config (as a dict) as a `MoEConfig`; a setting speq cannot run (a
    scaled RoPE, another activation) is a ValueError."""
    fields = attention_fields(d, source)
    fields |= window_fields(d, fields)
    return moe_config(
        source,
        **fields,
        num_experts=field(d, "num_local_experts", int, source),
        top_k=field(d, "num_experts_per_tok", int, source),
        expert_intermediate_size=field(d, "intermediate_size", int, source),
        norm_topk_prob=True,
        router_mode="softmax_topk",
    )


def _layer_names(i: int) -> dict[str, str]:
    """speq name -> transformers name of one layer's non-expert weights."""
    p = f"model.layers.{i}"
    return {
        f"layers.{i}.attn_norm.weight": f"{p}.input_layernorm.weight",
        f"layers.{i}.mlp_norm.weight": f"{p}.post_attention_layernorm.weight",
        f"layers.{i}.attn.wq": f"{p}.self_attn.q_proj.weight",
        f"layers.{i}.attn.wk": f"{p}.self_attn.k_proj.weight",
        f"layers.{i}.attn.wv": f"{p}.self_attn.v_proj.weight",
        f"layers.{i}.attn.wo": f"{p}.self_attn.o_proj.weight",
    }


def hf_config(cfg: MoEConfig) -> dict[str, Any]:
    """The ``config.json`` of a `MixtralForCausalLM` with ``cfg``'s architecture, or a ValueError
    for what Mixtral cannot express."""
    unfit = []
    if cfg.router_mode != "softmax_topk" or not cfg.norm_topk_prob:
        unfit.append("routing other than softmax top-k renormalised (router_mode, norm_topk_prob)")
    if cfg.shared_expert_intermediate_size:
        unfit.append("a shared expert")
    if cfg.first_dense_layers:
        unfit.append("dense leading layers")
    if cfg.qkv_bias or cfg.o_bias or cfg.qk_norm != "none" or cfg.clip_qkv is not None:
        unfit.append("attention biases, q/k norms or clamping")
    if cfg.is_mla or cfg.attention_sinks or cfg.norm != "rms" or cfg.lm_head_bias:
        unfit.append("MLA, attention sinks, LayerNorms or a head bias")
    if cfg.sliding_layers and set(cfg.sliding_layers) != set(range(cfg.num_layers)):
        unfit.append("a sliding window on some layers only")
    if cfg.routed_scaling_factor != 1.0 or cfg.n_group > 1 or cfg.shared_expert_gate:
        unfit.append("scaled or group-limited routing, or a gated shared expert")
    if unfit:
        raise ValueError(f"a Mixtral checkpoint cannot hold a model with {', '.join(unfit)}")
    return {
        "architectures": [CLASS],
        "model_type": "mixtral",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.expert_intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "num_local_experts": cfg.num_experts,
        "num_experts_per_tok": cfg.top_k,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_theta": cfg.rope_theta, "rope_type": "default"},
        "sliding_window": cfg.sliding_window or None,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "attention_dropout": 0.0,
        "router_jitter_noise": 0.0,
        "output_router_logits": False,
        "use_cache": True,
    }


def hf_tensors(cfg: MoEConfig, params: Tensors) -> dict[str, torch.Tensor]:
    """speq's weights under a Mixtral checkpoint's names, one tensor per expert projection (the
    layout every transformers release reads)."""
    inter = cfg.expert_intermediate_size
    out = {"model.embed_tokens.weight": params["embed"], "model.norm.weight": params["norm.weight"]}
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = params["lm_head"]
    for i in range(cfg.num_layers):
        out |= {theirs: params[ours] for ours, theirs in _layer_names(i).items()}
        block = f"model.layers.{i}.block_sparse_moe"
        out[f"{block}.gate.weight"] = params[f"layers.{i}.mlp.router"]
        w13, w2 = params[f"layers.{i}.mlp.w13"], params[f"layers.{i}.mlp.w2"]
        for j in range(cfg.num_experts):
            out[f"{block}.experts.{j}.w1.weight"] = w13[j, :inter]
            out[f"{block}.experts.{j}.w3.weight"] = w13[j, inter:]
            out[f"{block}.experts.{j}.w2.weight"] = w2[j]
    return {k: v.detach().contiguous() for k, v in out.items()}


MIXTRAL = Family(
    name="mixtral",
    model_types=("mixtral",),
    classes=(CLASS,),
    config=config,
    weights=partial(decoder_weights, layout=LAYOUT),
    hf_config=hf_config,
    hf_tensors=hf_tensors,
)
