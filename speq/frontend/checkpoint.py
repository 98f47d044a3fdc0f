"""A checkpoint folder as speq's spec and weights: speq's own format, or a Hugging Face one
(``config.json`` with a ``model_type`` of a supported family, speq.models.hf) in either expert
layout. Tensors stay memory-mapped (speq.frontend.folder); a per-expert checkpoint's experts
become `ExpertStack`s, so no expert is read until it is first copied to the device."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from speq.frontend.folder import Folder, open_folder
from speq.kernels.routing import routing_function
from speq.models.config import MoEConfig
from speq.models.hf import family_of
from speq.models.spec import ModelSpec
from speq.models.weights import check_tensors


def from_checkpoint(
    folder: str | Path,
    dtype: torch.dtype | None = None,
    progress: Callable[[int], None] | None = None,
) -> tuple[ModelSpec, dict[str, torch.Tensor]]:
    """The spec and the weights of a checkpoint folder (speq's format or a supported Hugging Face
    family's). Weights stay memory-mapped; a ``dtype`` conversion happens expert by expert as
    they are read. Every error names the file at fault (and the tensor or config field);
    ``progress(n)``: shards opened so far."""
    f = open_folder(folder, progress)
    if isinstance(f.config, dict) and "model_type" in f.config:
        params, config = _hf_weights(f)
    else:
        params, config = _speq_weights(f), _speq_config(f)
    dtype = dtype or _stored_dtype(params)
    params = {k: (v if v.dtype == dtype else v.to(dtype)) for k, v in params.items()}
    return ModelSpec(config, dtype), params


def _speq_config(f: Folder) -> MoEConfig:
    try:
        return MoEConfig.from_dict(f.config)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{f.config_path}: {e}") from None


def _speq_weights(f: Folder) -> dict[str, torch.Tensor]:
    expected = _expected_shapes(_speq_config(f))
    check_tensors(expected, f.tensors, f.where.__getitem__, f.files, f.config_path)
    return {k: v for k, v in f.tensors.items() if k in expected}


def _hf_weights(f: Folder) -> tuple[dict, MoEConfig]:
    family = family_of(f.config["model_type"])
    config = family.config(f.config, str(f.config_path))

    def where(name: str) -> str:
        return str(f.where[name]) if name in f.where else f.files

    return family.weights(config, f.tensors, where), config


def _stored_dtype(params: dict) -> torch.dtype:
    floats = [v.dtype for v in params.values() if v.dtype.is_floating_point]
    return floats[0] if floats else torch.float32


def _expected_shapes(cfg: MoEConfig) -> dict[str, tuple[int, ...]]:
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
        if cfg.qk_norm != "none":
            full = cfg.qk_norm == "full"
            shapes[f"{p}.attn.q_norm.weight"] = (q if full else d,)
            shapes[f"{p}.attn.k_norm.weight"] = (kv if full else d,)
        if cfg.is_moe_layer(i):
            e, n = cfg.num_experts, cfg.expert_intermediate_size
            if routing_function(cfg.router_mode).bias:
                shapes[f"{p}.mlp.router_bias"] = (e,)
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


def reference_model(folder: str | Path, dtype: torch.dtype | None = None):
    """A checkpoint folder of either format as speq's eager reference model
    (`speq.models.MoEForCausalLM`), its experts read and stacked: for tools that need a model
    object (the benchmarks, `speq export`); `speq.load` keeps a folder memory-mapped instead."""
    from speq.models.model import MoEForCausalLM
    from speq.models.weights import stacked

    spec, params = from_checkpoint(folder, dtype)
    model = MoEForCausalLM(spec.config, seed=0, dtype=spec.dtype)
    model.load_state_dict({k: stacked(v) for k, v in params.items()})
    return model.eval()


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
