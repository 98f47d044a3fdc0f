"""The weights of a Llama-style transformers MoE decoder (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE) under
speq's names, and the config fields those families share. What differs between them is a
`Layout` (the MoE block's module name and the per-expert tensor names of a checkpoint) and the
`MoEConfig` flags their config sets (biases, q/k norm, shared expert and its gate)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from speq.kernels.routing import routing_function
from speq.models.config import MoEConfig
from speq.models.hf.family import Params, Tensors, field, take
from speq.models.weights import ExpertStack


@dataclass(frozen=True)
class Layout:
    """``blocks``: the MoE block's module name in a layer, the first one present wins (a live
    transformers 5 model says ``mlp``; Mixtral checkpoints ``block_sparse_moe``); ``gate``,
    ``up``, ``down``: a per-expert checkpoint's projection names (``experts.{j}.{gate}.weight``)."""

    blocks: tuple[str, ...]
    gate: str
    up: str
    down: str
    shared: str = "shared_expert"  # the shared expert's module (DeepSeek: shared_experts)
    routers: tuple[str, ...] = ("gate",)  # the router's module, the first one present wins
    moe_block: Callable[..., Params] | None = None  # another MoE block mapping (GPT-OSS)


def attention_fields(d: Mapping[str, Any], source: str) -> dict[str, Any]:
    """The attention and RoPE fields of a `MoEConfig` from a transformers config, or a
    ValueError for what speq's attention cannot run (scaled RoPE, another activation)."""
    heads = field(d, "num_attention_heads", int, source)
    if (act := d.get("hidden_act", "silu")) != "silu":
        raise ValueError(f"{source}: hidden_act = {act!r}: speq's MLPs are SwiGLU (silu)")
    rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ValueError(f"{source}: RoPE type {rope_type!r}: speq supports the default RoPE only")
    if d.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"{source}: partial_rotary_factor: speq rotates the whole head")
    return dict(
        vocab_size=field(d, "vocab_size", int, source),
        hidden_size=field(d, "hidden_size", int, source),
        num_layers=field(d, "num_hidden_layers", int, source),
        num_heads=heads,
        num_kv_heads=d.get("num_key_value_heads") or heads,
        head_dim=d.get("head_dim"),
        max_seq_len=field(d, "max_position_embeddings", int, source),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        rope_theta=float(rope.get("rope_theta", d.get("rope_theta", 10000.0))),
        rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
    )


def window_fields(d: Mapping[str, Any], fields: Mapping[str, Any]) -> dict[str, Any]:
    """Mistral-style ``sliding_window`` (every layer attends to the last that many positions) as
    `MoEConfig` fields; none when the window covers the whole context."""
    window, layers = d.get("sliding_window"), fields["num_layers"]
    if window is None or window >= fields["max_seq_len"]:
        return {}
    return dict(sliding_window=window, sliding_layers=tuple(range(layers)))


def first_dense_layers(sparse: list[bool], source: str) -> int:
    """How many leading layers are dense, when the MoE layers are exactly the ones after them
    (speq's layout); a ValueError otherwise."""
    first = next((i for i, s in enumerate(sparse) if s), len(sparse))
    if not all(sparse[first:]):
        dense = [i for i, s in enumerate(sparse) if not s]
        raise ValueError(
            f"{source}: dense layers {dense}: speq supports dense layers only before every MoE "
            "layer (mlp_only_layers / decoder_sparse_step)"
        )
    return first


def moe_config(source: str, **fields: Any) -> MoEConfig:
    """A `MoEConfig`, its own errors prefixed with ``source``."""
    try:
        return MoEConfig(**fields)
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None


def decoder_weights(
    cfg: MoEConfig, tensors: Tensors, where: Callable[[str], str], layout: Layout
) -> Params:
    """speq's weights from a decoder's tensors: a live transformers 5 model's state dict (fused
    experts) or a checkpoint's (fused, or one tensor per expert projection: `ExpertStack`s of
    memory-mapped views). Views where the layouts agree; the small dense gate/up pairs (shared
    expert, dense layers) are concatenated."""
    h, v = cfg.hidden_size, cfg.vocab_size

    def get(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        return take(tensors, name, shape, where)

    out: Params = {"embed": get("model.embed_tokens.weight", (v, h))}
    norms = ("weight", "bias") if cfg.norm == "layer" else ("weight",)
    out |= {f"norm.{w}": get(f"model.norm.{w}", (h,)) for w in norms}
    if not cfg.tie_word_embeddings:
        out["lm_head"] = get("lm_head.weight", (v, h))
    if cfg.lm_head_bias:
        out["lm_head_bias"] = get("lm_head.bias", (v,))
    for i in range(cfg.num_layers):
        p, ours = f"model.layers.{i}", f"layers.{i}"
        for w in norms:
            out[f"{ours}.attn_norm.{w}"] = get(f"{p}.input_layernorm.{w}", (h,))
            out[f"{ours}.mlp_norm.{w}"] = get(f"{p}.post_attention_layernorm.{w}", (h,))
        out |= (_mla if cfg.is_mla else _attention)(cfg, get, f"{p}.self_attn", ours)
        if cfg.is_moe_layer(i):
            out |= (layout.moe_block or _moe_block)(cfg, tensors, get, p, ours, layout)
        else:
            out |= _dense(get, f"{p}.mlp", f"{ours}.mlp", cfg.dense_intermediate_size, h)
    return out


def _attention(cfg: MoEConfig, get, a: str, ours: str) -> Params:
    """Grouped-query attention weights (``self_attn`` at ``a``): projections and their biases,
    q/k norms, sinks."""
    h, d = cfg.hidden_size, cfg.head_dim
    q, kv = cfg.num_heads * d, cfg.num_kv_heads * d
    out: Params = {}
    for which, rows in (("q", q), ("k", kv), ("v", kv)):
        out[f"{ours}.attn.w{which}"] = get(f"{a}.{which}_proj.weight", (rows, h))
        if cfg.qkv_bias:
            out[f"{ours}.attn.b{which}"] = get(f"{a}.{which}_proj.bias", (rows,))
    out[f"{ours}.attn.wo"] = get(f"{a}.o_proj.weight", (h, q))
    if cfg.o_bias:
        out[f"{ours}.attn.bo"] = get(f"{a}.o_proj.bias", (h,))
    if cfg.qk_norm != "none":
        full = cfg.qk_norm == "full"
        out[f"{ours}.attn.q_norm.weight"] = get(f"{a}.q_norm.weight", (q if full else d,))
        out[f"{ours}.attn.k_norm.weight"] = get(f"{a}.k_norm.weight", (kv if full else d,))
    if cfg.attention_sinks:
        out[f"{ours}.attn.sinks"] = get(f"{a}.sinks", (cfg.num_heads,))
    return out


def _moe_block(cfg: MoEConfig, tensors: Tensors, get, p: str, ours: str, layout: Layout) -> Params:
    h, e, inter = cfg.hidden_size, cfg.num_experts, cfg.expert_intermediate_size
    found = [(f"{p}.{b}", r) for b in layout.blocks for r in layout.routers]
    block, router = next(
        ((b, r) for b, r in found if f"{b}.{r}.weight" in tensors), found[0]
    )  # absent: the error names the first
    out: Params = {f"{ours}.mlp.router": get(f"{block}.{router}.weight", (e, h))}
    x = f"{block}.experts"
    if f"{x}.gate_up_proj" in tensors:
        out[f"{ours}.mlp.w13"] = get(f"{x}.gate_up_proj", (e, 2 * inter, h))
        out[f"{ours}.mlp.w2"] = get(f"{x}.down_proj", (e, h, inter))
    else:
        gate = [get(f"{x}.{j}.{layout.gate}.weight", (inter, h)) for j in range(e)]
        up = [get(f"{x}.{j}.{layout.up}.weight", (inter, h)) for j in range(e)]
        down = [get(f"{x}.{j}.{layout.down}.weight", (h, inter)) for j in range(e)]
        out[f"{ours}.mlp.w13"] = ExpertStack(list(zip(gate, up)))
        out[f"{ours}.mlp.w2"] = ExpertStack([(t,) for t in down])
    if routing_function(cfg.router_mode).bias:
        out[f"{ours}.mlp.router_bias"] = get(f"{block}.{router}.e_score_correction_bias", (e,))
    if si := cfg.shared_expert_intermediate_size:
        out |= _dense(get, f"{block}.{layout.shared}", f"{ours}.mlp.shared", si, h)
    if cfg.shared_expert_gate:
        out[f"{ours}.mlp.shared_gate"] = get(f"{block}.shared_expert_gate.weight", (1, h))
    return out


def _dense(get, theirs: str, ours: str, inter: int, h: int) -> Params:
    """A dense SwiGLU MLP (gate_proj, up_proj, down_proj) as speq's ``w13`` and ``w2``."""
    gate, up = (
        get(f"{theirs}.gate_proj.weight", (inter, h)),
        get(f"{theirs}.up_proj.weight", (inter, h)),
    )
    return {
        f"{ours}.w13": torch.cat([gate, up]),
        f"{ours}.w2": get(f"{theirs}.down_proj.weight", (h, inter)),
    }


def _mla(cfg: MoEConfig, get, a: str, ours: str) -> Params:
    """DeepSeek's Multi-head Latent Attention weights (``self_attn`` at ``a``)."""
    h, r, rope, heads = cfg.hidden_size, cfg.kv_lora_rank, cfg.qk_rope_head_dim, cfg.num_heads
    q = heads * cfg.head_dim
    out: Params = {}
    if cfg.q_lora_rank:
        ql = cfg.q_lora_rank
        out[f"{ours}.attn.wq_a"] = get(f"{a}.q_a_proj.weight", (ql, h))
        out[f"{ours}.attn.q_a_norm.weight"] = get(f"{a}.q_a_layernorm.weight", (ql,))
        out[f"{ours}.attn.wq_b"] = get(f"{a}.q_b_proj.weight", (q, ql))
    else:
        out[f"{ours}.attn.wq"] = get(f"{a}.q_proj.weight", (q, h))
    out[f"{ours}.attn.wkv_a"] = get(f"{a}.kv_a_proj_with_mqa.weight", (r + rope, h))
    out[f"{ours}.attn.kv_a_norm.weight"] = get(f"{a}.kv_a_layernorm.weight", (r,))
    expand = heads * (cfg.head_dim - rope + cfg.v_head_dim)
    out[f"{ours}.attn.wkv_b"] = get(f"{a}.kv_b_proj.weight", (expand, r))
    out[f"{ours}.attn.wo"] = get(f"{a}.o_proj.weight", (h, cfg.attn_out_dim))
    return out
