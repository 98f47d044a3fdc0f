"""GPT-OSS (``GptOssForCausalLM``): attention with a learned sink per head and biases, sliding-window
attention on the layers ``layer_types`` names, a biased router (top-k of the logits, softmax over
them), and experts with biases and a clamped SwiGLU, stored fused and transposed (``gate_up_proj
[E, H, 2I]`` with gate and up interleaved column by column, ``down_proj [E, I, H]``): speq reads
each expert's gate and up rows as strided views (no copy) and de-interleaves the small gate/up
bias. MXFP4-quantized checkpoints (the published ones) are refused: dequantize them first."""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from typing import Any

import torch

from speq.models.config import MoEConfig
from speq.models.hf.decoder import Layout, attention_fields, decoder_weights, moe_config
from speq.models.hf.family import Family, Params, Tensors, field
from speq.models.weights import ExpertStack


def config(d: Mapping[str, Any], source: str = "config.json") -> MoEConfig:
    fields = attention_fields(d, source)
    if d.get("quantization_config"):
        raise ValueError(
            f"{source}: quantization_config {d['quantization_config'].get('quant_method')!r}: "
            "speq reads dense expert weights; dequantize first (transformers: "
            "Mxfp4Config(dequantize=True), then save_pretrained)"
        )
    window = d.get("sliding_window") or 0
    types = d.get("layer_types") or ["full_attention"] * fields["num_layers"]
    sliding = tuple(i for i, t in enumerate(types) if t == "sliding_attention")
    if window >= fields["max_seq_len"] or not sliding:
        window, sliding = 0, ()
    bias = bool(d.get("attention_bias", True))
    return moe_config(
        source,
        **fields,
        num_experts=field(d, "num_local_experts", int, source),
        top_k=field(d, "num_experts_per_tok", int, source),
        expert_intermediate_size=field(d, "intermediate_size", int, source),
        router_mode="topk_softmax",
        router_logit_bias=True,
        expert_bias=True,
        activation="swiglu_oai",
        swiglu_alpha=float(d.get("swiglu_alpha", 1.702)),
        swiglu_limit=float(d.get("swiglu_limit", 7.0)),
        qkv_bias=bias,
        o_bias=bias,
        attention_sinks=True,
        sliding_window=window,
        sliding_layers=sliding,
    )


def _moe_block(cfg: MoEConfig, tensors: Tensors, get, p: str, ours: str, layout: Layout) -> Params:
    h, e, inter = cfg.hidden_size, cfg.num_experts, cfg.expert_intermediate_size
    block, x = f"{p}.mlp", f"{p}.mlp.experts"
    if f"{x}.gate_up_proj_blocks" in tensors:
        raise ValueError(
            f"{x}.gate_up_proj_blocks: MXFP4-quantized experts; speq reads dense expert weights "
            "(dequantize with transformers' Mxfp4Config(dequantize=True), then save_pretrained)"
        )
    gate_up = get(f"{x}.gate_up_proj", (e, h, 2 * inter))  # columns: gate, up, gate, up, ...
    down = get(f"{x}.down_proj", (e, inter, h))
    bias = get(f"{x}.gate_up_proj_bias", (e, 2 * inter))
    return {
        f"{ours}.mlp.router": get(f"{block}.router.weight", (e, h)),
        f"{ours}.mlp.router_logit_bias": get(f"{block}.router.bias", (e,)),
        f"{ours}.mlp.w13": ExpertStack([(w.T[0::2], w.T[1::2]) for w in gate_up]),
        f"{ours}.mlp.w2": ExpertStack([(w.T,) for w in down]),
        f"{ours}.mlp.b13": torch.cat([bias[:, 0::2], bias[:, 1::2]], dim=1),
        f"{ours}.mlp.b2": get(f"{x}.down_proj_bias", (e, h)),
    }


LAYOUT = Layout(blocks=("mlp",), gate="", up="", down="", moe_block=_moe_block)

GPT_OSS = Family(
    name="gpt_oss",
    model_types=("gpt_oss",),
    classes=("GptOssForCausalLM",),
    config=config,
    weights=partial(decoder_weights, layout=LAYOUT),
)
