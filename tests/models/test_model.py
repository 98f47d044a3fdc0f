import pytest
import torch

from helpers import VARIANTS, tiny_model
from speq.models import MoEForCausalLM


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_cached_steps_equal_full_forward(variant):
    model = tiny_model(torch.float64, **VARIANTS[variant])
    ids = torch.randint(
        0, model.config.vocab_size, (1, 11), generator=torch.Generator().manual_seed(1)
    )
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache()
        parts = [
            model(ids[:, :5], cache, 0),
            model(ids[:, 5:6], cache, 5),
            model(ids[:, 6:], cache, 6),
        ]
    assert cache.length == 11
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-12, atol=1e-12)


def test_truncated_cache_is_overwritten_by_the_next_write():
    model = tiny_model(torch.float64)
    ids = torch.tensor([[3, 1, 4, 1, 5, 9]])
    with torch.no_grad():
        cache = model.new_cache()
        model(ids[:, :4], cache, 0)
        model(torch.tensor([[7, 7]]), cache, 4)  # rejected tokens
        cache.truncate(4)
        tail = model(ids[:, 4:], cache, 4)
        torch.testing.assert_close(tail, model(ids)[:, 4:], rtol=1e-12, atol=1e-12)


def test_seeded_initialisation_is_deterministic():
    a, b, c = tiny_model(seed=3), tiny_model(seed=3), tiny_model(seed=4)
    for (name, pa), pb, pc in zip(
        a.state_dict().items(), b.state_dict().values(), c.state_dict().values()
    ):
        assert torch.equal(pa, pb), name
        if "norm" not in name:
            assert not torch.equal(pa, pc), name


def test_save_and_load_round_trip(tmp_path):
    model = tiny_model(torch.float32, shared_expert_intermediate_size=8, tie_word_embeddings=True)
    model.save_pretrained(tmp_path)
    loaded = MoEForCausalLM.from_pretrained(tmp_path)
    assert loaded.config == model.config
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))


def test_load_names_the_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        MoEForCausalLM.from_pretrained(tmp_path)


def test_forward_rejects_bad_input():
    model = tiny_model()
    with pytest.raises(ValueError, match="integer tensor"):
        model(torch.zeros(1, 3))
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 65, dtype=torch.int64))
