"""Every policy on every CPU-runnable backend generates exactly the resident greedy output."""

import pytest
import torch

import speq
from helpers import VARIANTS, tiny_model

PROMPT = torch.tensor([[5, 17, 3, 42, 8, 1]])
N = 12


def _budget(cm_resident: speq.CompiledModel, slots: int) -> int:
    m = cm_resident.memory
    return m.non_expert_bytes + m.kv_bytes + slots * m.expert_bytes


@pytest.mark.parametrize(
    "variant",
    [
        "top1",
        "top2_gqa",
        "mha_shared",
        "dense_first_topk_softmax",
        "olmoe_fullnorm_clip",
        "deepseek_v2_mla",
    ],
)
@pytest.mark.parametrize("policy", ["ondemand", "nextgate", "oracle"])
@pytest.mark.parametrize("backend", ["cpu", "sim"])
def test_policy_output_equals_resident(variant, policy, backend):
    model = tiny_model(torch.float64, **VARIANTS[variant])
    resident = speq.compile(model)
    expected = resident.generate(PROMPT, N)
    cfg = model.config
    budget = _budget(resident, cfg.top_k + 1)  # far fewer slots than experts: many misses
    cm = speq.compile(
        model,
        speq.CompileOptions(policy=policy, backend=backend, device_memory=budget, link_gbps=4.0),
    )
    assert torch.equal(cm.generate(PROMPT, N), expected)
    m = cm.metrics
    assert m.cache_slots == cfg.top_k + 1
    assert m.tokens == N and m.needs > 0 and m.bytes_moved > 0


@pytest.mark.parametrize("allocation", ["global", "per_layer"])
def test_per_layer_allocation_is_lossless(allocation):
    model = tiny_model(torch.float64, num_layers=3)
    resident = speq.compile(model)
    budget = _budget(resident, 3 * model.config.top_k)
    cm = speq.compile(
        model,
        speq.CompileOptions(
            policy="ondemand", backend="sim", device_memory=budget, cache_allocation=allocation
        ),
    )
    assert torch.equal(cm.generate(PROMPT, N), resident.generate(PROMPT, N))


def test_sampling_under_offloading_equals_resident_sampling():
    model = tiny_model(torch.float64)
    resident = speq.compile(model)
    kw = dict(do_sample=True, temperature=1.3, top_p=0.95, seed=4)
    cm = speq.compile(
        model,
        speq.CompileOptions(policy="oracle", backend="sim", device_memory=_budget(resident, 3)),
    )
    assert torch.equal(cm.generate(PROMPT, N, **kw), resident.generate(PROMPT, N, **kw))
