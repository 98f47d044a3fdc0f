import pytest

from helpers import VARIANTS, tiny_model
from speq.sim import (
    MODEL_PRESETS,
    active_params,
    expert_bytes,
    expert_params,
    get_preset,
    non_expert_bytes,
    non_expert_params,
    total_params,
)

# Published parameter counts. `correction` is the count of parameters the real model has and the
# preset's architecture leaves out (added back before comparing); `uncounted` is what the published
# activated count leaves out and ours includes. Tolerances cover rounding of the published figures
# and small terms MoEConfig does not model (Phi-3.5-MoE's LayerNorm betas and biases).
#
# - deepseek-v2-lite: DeepSeek's "2.4B activated" excludes the 102400 x 2048 embedding table
#   (2.45B with it excluded, rounded to 2.4B, hence 3%).

PUBLISHED = {
    # name: (total, active, correction, uncounted in active, relative tolerance)
    "mixtral-8x7b": (46.7e9, 12.9e9, 0, 0, 0.01),
    "phi-3.5-moe": (41.9e9, 6.6e9, 0, 0, 0.01),
    "qwen1.5-moe-a2.7b": (14.3e9, 2.7e9, 0, 0, 0.01),
    "deepseek-v2-lite": (15.7e9, 2.4e9, 0, 102400 * 2048, 0.03),
    "qwen3-30b-a3b": (30.5e9, 3.3e9, 0, 0, 0.02),
}


def test_every_preset_has_a_published_count():
    assert set(PUBLISHED) == set(MODEL_PRESETS)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_preset_parameter_counts_match_published(name):
    total, active, correction, uncounted, tol = PUBLISHED[name]
    cfg = get_preset(name)
    assert total_params(cfg) + correction == pytest.approx(total, rel=tol)
    assert active_params(cfg) + correction - uncounted == pytest.approx(active, rel=tol)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_counts_equal_the_reference_model(variant):
    model = tiny_model(**VARIANTS[variant])
    cfg = model.config
    assert total_params(cfg) == sum(p.numel() for p in model.parameters())
    routed = sum(p.numel() for p in model.parameters() if p.dim() == 3)  # stacked [E, ., .]
    assert non_expert_params(cfg) == total_params(cfg) - routed
    assert routed == len(cfg.moe_layers) * cfg.num_experts * expert_params(cfg)


def test_bytes_helpers():
    cfg = get_preset("mixtral-8x7b")
    assert expert_bytes(cfg) == 3 * 4096 * 14336 * 2
    assert expert_bytes(cfg, bytes_per_param=0.5) == expert_bytes(cfg) // 4
    whole = non_expert_bytes(cfg) + len(cfg.moe_layers) * cfg.num_experts * expert_bytes(cfg)
    assert whole == 2 * total_params(cfg)


def test_presets_shapes():
    for cfg in MODEL_PRESETS.values():
        assert cfg.max_seq_len == 4096
    ds = get_preset("deepseek-v2-lite")
    assert ds.moe_layers == tuple(range(1, 27))
    assert get_preset("qwen1.5-moe-a2.7b").shared_expert_intermediate_size == 4 * 1408


def test_unknown_preset_lists_known_names():
    with pytest.raises(ValueError, match="unknown model preset 'gpt-4'") as err:
        get_preset("gpt-4")
    for name in MODEL_PRESETS:
        assert name in str(err.value)
