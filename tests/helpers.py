"""Small model configurations shared by the tests."""

from __future__ import annotations

import torch

from speq.models import MoEConfig, MoEForCausalLM

BASE = dict(
    vocab_size=61,
    hidden_size=32,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    num_experts=5,
    top_k=2,
    expert_intermediate_size=24,
    max_seq_len=64,
)

# name -> overrides of BASE: the architecture variants every end-to-end invariant is checked on
VARIANTS: dict[str, dict] = {
    "top1": dict(top_k=1),
    "top2_gqa": dict(),
    "topE": dict(top_k=5),
    "mha_shared": dict(num_kv_heads=4, shared_expert_intermediate_size=16),
    "dense_first_topk_softmax": dict(
        num_layers=3, first_dense_layers=1, dense_intermediate_size=40, router_mode="topk_softmax"
    ),
    "tied_no_renorm_mqa": dict(tie_word_embeddings=True, norm_topk_prob=False, num_kv_heads=1),
    # Qwen-MoE-like: biases, per-head q/k norm with a head size that is not hidden / heads, and
    # a shared expert scaled by a sigmoid gate
    "qwen_gated_headnorm": dict(
        qkv_bias=True,
        o_bias=True,
        qk_norm="head",
        head_dim=12,
        shared_expert_intermediate_size=16,
        shared_expert_gate=True,
        norm_topk_prob=False,
    ),
    # OLMoE-like: q/k norm over the whole projection, q, k, v clamped (a limit that bites)
    "olmoe_fullnorm_clip": dict(qk_norm="full", clip_qkv=0.6),
    # PhiMoE-like: LayerNorms, biased attention and head, the sparsemixer router
    "phimoe_layernorm_sparsemixer": dict(
        norm="layer",
        lm_head_bias=True,
        qkv_bias=True,
        o_bias=True,
        router_mode="sparsemixer",
        router_jitter_eps=0.01,
    ),
    # GPT-OSS-like attention: a sink per head, every other layer a sliding window (the test
    # prompts and outputs outrun it)
    "sinks_sliding_window": dict(
        num_layers=3, attention_sinks=True, sliding_window=6, sliding_layers=(0, 2), head_dim=12
    ),
    # GPT-OSS-like experts: biased router and experts, the clamped SwiGLU (a limit that bites)
    "oai_expert_biases": dict(
        router_mode="topk_softmax",
        router_logit_bias=True,
        expert_bias=True,
        activation="swiglu_oai",
        swiglu_limit=0.5,
        qkv_bias=True,
        o_bias=True,
    ),
    # DeepSeek-V2-like: MLA with a q bottleneck, group-limited softmax routing scaled, a shared
    # expert and a dense first layer
    "deepseek_v2_mla": dict(
        num_layers=3,
        first_dense_layers=1,
        dense_intermediate_size=40,
        kv_lora_rank=16,
        q_lora_rank=8,
        qk_rope_head_dim=4,
        head_dim=12,
        v_head_dim=10,
        num_experts=6,
        n_group=3,
        topk_group=2,
        routed_scaling_factor=2.0,
        norm_topk_prob=False,
        shared_expert_intermediate_size=16,
    ),
    # DeepSeek-V3-like: MLA, sigmoid routing with a correction bias, groups, renormalised
    "deepseek_v3_sigmoid": dict(
        kv_lora_rank=16,
        qk_rope_head_dim=4,
        head_dim=12,
        v_head_dim=10,
        num_experts=6,
        router_mode="sigmoid_topk",
        n_group=3,
        topk_group=2,
        routed_scaling_factor=1.5,
    ),
}


def tiny_config(**overrides) -> MoEConfig:
    return MoEConfig(**{**BASE, **overrides})


def tiny_model(dtype: torch.dtype = torch.float64, seed: int = 0, **overrides) -> MoEForCausalLM:
    return MoEForCausalLM(tiny_config(**overrides), seed=seed, dtype=dtype)


@torch.no_grad()
def speq_budget(model: MoEForCausalLM, slots: int) -> int:
    """A device budget for ``policy="speq"`` with a separate INT4 draft: the non-expert
    weights, the KV cache, the draft's INT4 copy of every expert and ``slots`` expert slots
    (under shared draft memory, the default, the same bytes hold more slots)."""
    import speq

    separate = speq.CompileOptions(policy="speq", k=1, draft_memory="separate")
    m = speq.compile(model, separate).memory  # k: keeps the draft
    return m.non_expert_bytes + m.kv_bytes + m.draft_bytes + slots * m.expert_bytes


def eager_greedy(model: MoEForCausalLM, ids: torch.Tensor, n: int) -> torch.Tensor:
    """Target-only greedy decoding by full recomputation: argmax of model(ids)[:, -1], n times."""
    for _ in range(n):
        ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


def chi_square_p(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """P-value of Pearson's chi-square goodness of fit (cells with expected count < 5 merged)."""
    n = counts.sum()
    expected = probs.double() * n
    big = expected >= 5
    obs = torch.cat([counts[big].double(), counts[~big].double().sum().reshape(1)])
    exp = torch.cat([expected[big], expected[~big].sum().reshape(1)])
    keep = exp > 0
    obs, exp = obs[keep], exp[keep]
    stat = ((obs - exp) ** 2 / exp).sum()
    df = len(exp) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2.0), stat / 2.0))


def sampling_case() -> tuple[MoEForCausalLM, torch.Tensor, torch.Tensor]:
    """The sampling tests' model (7 tokens), prompt, and the target's first-token
    distribution at temperature 0.9, which speq's speculative sampling must keep."""
    model = tiny_model(torch.float64, vocab_size=7, num_layers=2, seed=3)
    prompt = torch.tensor([[1, 4, 2]])
    with torch.no_grad():
        probs = torch.softmax(model(prompt)[0, -1].double() / 0.9, -1)
    return model, prompt, probs


def first_sampled_counts(
    model, prompt: torch.Tensor, probs_size: int, temperature: float = 0.9, options=None
):
    """How often each token comes first out of speq's speculative sampling (k = 1) after
    ``prompt``, over 800 seeds: what the sampling tests compare with the model's own softmax.
    ``options``: CompileOptions (default: policy speq, k = 1, every expert resident)."""
    import speq

    cm = speq.compile(model, options or speq.CompileOptions(policy="speq", k=1))
    counts = torch.zeros(probs_size)
    for seed in range(800):
        out = cm.generate(prompt, 2, do_sample=True, temperature=temperature, seed=seed)
        counts[out[0, prompt.shape[1]]] += 1
    return counts
