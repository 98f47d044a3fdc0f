"""Reading a checkpoint folder: speq's own format, or a Hugging Face one (``config.json`` with a
``model_type`` of a supported family, speq.models.hf) in either expert layout, as a `MoEConfig`
and speq's weights. Tensors stay memory-mapped (speq.models.folder); a per-expert checkpoint's
experts become `ExpertStack`s. One reader for `speq.load` / `speq.compile(path)` (through
speq.frontend.checkpoint) and `MoEForCausalLM.from_pretrained`."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from speq.kernels.routing import routing_function
from speq.models.config import MoEConfig
from speq.models.folder import Folder, open_folder
from speq.models.hf import family_of
from speq.models.weights import ExpertStack, check_tensors


def read_checkpoint(
    folder: str | Path, progress: Callable[[int], None] | None = None
) -> tuple[MoEConfig, dict[str, torch.Tensor | ExpertStack]]:
    """The architecture and weights (speq's names, memory-mapped) of a checkpoint folder; every
    error names the file at fault (and the tensor or config field). A speq checkpoint must hold
    exactly its config's tensors; a Hugging Face one at least its family's (others, such as
    buffers a release saves, are not read). ``progress(n)``: shards opened so far."""
    f = open_folder(folder, progress)
    if isinstance(f.config, dict) and "model_type" in f.config:
        params, config = _hf_weights(f)
    else:
        config = _speq_config(f)
        params = _speq_weights(f, config)
    return config, params


def stored_dtype(params: dict) -> torch.dtype:
    """The dtype a checkpoint's weights are stored in (its first floating tensor's)."""
    floats = [v.dtype for v in params.values() if v.dtype.is_floating_point]
    return floats[0] if floats else torch.float32


def _speq_config(f: Folder) -> MoEConfig:
    try:
        return MoEConfig.from_dict(f.config)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{f.config_path}: {e}") from None


def _speq_weights(f: Folder, config: MoEConfig) -> dict[str, torch.Tensor]:
    expected = expected_shapes(config)
    check_tensors(expected, f.tensors, f.where.__getitem__, f.files, f.config_path)
    unexpected = sorted(set(f.tensors) - set(expected))
    if unexpected:
        raise ValueError(
            f"{f.files} has tensor(s) {', '.join(map(repr, unexpected[:5]))} that the model "
            f"{f.config_path} describes does not have"
        )
    return dict(f.tensors)


def _hf_weights(f: Folder) -> tuple[dict, MoEConfig]:
    family = family_of(f.config["model_type"])
    config = family.config(f.config, str(f.config_path))

    def where(name: str) -> str:
        return str(f.where[name]) if name in f.where else f.files

    return family.weights(config, f.tensors, where), config


def expected_shapes(cfg: MoEConfig) -> dict[str, tuple[int, ...]]:
    """Every weight `speq.models.MoEForCausalLM` has for ``cfg``, with its shape."""
    h, d, v = cfg.hidden_size, cfg.head_dim, cfg.vocab_size
    shapes: dict[str, tuple[int, ...]] = {"embed": (v, h), "norm.weight": (h,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head"] = (v, h)
    if cfg.lm_head_bias:
        shapes["lm_head_bias"] = (v,)
    layer_norm = cfg.norm == "layer"
    if layer_norm:
        shapes["norm.bias"] = (h,)
    for i in range(cfg.num_layers):
        p = f"layers.{i}"
        shapes |= {f"{p}.attn_norm.weight": (h,), f"{p}.mlp_norm.weight": (h,)}
        if layer_norm:
            shapes |= {f"{p}.attn_norm.bias": (h,), f"{p}.mlp_norm.bias": (h,)}
        q, kv = cfg.num_heads * d, cfg.num_kv_heads * d
        shapes[f"{p}.attn.wo"] = (h, cfg.attn_out_dim)
        if cfg.is_mla:
            shapes |= _mla_shapes(cfg, p)
        else:
            shapes |= {f"{p}.attn.wq": (q, h), f"{p}.attn.wk": (kv, h), f"{p}.attn.wv": (kv, h)}
        if cfg.qkv_bias:
            shapes |= {f"{p}.attn.bq": (q,), f"{p}.attn.bk": (kv,), f"{p}.attn.bv": (kv,)}
        if cfg.o_bias:
            shapes[f"{p}.attn.bo"] = (h,)
        if cfg.attention_sinks:
            shapes[f"{p}.attn.sinks"] = (cfg.num_heads,)
        if cfg.qk_norm != "none":
            full = cfg.qk_norm == "full"
            shapes[f"{p}.attn.q_norm.weight"] = (q if full else d,)
            shapes[f"{p}.attn.k_norm.weight"] = (kv if full else d,)
        if cfg.is_moe_layer(i):
            e, n = cfg.num_experts, cfg.expert_intermediate_size
            if routing_function(cfg.router_mode).bias:
                shapes[f"{p}.mlp.router_bias"] = (e,)
            if cfg.router_logit_bias:
                shapes[f"{p}.mlp.router_logit_bias"] = (e,)
            if cfg.expert_bias:
                n = cfg.expert_intermediate_size
                shapes |= {f"{p}.mlp.b13": (e, 2 * n), f"{p}.mlp.b2": (e, h)}
            shapes |= {
                f"{p}.mlp.router": (e, h),
                f"{p}.mlp.w13": (e, 2 * n, h),
                f"{p}.mlp.w2": (e, h, n),
            }
            if si := cfg.shared_expert_intermediate_size:
                shapes |= {f"{p}.mlp.shared.w13": (2 * si, h), f"{p}.mlp.shared.w2": (h, si)}
            if cfg.shared_expert_gate:
                shapes[f"{p}.mlp.shared_gate"] = (1, h)
        else:
            di = cfg.dense_intermediate_size
            shapes |= {f"{p}.mlp.w13": (2 * di, h), f"{p}.mlp.w2": (h, di)}
    return shapes


def _mla_shapes(cfg: MoEConfig, p: str) -> dict[str, tuple[int, ...]]:
    h, r, rope, q = (
        cfg.hidden_size,
        cfg.kv_lora_rank,
        cfg.qk_rope_head_dim,
        cfg.num_heads * cfg.head_dim,
    )
    shapes: dict[str, tuple[int, ...]] = {
        f"{p}.attn.wkv_a": (r + rope, h),
        f"{p}.attn.kv_a_norm.weight": (r,),
        f"{p}.attn.wkv_b": (cfg.num_heads * (cfg.head_dim - rope + cfg.v_head_dim), r),
    }
    if cfg.q_lora_rank:
        shapes |= {
            f"{p}.attn.wq_a": (cfg.q_lora_rank, h),
            f"{p}.attn.q_a_norm.weight": (cfg.q_lora_rank,),
            f"{p}.attn.wq_b": (q, cfg.q_lora_rank),
        }
    else:
        shapes[f"{p}.attn.wq"] = (q, h)
    return shapes
