"""The trained demo checkpoint shipped in the package: loads, has the documented shape, generates."""

import json

import torch

from speq.models import MoEConfig, MoEForCausalLM, demo_model
from speq.models.demo import DEMO_CHECKPOINT
from speq.models.tokenizer import Tokenizer

DOCUMENTED = {
    "vocab_size": 4096,
    "hidden_size": 192,
    "num_layers": 4,
    "num_heads": 6,
    "num_kv_heads": 2,
    "num_experts": 8,
    "top_k": 2,
    "expert_intermediate_size": 384,
    "shared_expert_intermediate_size": 0,
    "first_dense_layers": 0,
    "max_seq_len": 512,
    "tie_word_embeddings": True,
    "router_mode": "softmax_topk",
    "norm_topk_prob": True,
}


def greedy(model: MoEForCausalLM, prompt: list[int], n: int) -> list[int]:
    ids = torch.tensor([prompt])
    out: list[int] = []
    with torch.no_grad():
        cache = model.new_cache()
        logits = model(ids, cache, 0)
        pos = ids.shape[1]
        for _ in range(n):
            nxt = int(logits[0, -1].float().argmax())
            out.append(nxt)
            logits = model(torch.tensor([[nxt]]), cache, pos)
            pos += 1
    return out


def test_checkpoint_files_are_shipped():
    for name in ("config.json", "model.safetensors", "tokenizer.json", "routing_stats.json"):
        assert (DEMO_CHECKPOINT / name).is_file(), name
    size = sum(f.stat().st_size for f in DEMO_CHECKPOINT.iterdir())
    assert size <= 20 * 2**20
    stats = json.loads((DEMO_CHECKPOINT / "routing_stats.json").read_text())
    assert len(stats["layers"]) == DOCUMENTED["num_layers"]


def test_demo_model_has_the_documented_config():
    model, tok = demo_model()
    assert isinstance(model, MoEForCausalLM) and isinstance(tok, Tokenizer)
    assert model.config == MoEConfig.from_dict({**model.config.to_dict(), **DOCUMENTED})
    assert model.embed.dtype == torch.bfloat16
    assert tok.vocab_size == model.config.vocab_size
    assert tok.eos_id == 0


def test_greedy_generation_is_deterministic_and_decodes():
    model, tok = demo_model(dtype=torch.float32)
    prompt = tok.encode("In the beginning God created")
    assert prompt and all(0 <= i < tok.vocab_size for i in prompt)
    a = greedy(model, prompt, 12)
    b = greedy(model, prompt, 12)
    assert a == b and len(a) == 12
    text = tok.decode(a)
    assert isinstance(text, str)
    assert tok.decode(prompt) == "In the beginning God created"
