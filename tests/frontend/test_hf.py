"""Hugging Face models: `speq.compile(hf_model)` and `speq.load(folder)` decode exactly what the
transformers model itself decodes (float64, greedy, token for token) under every kind of policy
with a budget that forces offloading, and sample from its distribution; the exported demo model
round-trips through transformers; unsupported models are named."""

from __future__ import annotations

import pytest
import torch
import transformers

import speq
from helpers import chi_square_p, first_sampled_counts, speq_budget

PROMPT = torch.tensor([[3, 1, 4, 1, 5]])
NEW = 20


TINY = dict(
    vocab_size=64,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_experts_per_tok=2,
    max_position_embeddings=64,
    initializer_range=0.3,  # at transformers' 0.02 a tiny model's text is one repeated token
)
# family -> (config class, model class, its own fields): each exercises what sets it apart
FAMILIES = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(num_local_experts=4, intermediate_size=16)),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        "Qwen2MoeForCausalLM",
        dict(
            num_experts=4, moe_intermediate_size=16, shared_expert_intermediate_size=24,
            intermediate_size=40, num_hidden_layers=3, mlp_only_layers=[0],
        ),
    ),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        dict(num_experts=4, moe_intermediate_size=16, head_dim=12, norm_topk_prob=True),
    ),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", dict(num_experts=4, intermediate_size=16, clip_qkv=0.5)),
    "phimoe": (
        "PhimoeConfig",
        "PhimoeForCausalLM",
        dict(num_local_experts=4, intermediate_size=16, attention_bias=True, lm_head_bias=True),
    ),
    "gpt_oss": (
        "GptOssConfig",
        "GptOssForCausalLM",
        dict(
            num_local_experts=4, intermediate_size=16, head_dim=12, sliding_window=8,
            swiglu_limit=1.0, attn_implementation="eager", num_hidden_layers=3,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        ),
    ),
    "deepseek_v2": (
        "DeepseekV2Config",
        "DeepseekV2ForCausalLM",
        dict(
            num_key_value_heads=4, n_routed_experts=4, n_group=2, topk_group=1,
            topk_method="group_limited_greedy", routed_scaling_factor=2.0, kv_lora_rank=16,
            q_lora_rank=None, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=10,
            moe_intermediate_size=16, n_shared_experts=1, first_k_dense_replace=1,
            intermediate_size=40, num_hidden_layers=3,
        ),
    ),
    "deepseek_v3": (
        "DeepseekV3Config",
        "DeepseekV3ForCausalLM",
        dict(
            num_key_value_heads=4, n_routed_experts=6, n_group=3, topk_group=2,
            routed_scaling_factor=1.5, kv_lora_rank=16, q_lora_rank=8, qk_nope_head_dim=8,
            qk_rope_head_dim=4, v_head_dim=10, moe_intermediate_size=16, n_shared_experts=1,
            first_k_dense_replace=1, intermediate_size=40, num_hidden_layers=3,
            norm_topk_prob=True,
        ),
    ),
}  # fmt: skip


def tiny_hf(family: str = "mixtral", vocab: int = 64, seed: int = 0, **overrides):
    """A tiny randomly initialised transformers model of ``family`` in float64, its norms and
    biases randomised too (transformers initialises them to ones and zeros, which would hide a
    mapping that dropped them)."""
    config_cls, model_cls, own = FAMILIES[family]
    cfg = getattr(transformers, config_cls)(**{**TINY, "vocab_size": vocab, **own, **overrides})
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(cfg).to(torch.float64).eval()
    with torch.no_grad():
        for name, p in [*model.named_parameters(), *model.named_buffers()]:
            if "norm" in name and p.is_floating_point():
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            elif name.endswith("correction_bias"):  # DeepSeek-V3's: steers, not decides
                p.copy_(0.05 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.2 * torch.randn_like(p))
            elif name.endswith("sinks"):  # GPT-OSS's attention sinks
                p.copy_(torch.randn_like(p))
    model.set_experts_implementation("eager")  # the grouped-mm default has no float64 kernel
    model.generation_config.eos_token_id = None  # decode exactly NEW tokens, as speq does
    return model


def tiny_mixtral(vocab: int = 64, seed: int = 0, **overrides):
    return tiny_hf("mixtral", vocab, seed, **overrides)


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def hf_case(request, tmp_path_factory):
    """(family, model, its own greedy output, the folder it saved)."""
    model = tiny_hf(request.param)
    with torch.no_grad():
        expected = model.generate(PROMPT, max_new_tokens=NEW, do_sample=False, pad_token_id=0)
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    return request.param, model, expected, path


@pytest.fixture(scope="module")
def mixtral_folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("mixtral")
    tiny_mixtral().save_pretrained(path)
    return path


POLICIES = {
    "resident": lambda b: speq.CompileOptions(policy="resident"),
    "ondemand": lambda b: speq.CompileOptions(policy="ondemand", device_memory=b),
    "speq-k3": lambda b: speq.CompileOptions(policy="speq", k=3, device_memory=b),
    "speq-governor": lambda b: speq.CompileOptions(policy="speq", device_memory=b),
}


@pytest.mark.parametrize("source", ["model", "folder"])
@pytest.mark.parametrize("policy", list(POLICIES))
def test_greedy_output_is_the_models_own(hf_case, source, policy):
    family, model, expected, folder = hf_case
    options = POLICIES[policy](speq_budget(model, slots=3))
    cm = speq.compile(model, options) if source == "model" else speq.load(folder, options)
    assert torch.equal(cm.generate(PROMPT, NEW), expected), family
    if policy != "resident":
        assert cm.metrics["bytes_moved"] > 0  # the budget forced offloading
    if policy == "speq-k3":
        assert cm.metrics["acceptance_rate"] is not None


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_the_first_sampled_token_follows_the_models_softmax(family):
    model = tiny_hf(family, vocab=7, seed=3)
    prompt = torch.tensor([[1, 4, 2]])
    with torch.no_grad():
        probs = torch.softmax(model(prompt).logits[0, -1].double() / 0.9, -1)
    assert chi_square_p(first_sampled_counts(model, prompt, 7), probs) > 1e-3


def test_a_per_expert_checkpoint_stays_per_expert(mixtral_folder):
    """transformers writes one tensor per expert projection; speq keeps them memory-mapped
    (an ExpertStack per layer), never stacking a layer's experts to copy one."""
    from speq.models.weights import ExpertStack

    cm = speq.load(mixtral_folder, speq.CompileOptions(policy="ondemand", device_memory="1GB"))
    assert all(isinstance(cm.store.w13[i], ExpertStack) for i in cm.store.layers)


def test_an_unsupported_model_is_named_with_the_supported_ones(tmp_path):
    cfg = transformers.LlamaConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(cfg)
    with pytest.raises(
        ValueError, match=r"does not support LlamaForCausalLM; supported: Mixtral.*Olmoe"
    ):
        speq.compile(model)
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"does not support model_type 'llama'; supported: Mix"):
        speq.load(tmp_path)


def test_the_base_model_without_its_head_is_refused():
    with pytest.raises(ValueError, match=r"needs a causal LM with its head \(MixtralForCausalLM\)"):
        speq.compile(tiny_mixtral().model)


def test_a_setting_speq_cannot_run_is_named():
    model = tiny_mixtral(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4})
    with pytest.raises(ValueError, match=r"RoPE type 'linear': speq supports the default RoPE"):
        speq.compile(model)


def test_a_sliding_window_decodes_as_transformers_does():
    """Mistral-style sliding-window attention (every layer sees the last 8 positions): the
    prompt and the output outrun it."""
    model = tiny_mixtral(sliding_window=8)
    with torch.no_grad():
        expected = model.generate(PROMPT, max_new_tokens=NEW, do_sample=False, pad_token_id=0)
    assert not torch.equal(expected, tiny_mixtral().generate(PROMPT, max_new_tokens=NEW))
    for options in (speq.CompileOptions(), speq.CompileOptions(policy="speq", k=3)):
        assert torch.equal(speq.compile(model, options).generate(PROMPT, NEW), expected)


def test_a_sharded_checkpoint_loads_through_its_index(tmp_path):
    model = tiny_mixtral()
    model.save_pretrained(tmp_path, max_shard_size="40KB")
    shards = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "model.safetensors.index.json").is_file()
    with torch.no_grad():
        expected = model.generate(PROMPT, max_new_tokens=NEW, do_sample=False, pad_token_id=0)
    opts = speq.CompileOptions(policy="ondemand", device_memory=speq_budget(model, slots=3))
    assert torch.equal(speq.load(tmp_path, opts).generate(PROMPT, NEW), expected)
