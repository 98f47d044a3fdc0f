"""DeepSeek-V2 (``DeepseekV2ForCausalLM``) and DeepSeek-V3 (``DeepseekV3ForCausalLM``): Multi-head
Latent Attention (a cached latent and rotary key, interleaved RoPE), leading dense layers, shared
experts, and their routers: V2 softmax with greedy or group-limited top-k times a scaling factor
(never renormalised); V3 sigmoid scores with a correction bias for the choice, group-limited by
each group's best two, renormalised when ``norm_topk_prob``, times the scaling factor."""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from typing import Any

from speq.models.config import MoEConfig
from speq.models.hf.decoder import Layout, attention_fields, decoder_weights, moe_config
from speq.models.hf.family import Family, field

LAYOUT = Layout(
    blocks=("mlp",), gate="gate_proj", up="up_proj", down="down_proj", shared="shared_experts"
)


def _common(d: Mapping[str, Any], source: str) -> dict[str, Any]:
    for flag in ("attention_bias", "mlp_bias"):
        if d.get(flag):
            raise ValueError(f"{source}: {flag} = true: speq's MLA and MLPs have no biases")
    fields = attention_fields(d, source)
    rope = field(d, "qk_rope_head_dim", int, source)
    nope = field(d, "qk_nope_head_dim", int, source)
    moe = field(d, "moe_intermediate_size", int, source)
    experts = d.get("n_routed_experts", d.get("num_experts", d.get("num_local_experts")))
    dense = d.get("first_k_dense_replace") or 0
    return fields | dict(
        num_kv_heads=fields["num_heads"],  # MLA: every head reads the same latent
        head_dim=nope + rope,
        kv_lora_rank=field(d, "kv_lora_rank", int, source),
        q_lora_rank=d.get("q_lora_rank") or 0,
        qk_rope_head_dim=rope,
        v_head_dim=field(d, "v_head_dim", int, source),
        num_experts=experts,
        top_k=field(d, "num_experts_per_tok", int, source),
        expert_intermediate_size=moe,
        shared_expert_intermediate_size=(d.get("n_shared_experts") or 0) * moe,
        first_dense_layers=dense,
        dense_intermediate_size=d.get("intermediate_size") if dense else None,
        routed_scaling_factor=float(d.get("routed_scaling_factor", 1.0)),
    )


def v2_config(d: Mapping[str, Any], source: str = "config.json") -> MoEConfig:
    method = d.get("topk_method", "greedy")
    if method not in ("greedy", "group_limited_greedy"):
        raise ValueError(
            f"{source}: topk_method = {method!r}: speq has greedy and group_limited_greedy"
        )
    groups = {}
    if method == "group_limited_greedy":
        groups = dict(
            n_group=field(d, "n_group", int, source), topk_group=field(d, "topk_group", int, source)
        )
    fields = _common(d, source) | groups
    return moe_config(source, **fields, router_mode="softmax_topk", norm_topk_prob=False)


def v3_config(d: Mapping[str, Any], source: str = "config.json") -> MoEConfig:
    if d.get("rope_interleave", True) is not True:
        raise ValueError(f"{source}: rope_interleave = false: speq's MLA rotates interleaved pairs")
    fields = _common(d, source) | dict(
        n_group=d.get("n_group") or 1, topk_group=d.get("topk_group") or 1
    )
    renormalize = bool(d.get("norm_topk_prob", True))
    return moe_config(source, **fields, router_mode="sigmoid_topk", norm_topk_prob=renormalize)


DEEPSEEK_V2 = Family(
    name="deepseek_v2",
    model_types=("deepseek_v2",),
    classes=("DeepseekV2ForCausalLM",),
    config=v2_config,
    weights=partial(decoder_weights, layout=LAYOUT),
)
DEEPSEEK_V3 = Family(
    name="deepseek_v3",
    model_types=("deepseek_v3",),
    classes=("DeepseekV3ForCausalLM",),
    config=v3_config,
    weights=partial(decoder_weights, layout=LAYOUT),
)
