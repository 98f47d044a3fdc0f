import pytest

from helpers import BASE, tiny_config
from speq.models import MoEConfig


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (dict(top_k=6), "top_k"),
        (dict(top_k=0), "top_k"),
        (dict(num_heads=5), "num_heads"),
        (dict(num_kv_heads=3), "num_kv_heads"),
        (dict(hidden_size=36, num_heads=12), "head_dim"),  # odd head size
        (dict(head_dim=7), "head_dim"),
        (dict(qk_norm="sometimes"), "qk_norm"),
        (dict(clip_qkv=0.0), "clip_qkv"),
        (dict(shared_expert_gate=True), "shared_expert_gate"),  # without a shared expert
        (dict(vocab_size=0), "vocab_size"),
        (dict(first_dense_layers=1), "dense_intermediate_size"),
        (dict(first_dense_layers=3, dense_intermediate_size=8), "first_dense_layers"),
        (dict(router_mode="sigmoid"), "router_mode"),
        (dict(shared_expert_intermediate_size=-1), "shared_expert_intermediate_size"),
        (dict(max_seq_len=2.5), "max_seq_len"),
    ],
)
def test_invalid_config_names_the_field(overrides, field):
    with pytest.raises(ValueError, match=rf"MoEConfig\.{field} "):
        tiny_config(**overrides)


def test_config_round_trips_through_json(tmp_path):
    cfg = tiny_config(shared_expert_intermediate_size=8, tie_word_embeddings=True)
    cfg.save(tmp_path / "c.json")
    assert MoEConfig.load(tmp_path / "c.json") == cfg


def test_unknown_field_is_rejected():
    with pytest.raises(ValueError, match="unknown field"):
        MoEConfig.from_dict({**BASE, "num_expert": 4})
