"""Qwen2-MoE (``Qwen2MoeForCausalLM``) and Qwen3-MoE (``Qwen3MoeForCausalLM``): softmax top-k routing
(renormalised when ``norm_topk_prob``), SwiGLU experts named ``gate_proj`` / ``up_proj`` /
``down_proj``. Qwen2-MoE adds q/k/v biases and a shared expert scaled by a sigmoid gate; Qwen3-MoE
normalises each head of q and k (RMSNorm) and may have a head size other than hidden / heads.
Dense layers (``mlp_only_layers``, ``decoder_sparse_step``) are supported where they lead."""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from typing import Any

from speq.models.config import MoEConfig
from speq.models.hf.decoder import (
    Layout,
    attention_fields,
    decoder_weights,
    first_dense_layers,
    moe_config,
)
from speq.models.hf.family import Family, field

LAYOUT = Layout(blocks=("mlp",), gate="gate_proj", up="up_proj", down="down_proj")


def _common(d: Mapping[str, Any], source: str) -> dict[str, Any]:
    fields = attention_fields(d, source)
    if d.get("use_sliding_window"):
        raise ValueError(f"{source}: use_sliding_window: speq's attention is full causal attention")
    experts = d.get("num_experts", d.get("num_local_experts"))
    if not isinstance(experts, int) or isinstance(experts, bool):
        raise ValueError(f"{source}: num_experts = {experts!r}: expected an integer")
    step = field(d, "decoder_sparse_step", int, source) if "decoder_sparse_step" in d else 1
    only = d.get("mlp_only_layers") or []
    sparse = [i not in only and (i + 1) % step == 0 for i in range(fields["num_layers"])]
    dense = first_dense_layers(sparse, source)
    return fields | dict(
        num_experts=experts,
        top_k=field(d, "num_experts_per_tok", int, source),
        expert_intermediate_size=field(d, "moe_intermediate_size", int, source),
        norm_topk_prob=bool(d.get("norm_topk_prob", False)),
        router_mode="softmax_topk",
        first_dense_layers=dense,
        dense_intermediate_size=d.get("intermediate_size") if dense else None,
    )


def qwen2_config(d: Mapping[str, Any], source: str = "config.json") -> MoEConfig:
    shared = d.get("shared_expert_intermediate_size") or 0
    return moe_config(
        source,
        **_common(d, source),
        qkv_bias=bool(d.get("qkv_bias", True)),  # always biased before transformers 5
        shared_expert_intermediate_size=shared,
        shared_expert_gate=shared > 0,
    )


def qwen3_config(d: Mapping[str, Any], source: str = "config.json") -> MoEConfig:
    bias = bool(d.get("attention_bias", False))
    return moe_config(source, **_common(d, source), qkv_bias=bias, o_bias=bias, qk_norm="head")


QWEN2_MOE = Family(
    name="qwen2_moe",
    model_types=("qwen2_moe",),
    classes=("Qwen2MoeForCausalLM",),
    config=qwen2_config,
    weights=partial(decoder_weights, layout=LAYOUT),
)
QWEN3_MOE = Family(
    name="qwen3_moe",
    model_types=("qwen3_moe",),
    classes=("Qwen3MoeForCausalLM",),
    config=qwen3_config,
    weights=partial(decoder_weights, layout=LAYOUT),
)
