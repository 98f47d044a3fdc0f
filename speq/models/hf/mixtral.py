"""Mixtral (``MixtralForCausalLM``): Llama attention, RMSNorm, softmax top-k routing renormalised
over the chosen experts, SwiGLU experts. speq's own model is this architecture, so the mapping
is one of names (and of the expert layout: transformers 5 holds ``gate_up_proj [E, 2I, H]`` and
``down_proj [E, H, I]`` in memory, as speq's ``w13`` / ``w2``; checkpoints store each expert's
``w1`` (gate), ``w3`` (up) and ``w2`` (down))."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from speq.models.config import MoEConfig
from speq.models.hf.family import Family, Params, Tensors, field, take
from speq.models.weights import ExpertStack

CLASS = "MixtralForCausalLM"


def config(d: Mapping[str, Any], source: str = "config.json") -> MoEConfig:
    """A transformers Mixtral config (as a dict) as a `MoEConfig`; a setting speq cannot run (a
    sliding window shorter than the context, scaled RoPE, another activation) is a ValueError."""
    hidden = field(d, "hidden_size", int, source)
    heads = field(d, "num_attention_heads", int, source)
    head_dim = d.get("head_dim")
    if head_dim is not None and head_dim * heads != hidden:
        raise ValueError(
            f"{source}: head_dim = {head_dim} with {heads} heads is not hidden_size / heads "
            f"({hidden}): speq's attention needs heads * head_dim == hidden_size"
        )
    if (act := d.get("hidden_act", "silu")) != "silu":
        raise ValueError(f"{source}: hidden_act = {act!r}: speq's experts are SwiGLU (silu)")
    rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ValueError(f"{source}: RoPE type {rope_type!r}: speq supports the default RoPE only")
    theta = rope.get("rope_theta", d.get("rope_theta", 10000.0))
    max_len = field(d, "max_position_embeddings", int, source)
    window = d.get("sliding_window")
    if window is not None and window < max_len:
        raise ValueError(
            f"{source}: sliding_window = {window} < max_position_embeddings = {max_len}: speq's "
            "attention is full causal attention"
        )
    try:
        return MoEConfig(
            vocab_size=field(d, "vocab_size", int, source),
            hidden_size=hidden,
            num_layers=field(d, "num_hidden_layers", int, source),
            num_heads=heads,
            num_kv_heads=field(d, "num_key_value_heads", int, source),
            num_experts=field(d, "num_local_experts", int, source),
            top_k=field(d, "num_experts_per_tok", int, source),
            expert_intermediate_size=field(d, "intermediate_size", int, source),
            norm_topk_prob=True,
            max_seq_len=max_len,
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            router_mode="softmax_topk",
            rope_theta=float(theta),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-5)),
        )
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None


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


def weights(cfg: MoEConfig, tensors: Tensors, where: Callable[[str], str]) -> Params:
    """speq's weights from a Mixtral's tensors: a live transformers 5 model's state dict (fused
    experts, ``mlp.*``) or a checkpoint's (``block_sparse_moe.*``, fused or one tensor per
    expert). Views, never copies: per-expert checkpoints become `ExpertStack`s."""
    h, d, v = cfg.hidden_size, cfg.head_dim, cfg.vocab_size
    e, inter = cfg.num_experts, cfg.expert_intermediate_size
    shapes = {"wq": (cfg.num_heads * d, h), "wk": (cfg.num_kv_heads * d, h)}
    shapes |= {"wv": (cfg.num_kv_heads * d, h), "wo": (h, cfg.num_heads * d)}
    out: Params = {
        "embed": take(tensors, "model.embed_tokens.weight", (v, h), where),
        "norm.weight": take(tensors, "model.norm.weight", (h,), where),
    }
    if not cfg.tie_word_embeddings:
        out["lm_head"] = take(tensors, "lm_head.weight", (v, h), where)
    for i in range(cfg.num_layers):
        for ours, theirs in _layer_names(i).items():
            shape = shapes[ours.rsplit(".", 1)[1]] if ".attn." in ours else (h,)
            out[ours] = take(tensors, theirs, shape, where)
        block = f"model.layers.{i}.mlp"
        if f"{block}.gate.weight" not in tensors:
            block = f"model.layers.{i}.block_sparse_moe"
        out[f"layers.{i}.mlp.router"] = take(tensors, f"{block}.gate.weight", (e, h), where)
        if f"{block}.experts.gate_up_proj" in tensors:
            out[f"layers.{i}.mlp.w13"] = take(
                tensors, f"{block}.experts.gate_up_proj", (e, 2 * inter, h), where
            )
            out[f"layers.{i}.mlp.w2"] = take(
                tensors, f"{block}.experts.down_proj", (e, h, inter), where
            )
            continue
        x = f"{block}.experts"
        gate = [take(tensors, f"{x}.{j}.w1.weight", (inter, h), where) for j in range(e)]
        up = [take(tensors, f"{x}.{j}.w3.weight", (inter, h), where) for j in range(e)]
        down = [take(tensors, f"{x}.{j}.w2.weight", (h, inter), where) for j in range(e)]
        out[f"layers.{i}.mlp.w13"] = ExpertStack(list(zip(gate, up)))
        out[f"layers.{i}.mlp.w2"] = ExpertStack([(t,) for t in down])
    return out


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
        "sliding_window": None,
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
    weights=weights,
    hf_config=hf_config,
    hf_tensors=hf_tensors,
)
