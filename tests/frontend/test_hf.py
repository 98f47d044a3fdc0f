"""Hugging Face models: `speq.compile(hf_model)` and `speq.load(folder)` decode exactly what the
transformers model itself decodes (float64, greedy, token for token) under every kind of policy
with a budget that forces offloading, and sample from its distribution; the exported demo model
round-trips through transformers; unsupported models are named."""

from __future__ import annotations

import pytest
import torch
import transformers

import speq
from helpers import chi_square_p, speq_budget

PROMPT = torch.tensor([[3, 1, 4, 1, 5]])
NEW = 20


def tiny_mixtral(vocab: int = 64, seed: int = 0, **overrides) -> transformers.PreTrainedModel:
    cfg = transformers.MixtralConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=64,
        **overrides,
    )
    torch.manual_seed(seed)
    model = transformers.MixtralForCausalLM(cfg).to(torch.float64).eval()
    model.set_experts_implementation("eager")  # the grouped-mm default has no float64 kernel
    model.generation_config.eos_token_id = None  # decode exactly NEW tokens, as speq does
    return model


@pytest.fixture(scope="module")
def mixtral():
    model = tiny_mixtral()
    with torch.no_grad():
        expected = model.generate(PROMPT, max_new_tokens=NEW, do_sample=False, pad_token_id=0)
    return model, expected


@pytest.fixture(scope="module")
def mixtral_folder(mixtral, tmp_path_factory):
    path = tmp_path_factory.mktemp("mixtral")
    mixtral[0].save_pretrained(path)
    return path


POLICIES = {
    "resident": lambda b: speq.CompileOptions(policy="resident"),
    "ondemand": lambda b: speq.CompileOptions(policy="ondemand", device_memory=b),
    "speq-k3": lambda b: speq.CompileOptions(policy="speq", k=3, device_memory=b),
    "speq-governor": lambda b: speq.CompileOptions(policy="speq", device_memory=b),
}


@pytest.mark.parametrize("source", ["model", "folder"])
@pytest.mark.parametrize("policy", list(POLICIES))
def test_greedy_output_is_the_models_own(mixtral, mixtral_folder, source, policy):
    model, expected = mixtral
    options = POLICIES[policy](speq_budget(model, slots=3))
    cm = speq.compile(model, options) if source == "model" else speq.load(mixtral_folder, options)
    assert torch.equal(cm.generate(PROMPT, NEW), expected)
    if policy != "resident":
        assert cm.metrics["hit_rate"] < 1.0  # the budget forced offloading
    if policy == "speq-k3":
        assert cm.metrics["acceptance_rate"] is not None


def test_the_first_sampled_token_follows_the_models_softmax():
    model = tiny_mixtral(vocab=7, seed=3)
    prompt = torch.tensor([[1, 4, 2]])
    with torch.no_grad():
        probs = torch.softmax(model(prompt).logits[0, -1].double() / 0.9, -1)
    cm = speq.compile(model, speq.CompileOptions(policy="speq", k=1))
    counts = torch.zeros(7)
    for seed in range(800):
        out = cm.generate(prompt, 2, do_sample=True, temperature=0.9, seed=seed)
        counts[out[0, 3]] += 1
    assert chi_square_p(counts, probs) > 1e-3


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
    with pytest.raises(ValueError, match=r"does not support LlamaForCausalLM; supported: Mixtral"):
        speq.compile(model)
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"does not support model_type 'llama'; supported: Mix"):
        speq.load(tmp_path)


def test_the_base_model_without_its_head_is_refused(mixtral):
    with pytest.raises(ValueError, match=r"needs a causal LM with its head \(MixtralForCausalLM\)"):
        speq.compile(mixtral[0].model)


def test_a_setting_speq_cannot_run_is_named(tmp_path):
    model = tiny_mixtral(sliding_window=16)
    with pytest.raises(ValueError, match=r"sliding_window = 16 < max_position_embeddings = 64"):
        speq.compile(model)
