"""OLMoE (``OlmoeForCausalLM``): softmax top-k routing (renormalised when ``norm_topk_prob``), RMSNorm
of the whole q and k projections, q, k and v clamped to ``clip_qkv`` when it is set, SwiGLU
experts named ``gate_proj`` / ``up_proj`` / ``down_proj``."""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from typing import Any

from speq.models.config import MoEConfig
from speq.models.hf.decoder import Layout, attention_fields, decoder_weights, moe_config
from speq.models.hf.family import Family, field

LAYOUT = Layout(blocks=("mlp",), gate="gate_proj", up="up_proj", down="down_proj")


def config(d: Mapping[str, Any], source: str = "config.json") -> MoEConfig:
    bias = bool(d.get("attention_bias", False))
    return moe_config(
        source,
        **attention_fields(d, source),
        num_experts=field(d, "num_experts", int, source),
        top_k=field(d, "num_experts_per_tok", int, source),
        expert_intermediate_size=field(d, "intermediate_size", int, source),
        norm_topk_prob=bool(d.get("norm_topk_prob", False)),
        router_mode="softmax_topk",
        qkv_bias=bias,
        o_bias=bias,
        qk_norm="full",
        clip_qkv=d.get("clip_qkv"),
    )


OLMOE = Family(
    name="olmoe",
    model_types=("olmoe",),
    classes=("OlmoeForCausalLM",),
    config=config,
    weights=partial(decoder_weights, layout=LAYOUT),
)
