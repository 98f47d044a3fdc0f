"""The reference MoE decoder: a plain eager torch module, the numerical ground truth of speq."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from speq.kernels.routing import routing_function
from speq.models import functional as fn
from speq.models.checkpoint import read_checkpoint, stored_dtype
from speq.models.config import MoEConfig
from speq.models.kv_cache import KVCache
from speq.models.weights import stacked


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fn.rms_norm(x, self.weight, self.eps)


class LayerNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.bias = nn.Parameter(torch.zeros(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fn.layer_norm(x, self.weight, self.bias, self.eps)


def decoder_norm(cfg: MoEConfig) -> nn.Module:
    """One of the decoder's norms (before attention, before the MLP, final): `MoEConfig.norm`."""
    cls = LayerNorm if cfg.norm == "layer" else RMSNorm
    return cls(cfg.hidden_size, cfg.rms_norm_eps)


class Attention(nn.Module):
    def __init__(self, cfg: MoEConfig) -> None:
        super().__init__()
        d, h = cfg.head_dim, cfg.hidden_size
        self.cfg = cfg
        self.wq = nn.Parameter(torch.empty(cfg.num_heads * d, h))
        self.wk = nn.Parameter(torch.empty(cfg.num_kv_heads * d, h))
        self.wv = nn.Parameter(torch.empty(cfg.num_kv_heads * d, h))
        self.wo = nn.Parameter(torch.empty(h, cfg.num_heads * d))
        if cfg.qkv_bias:
            self.bq = nn.Parameter(torch.empty(cfg.num_heads * d))
            self.bk = nn.Parameter(torch.empty(cfg.num_kv_heads * d))
            self.bv = nn.Parameter(torch.empty(cfg.num_kv_heads * d))
        if cfg.o_bias:
            self.bo = nn.Parameter(torch.empty(h))
        if cfg.qk_norm != "none":
            full = cfg.qk_norm == "full"
            self.q_norm = RMSNorm(cfg.num_heads * d if full else d, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(cfg.num_kv_heads * d if full else d, cfg.rms_norm_eps)
        if cfg.attention_sinks:
            self.sinks = nn.Parameter(torch.empty(cfg.num_heads))

    def _project(self, x: torch.Tensor, name: str) -> torch.Tensor:
        y = fn.linear(x, getattr(self, f"w{name}"), getattr(self, f"b{name}", None))
        if name in ("q", "k") and self.cfg.qk_norm != "none":
            y = getattr(self, f"{name}_norm")(y)
        if self.cfg.clip_qkv is not None:
            y = y.clamp(-self.cfg.clip_qkv, self.cfg.clip_qkv)
        return y

    def forward(
        self, x: torch.Tensor, layer: int, start: int, cache: KVCache | None
    ) -> torch.Tensor:
        cfg, (b, t, _) = self.cfg, x.shape
        pos = torch.arange(start, start + t, device=x.device)
        q = fn.rope(self._project(x, "q").view(b, t, cfg.num_heads, -1), pos, cfg.rope_theta)
        k = fn.rope(self._project(x, "k").view(b, t, cfg.num_kv_heads, -1), pos, cfg.rope_theta)
        v = self._project(x, "v").view(b, t, cfg.num_kv_heads, -1)
        if cache is not None:
            cache.write(layer, k, v, start)
            k, v = cache.view(layer, start + t)
        o = fn.attention(q, k, v, start, getattr(self, "sinks", None), cfg.window(layer))
        return fn.linear(o.reshape(b, t, -1), self.wo, getattr(self, "bo", None))


class MLAttention(nn.Module):
    """Multi-head Latent Attention (DeepSeek-V2/V3): the cache holds, per token, the normalised
    ``kv_lora_rank`` latent and the rotated ``qk_rope_head_dim`` key (as one KV cache "key" of
    one head; values are expanded from the latent)."""

    def __init__(self, cfg: MoEConfig) -> None:
        super().__init__()
        h, r, rope = cfg.hidden_size, cfg.kv_lora_rank, cfg.qk_rope_head_dim
        self.cfg = cfg
        q = cfg.num_heads * cfg.head_dim
        if cfg.q_lora_rank:
            self.wq_a = nn.Parameter(torch.empty(cfg.q_lora_rank, h))
            self.q_a_norm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps)
            self.wq_b = nn.Parameter(torch.empty(q, cfg.q_lora_rank))
        else:
            self.wq = nn.Parameter(torch.empty(q, h))
        self.wkv_a = nn.Parameter(torch.empty(r + rope, h))
        self.kv_a_norm = RMSNorm(r, cfg.rms_norm_eps)
        nope = cfg.head_dim - rope
        self.wkv_b = nn.Parameter(torch.empty(cfg.num_heads * (nope + cfg.v_head_dim), r))
        self.wo = nn.Parameter(torch.empty(h, cfg.attn_out_dim))

    def forward(
        self, x: torch.Tensor, layer: int, start: int, cache: KVCache | None
    ) -> torch.Tensor:
        cfg, (b, t, _) = self.cfg, x.shape
        pos = torch.arange(start, start + t, device=x.device)
        if cfg.q_lora_rank:
            q = self.q_a_norm(x @ self.wq_a.t()) @ self.wq_b.t()
        else:
            q = x @ self.wq.t()
        entry = mla_entry(x @ self.wkv_a.t(), self.kv_a_norm.weight, cfg, pos)  # [B, T, r + R]
        if cache is not None:
            cache.write(layer, entry[:, :, None], entry[:, :, None, :0], start)
            entry = cache.view(layer, start + t)[0][:, :, 0]
        r = cfg.kv_lora_rank
        o = fn.mla_attention(
            q.view(b, t, cfg.num_heads, -1),
            entry[..., :r],
            entry[..., r:],
            self.wkv_b,
            cfg.v_head_dim,
            pos,
            start,
            cfg.rope_theta,
        )
        return o.reshape(b, t, -1) @ self.wo.t()


def mla_entry(
    compressed: torch.Tensor, norm_weight: torch.Tensor, cfg: MoEConfig, positions: torch.Tensor
) -> torch.Tensor:
    """What MLA caches for ``compressed`` (see `functional.mla_cache_entry`)."""
    r, eps = cfg.kv_lora_rank, cfg.rms_norm_eps
    return fn.mla_cache_entry(compressed, norm_weight, r, eps, positions, cfg.rope_theta)


class DenseMLP(nn.Module):
    """A SwiGLU MLP; ``w13 [2I, H]`` stacks the gate rows then the up rows, ``w2 [H, I]``."""

    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.w13 = nn.Parameter(torch.empty(2 * intermediate, hidden))
        self.w2 = nn.Parameter(torch.empty(hidden, intermediate))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fn.swiglu(x @ self.w13.t()) @ self.w2.t()


class MoEBlock(nn.Module):
    """Routed experts ``w13 [E, 2I, H]``, ``w2 [E, H, I]``, a router and an optional shared expert."""

    def __init__(self, cfg: MoEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        e, i, h = cfg.num_experts, cfg.expert_intermediate_size, cfg.hidden_size
        self.router = nn.Parameter(torch.empty(e, h))
        self.w13 = nn.Parameter(torch.empty(e, 2 * i, h))
        self.w2 = nn.Parameter(torch.empty(e, h, i))
        if routing_function(cfg.router_mode).bias:
            self.router_bias = nn.Parameter(torch.zeros(e))
        if cfg.router_logit_bias:
            self.router_logit_bias = nn.Parameter(torch.zeros(e))
        if cfg.expert_bias:
            self.b13 = nn.Parameter(torch.zeros(e, 2 * i))
            self.b2 = nn.Parameter(torch.zeros(e, h))
        si = cfg.shared_expert_intermediate_size
        self.shared = DenseMLP(h, si) if si else None
        if cfg.shared_expert_gate:
            self.shared_gate = nn.Parameter(torch.empty(1, h))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cfg, shape = self.cfg, x.shape
        flat = x.reshape(-1, shape[-1])
        y = fn.moe(
            flat,
            self.router,
            self.w13,
            self.w2,
            cfg.top_k,
            cfg.router_mode,
            cfg.norm_topk_prob,
            fn.limits_of(cfg, getattr(self, "router_bias", None)),
            fn.ExpertExtras(
                getattr(self, "router_logit_bias", None),
                getattr(self, "b13", None),
                getattr(self, "b2", None),
                cfg.expert_activation,
            ),
        )
        if self.shared is not None:
            shared = self.shared(flat)
            if self.cfg.shared_expert_gate:
                shared = fn.sigmoid_mul(flat @ self.shared_gate.t(), shared)
            y = y + shared
        return y.view(shape)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: MoEConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.attn_norm = decoder_norm(cfg)
        self.attn = MLAttention(cfg) if cfg.is_mla else Attention(cfg)
        self.mlp_norm = decoder_norm(cfg)
        if cfg.is_moe_layer(layer):
            self.mlp: nn.Module = MoEBlock(cfg)
        else:
            self.mlp = DenseMLP(cfg.hidden_size, cfg.dense_intermediate_size)

    def forward(self, x: torch.Tensor, start: int, cache: KVCache | None) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), self.layer, start, cache)
        return x + self.mlp(self.mlp_norm(x))


class MoEForCausalLM(nn.Module):
    """A decoder-only MoE language model with deterministic, seeded initialisation.

    ``model(input_ids)`` runs the whole sequence causally and returns logits ``[B, T, vocab]``.
    With a ``KVCache`` it runs T new tokens at ``start`` against the cached prefix instead.
    """

    def __init__(
        self, config: MoEConfig, seed: int = 0, dtype: torch.dtype = torch.float32
    ) -> None:
        super().__init__()
        if not isinstance(config, MoEConfig):
            raise TypeError(f"config must be a MoEConfig, got {type(config).__name__}")
        self.config = config
        self.embed = nn.Parameter(torch.empty(config.vocab_size, config.hidden_size))
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = decoder_norm(config)
        if config.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = nn.Parameter(torch.empty(config.vocab_size, config.hidden_size))
        if config.lm_head_bias:
            self.lm_head_bias = nn.Parameter(torch.empty(config.vocab_size))
        self._init_weights(seed)
        self.to(dtype)

    @torch.no_grad()
    def _init_weights(self, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        for name, p in sorted(self.named_parameters()):
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name == "embed":
                p.normal_(0.0, 1.0, generator=gen)
            else:
                p.normal_(0.0, p.shape[-1] ** -0.5, generator=gen)

    @property
    def head_weight(self) -> torch.Tensor:
        return self.embed if self.lm_head is None else self.lm_head

    def forward(
        self, input_ids: torch.Tensor, cache: KVCache | None = None, start: int = 0
    ) -> torch.Tensor:
        if input_ids.dim() != 2 or input_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(
                f"input_ids must be an integer tensor [batch, tokens], got {input_ids.dtype} "
                f"{tuple(input_ids.shape)}"
            )
        t = input_ids.shape[1]
        if start + t > self.config.max_seq_len:
            raise ValueError(
                f"positions {start}..{start + t - 1} exceed max_seq_len = {self.config.max_seq_len}"
            )
        x = self.embed[input_ids]
        for layer in self.layers:
            x = layer(x, start, cache)
        if cache is not None:
            cache.length = start + t
        return fn.linear(self.norm(x), self.head_weight, getattr(self, "lm_head_bias", None))

    def new_cache(self, batch: int = 1) -> KVCache:
        return KVCache(self.config, batch, self.embed.dtype, self.embed.device)

    def save_pretrained(self, path: str | Path) -> None:
        """Write ``config.json`` and ``model.safetensors`` into the folder ``path``."""
        from safetensors.torch import save_file

        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        self.config.save(folder / "config.json")
        tensors = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype | None = None) -> MoEForCausalLM:
        """Load a checkpoint folder: one ``save_pretrained`` wrote, or a Hugging Face one of a
        supported family (speq.models.hf). Weights keep their stored dtype by default; every
        expert is read and stacked (`speq.load` keeps a folder memory-mapped instead).

        A fault in the folder is a FileNotFoundError or ValueError naming the file at fault (and
        the tensor or config field)."""
        config, params = read_checkpoint(path)
        model = cls(config, seed=0, dtype=dtype or stored_dtype(params))
        model.load_state_dict({k: stacked(v).to(model.embed.dtype) for k, v in params.items()})
        return model.eval()
