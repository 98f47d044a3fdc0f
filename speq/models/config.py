"""`MoEConfig`: the architecture of a speq reference MoE decoder, validated on construction."""

from __future__ import annotations

import dataclasses
import difflib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from speq.kernels.activation import ACTIVATIONS, Activation
from speq.kernels.routing import ROUTING_FUNCTIONS, ROUTING_MODES
from speq.models.weights import read_json

# how q and k are normalised before the rotary embedding: not at all; each head (a weight of
# head_dim, Qwen3-MoE); or each whole projection (a weight of heads * head_dim, OLMoE)
QK_NORMS = ("none", "head", "full")
# the decoder's norms: RMSNorm, or LayerNorm with a bias (PhiMoE)
NORMS = ("rms", "layer")


@dataclass(frozen=True)
class MoEConfig:
    """A decoder-only MoE transformer (the Mixtral / Phi-3.5-MoE / Qwen-MoE / DeepSeek-V2 family).

    Every layer is pre-norm attention then pre-norm MLP. The first ``first_dense_layers`` layers
    use a dense SwiGLU MLP of width ``dense_intermediate_size``; the others route each token to
    ``top_k`` of ``num_experts`` SwiGLU experts of width ``expert_intermediate_size``, plus a
    shared expert of width ``shared_expert_intermediate_size`` when that is non-zero.

    ``router_mode`` names a routing function of `speq.kernels.routing.ROUTING_FUNCTIONS`:
    ``"softmax_topk"`` (softmax over all experts, then the top k, renormalised to sum 1 when
    ``norm_topk_prob``) or ``"topk_softmax"`` (top k logits, then softmax over them).

    Attention: ``num_heads`` query heads of ``head_dim`` (default hidden_size / num_heads) over
    ``num_kv_heads`` key/value heads; ``qkv_bias`` / ``o_bias``: biases on the q, k, v / output
    projections; ``qk_norm`` (`QK_NORMS`): RMSNorm of q and k before the rotary embedding;
    ``clip_qkv``: q, k, v clamped to [-clip_qkv, clip_qkv] after the norm. ``shared_expert_gate``:
    the shared expert's output is scaled by sigmoid(x · w), a learned gate of one output.

    DeepSeek: ``routed_scaling_factor`` multiplies every routing weight; ``n_group`` /
    ``topk_group`` limit each token's experts to its best ``topk_group`` of ``n_group`` equal
    groups (speq.kernels.routing). ``kv_lora_rank`` > 0 makes attention Multi-head Latent
    Attention (MLA): the KV cache holds a ``kv_lora_rank`` latent and a ``qk_rope_head_dim``
    rotary key per token, expanded to every head's key (``head_dim`` = its non-rotary part +
    ``qk_rope_head_dim``) and value (``v_head_dim``); queries come through a ``q_lora_rank``
    bottleneck when that is > 0. MLA's rotary embedding rotates interleaved pairs.

    PhiMoE: ``norm`` (`NORMS`) ``"layer"`` makes the decoder's norms (before attention, before
    the MLP, final) LayerNorms with a bias; ``lm_head_bias``: the head has a bias;
    ``router_jitter_eps``: the sparsemixer router's closeness threshold.

    ``sliding_window`` > 0: the layers in ``sliding_layers`` attend to the last
    ``sliding_window`` positions only (Mistral-style sliding-window attention; the others attend
    to every position). ``attention_sinks``: each head has a learned sink logit that joins its
    softmax's normaliser and takes no value (GPT-OSS).

    GPT-OSS's experts: ``router_logit_bias``: the router's logits have a bias;
    ``expert_bias``: each routed expert has a bias on its gate/up and down products;
    ``activation`` (speq.kernels.activation) ``"swiglu_oai"`` with ``swiglu_alpha`` and
    ``swiglu_limit``: the routed experts' clamped SwiGLU (dense MLPs keep silu(gate) * up).
    """

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    num_experts: int
    top_k: int
    expert_intermediate_size: int
    shared_expert_intermediate_size: int = 0
    first_dense_layers: int = 0
    dense_intermediate_size: int | None = None
    norm_topk_prob: bool = True
    max_seq_len: int = 512
    tie_word_embeddings: bool = False
    router_mode: str = "softmax_topk"
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    head_dim: int | None = None
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: str = "none"
    clip_qkv: float | None = None
    shared_expert_gate: bool = False
    routed_scaling_factor: float = 1.0
    n_group: int = 1
    topk_group: int = 1
    kv_lora_rank: int = 0
    q_lora_rank: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    norm: str = "rms"
    lm_head_bias: bool = False
    router_jitter_eps: float = 0.0
    attention_sinks: bool = False
    sliding_window: int = 0
    sliding_layers: tuple[int, ...] = ()
    router_logit_bias: bool = False
    expert_bias: bool = False
    activation: str = "swiglu"
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0

    def __post_init__(self) -> None:
        for name in (
            "vocab_size",
            "hidden_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "num_experts",
            "top_k",
            "expert_intermediate_size",
            "max_seq_len",
        ):
            _require(name, getattr(self, name), lambda v: isinstance(v, int) and v >= 1, ">= 1")
        for name in ("shared_expert_intermediate_size", "first_dense_layers"):
            _require(name, getattr(self, name), lambda v: isinstance(v, int) and v >= 0, ">= 0")
        _require(
            "top_k",
            self.top_k,
            lambda v: v <= self.num_experts,
            f"<= num_experts ({self.num_experts})",
        )
        if self.head_dim is None:
            _require(
                "num_heads",
                self.num_heads,
                lambda v: self.hidden_size % v == 0,
                f"a divisor of hidden_size ({self.hidden_size}) when head_dim is not given",
            )
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        _require(
            "num_kv_heads",
            self.num_kv_heads,
            lambda v: self.num_heads % v == 0,
            f"a divisor of num_heads ({self.num_heads})",
        )
        _require(
            "head_dim",
            self.head_dim,
            lambda v: isinstance(v, int) and v >= 2 and v % 2 == 0,
            "an even size >= 2 (rotary embeddings rotate pairs; default hidden_size / num_heads)",
        )
        _require(
            "shared_expert_gate",
            self.shared_expert_gate,
            lambda v: not v or self.shared_expert_intermediate_size > 0,
            "false without a shared expert (shared_expert_intermediate_size > 0)",
        )
        _require("routed_scaling_factor", self.routed_scaling_factor, lambda v: v > 0, "> 0")
        _require(
            "n_group",
            self.n_group,
            lambda v: isinstance(v, int) and v >= 1 and self.num_experts % v == 0,
            f"a divisor of num_experts ({self.num_experts})",
        )
        _require(
            "topk_group",
            self.topk_group,
            lambda v: (
                isinstance(v, int)
                and 1 <= v <= self.n_group
                and self.top_k <= v * (self.num_experts // self.n_group)
            ),
            f"in 1..n_group ({self.n_group}), with top_k ({self.top_k}) experts in that many groups",
        )
        for name in ("kv_lora_rank", "q_lora_rank", "qk_rope_head_dim", "v_head_dim"):
            _require(name, getattr(self, name), lambda v: isinstance(v, int) and v >= 0, ">= 0")
        if self.is_mla:
            _require(
                "qk_rope_head_dim",
                self.qk_rope_head_dim,
                lambda v: v >= 2 and v % 2 == 0 and v <= self.head_dim,
                f"even, >= 2 and <= head_dim ({self.head_dim}) with MLA (kv_lora_rank > 0)",
            )
            _require("v_head_dim", self.v_head_dim, lambda v: v >= 1, ">= 1 with MLA")
            plain = not (self.qkv_bias or self.o_bias) and self.qk_norm == "none"
            _require(
                "kv_lora_rank",
                self.kv_lora_rank,
                lambda v: plain and self.clip_qkv is None,
                "0 with attention biases, q/k norms or clip_qkv (MLA has none of them)",
            )
        else:
            for name in ("q_lora_rank", "qk_rope_head_dim", "v_head_dim"):
                _require(
                    name, getattr(self, name), lambda v: v == 0, "0 without MLA (kv_lora_rank 0)"
                )
        _require("norm", self.norm, lambda v: v in NORMS, f"one of {NORMS}")
        _require("activation", self.activation, lambda v: v in ACTIVATIONS, f"one of {ACTIVATIONS}")
        _require("swiglu_limit", self.swiglu_limit, lambda v: v > 0, "> 0")
        object.__setattr__(self, "sliding_layers", tuple(self.sliding_layers))
        _require(
            "sliding_window",
            self.sliding_window,
            lambda v: isinstance(v, int) and v >= 0 and (v > 0 or not self.sliding_layers),
            ">= 0, and >= 1 when sliding_layers are given",
        )
        _require(
            "sliding_layers",
            self.sliding_layers,
            lambda v: all(isinstance(i, int) and 0 <= i < self.num_layers for i in v),
            f"layer indices in 0..{self.num_layers - 1}",
        )
        if self.router_mode == "sparsemixer":
            _require("top_k", self.top_k, lambda v: v == 2, "2 with the sparsemixer router")
            _require("router_jitter_eps", self.router_jitter_eps, lambda v: v > 0, "> 0")
        _require("qk_norm", self.qk_norm, lambda v: v in QK_NORMS, f"one of {QK_NORMS}")
        _require("clip_qkv", self.clip_qkv, lambda v: v is None or v > 0, "> 0, or null")
        _require(
            "first_dense_layers",
            self.first_dense_layers,
            lambda v: v <= self.num_layers,
            f"<= num_layers ({self.num_layers})",
        )
        if self.first_dense_layers > 0:
            _require(
                "dense_intermediate_size",
                self.dense_intermediate_size,
                lambda v: isinstance(v, int) and v >= 1,
                ">= 1 when first_dense_layers > 0",
            )
        _require(
            "router_mode",
            self.router_mode,
            lambda v: v in ROUTING_FUNCTIONS,
            f"one of {ROUTING_MODES}",
        )
        _require("rope_theta", self.rope_theta, lambda v: v > 0, "> 0")
        _require("rms_norm_eps", self.rms_norm_eps, lambda v: v > 0, "> 0")

    @property
    def is_mla(self) -> bool:
        """Whether attention is Multi-head Latent Attention (kv_lora_rank > 0)."""
        return self.kv_lora_rank > 0

    @property
    def attn_out_dim(self) -> int:
        """Width of the attention output (the output projection's input): heads x value size."""
        return self.num_heads * (self.v_head_dim if self.is_mla else self.head_dim)

    @property
    def expert_activation(self) -> Activation:
        """The routed experts' activation."""
        return Activation(self.activation, self.swiglu_alpha, self.swiglu_limit)

    def window(self, layer: int) -> int:
        """The positions ``layer`` attends to (its sliding window), 0 for all of them."""
        return self.sliding_window if layer in self.sliding_layers else 0

    def is_moe_layer(self, layer: int) -> bool:
        return layer >= self.first_dense_layers

    @property
    def moe_layers(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.num_layers) if self.is_moe_layer(i))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MoEConfig:
        """A config from a dict of its fields (as `to_dict` writes them); a ValueError names each
        unknown or missing field, or a field of the wrong type."""
        if not isinstance(d, dict):
            raise ValueError(
                f"MoEConfig: expected a mapping (a JSON object) of field names to values, "
                f"got {_json_type(d)}"
            )
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - set(fields), key=str)
        if unknown:
            hints = []
            for name in unknown:
                close = difflib.get_close_matches(str(name), fields, n=1)
                hints.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            raise ValueError(
                f"MoEConfig: unknown field(s) {', '.join(hints)}; the fields are "
                f"{', '.join(fields)}"
            )
        required = [
            name
            for name, f in fields.items()
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        ]
        missing = [name for name in required if name not in d]
        if missing:
            also = "" if len(missing) == len(required) else f" (required: {', '.join(required)})"
            raise ValueError(f"MoEConfig: missing required field(s) {', '.join(missing)}{also}")
        for name, value in d.items():
            kind = _FIELD_TYPES.get(str(fields[name].type))
            if kind is not None and not _is_a(value, kind):
                raise ValueError(
                    f"MoEConfig.{name} = {value!r} has the wrong type: expected {_KINDS[kind]}, "
                    f"got {_json_type(value)}"
                )
        return cls(**d)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> MoEConfig:
        """A config from a JSON file; every error names the file."""
        d = read_json(Path(path), "a JSON object of MoEConfig fields")
        try:
            return cls.from_dict(d)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{path}: {e}") from None


# The JSON types a field's annotation accepts (from_dict), and how an error names them.
_FIELD_TYPES = {
    "int": "int",
    "int | None": "int_or_none",
    "float | None": "number_or_none",
    "tuple[int, ...]": "int_list",
    "bool": "bool",
    "str": "str",
    "float": "number",
}
_KINDS = {
    "int": "an integer",
    "int_or_none": "an integer or null",
    "number_or_none": "a number or null",
    "int_list": "an array of integers",
    "bool": "true or false",
    "str": "a string",
    "number": "a number",
}


def _is_a(value: object, kind: str) -> bool:
    if kind == "bool":
        return isinstance(value, bool)
    if isinstance(value, bool):  # JSON true/false are not numbers
        return False
    if kind == "int":
        return isinstance(value, int)
    if kind == "int_or_none":
        return value is None or isinstance(value, int)
    if kind == "number":
        return isinstance(value, (int, float))
    if kind == "int_list":
        return isinstance(value, (list, tuple)) and all(_is_a(v, "int") for v in value)
    if kind == "number_or_none":
        return value is None or isinstance(value, (int, float))
    return isinstance(value, str)


def _json_type(value: object) -> str:
    """``value``'s type as JSON names it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a float"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (list, tuple)):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _require(name: str, value: object, ok, expected: str) -> None:
    try:
        good = bool(ok(value))
    except TypeError:
        good = False
    if not good:
        raise ValueError(f"MoEConfig.{name} = {value!r} is invalid: expected {expected}")
