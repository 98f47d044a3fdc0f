"""PhiMoE (``PhimoeForCausalLM``, Phi-3.5-MoE): LayerNorms with biases, optional attention and head
biases, the sparsemixer router (two experts, each weighted by its softmax among the logits close to
it), SwiGLU experts stored as Mixtral's (``w1``, ``w3``, ``w2``; the router is ``router`` in a live
model and ``gate`` in a checkpoint)."""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from typing import Any

from speq.models.config import MoEConfig
from speq.models.hf.decoder import (
    Layout,
    attention_fields,
    decoder_weights,
    moe_config,
    window_fields,
)
from speq.models.hf.family import Family, field

LAYOUT = Layout(
    blocks=("mlp", "block_sparse_moe"), gate="w1", up="w3", down="w2", routers=("router", "gate")
)


def config(d: Mapping[str, Any], source: str = "config.json") -> MoEConfig:
    fields = attention_fields(d, source)
    fields |= window_fields(d, fields)
    bias = bool(d.get("attention_bias", False))
    return moe_config(
        source,
        **fields,
        num_experts=field(d, "num_local_experts", int, source),
        top_k=field(d, "num_experts_per_tok", int, source),
        expert_intermediate_size=field(d, "intermediate_size", int, source),
        router_mode="sparsemixer",
        router_jitter_eps=float(d.get("router_jitter_noise", 0.01)),
        norm_topk_prob=False,
        norm="layer",
        qkv_bias=bias,
        o_bias=bias,
        lm_head_bias=bool(d.get("lm_head_bias", False)),
    )


PHIMOE = Family(
    name="phimoe",
    model_types=("phimoe",),
    classes=("PhimoeForCausalLM",),
    config=config,
    weights=partial(decoder_weights, layout=LAYOUT),
)
