"""align_experts: the ExpertPlan contract, on edge cases and random routings, and no host
synchronisation (it runs on the meta device, where any read of a value fails)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from speq.kernels import ExpertPlan, align_experts
from speq.kernels.alignment import max_plan_blocks


def check_plan(plan: ExpertPlan, topk_ids: torch.Tensor, num_experts: int) -> None:
    """Every clause of the ExpertPlan docstring."""
    t, k = topk_ids.shape
    pairs, bm = t * k, plan.block_m
    flat = topk_ids.reshape(-1).tolist()
    ids, experts = plan.sorted_pair_ids.tolist(), plan.block_expert.tolist()
    assert plan.sorted_pair_ids.dtype == plan.block_expert.dtype == torch.int32
    assert plan.num_valid_blocks.dtype == torch.int32 and plan.num_valid_blocks.shape == (1,)
    assert plan.num_pairs == pairs and (plan.num_tokens, plan.top_k) == (t, k)
    assert plan.max_blocks == max_plan_blocks(pairs, num_experts, bm, plan.method)
    assert len(ids) == plan.max_blocks * bm
    nvb = int(plan.num_valid_blocks)
    assert all(p == pairs for p in ids[nvb * bm :]), "rows past the valid blocks are padding"
    assert all(e == -1 for e in experts[nvb:]), "blocks past the valid ones are unused"
    real = [p for p in ids[: nvb * bm] if p != pairs]
    assert sorted(real) == list(range(pairs)), "each pair exactly once"
    for b in range(nvb):
        e = experts[b]
        assert 0 <= e < num_experts
        rows = ids[b * bm : (b + 1) * bm]
        assert all(flat[p] == e for p in rows if p != pairs), "a block holds one expert's pairs"
    if plan.method == "direct":
        assert nvb == pairs and experts == flat
        assert [ids[b * bm] for b in range(pairs)] == list(range(pairs))
        return
    assert experts[:nvb] == sorted(experts[:nvb]), "sorted by expert"
    for e in range(num_experts):
        count = flat.count(e)
        blocks = [b for b in range(nvb) if experts[b] == e]
        assert len(blocks) == math.ceil(count / bm), "each expert padded to whole blocks, once"
        run = [p for b in blocks for p in ids[b * bm : (b + 1) * bm]]
        assert run[:count] == sorted(run[:count]) and all(p != pairs for p in run[:count])
        assert all(p == pairs for p in run[count:]), "padding at the end of an expert's run"


EDGE_CASES = {
    "one-token": ([[3, 1]], 5, 16),
    "all-to-one-expert": ([[2]] * 33, 4, 16),
    "empty-experts": ([[0, 4]] * 7, 5, 4),
    "k-eq-E": ([[2, 0, 1]] * 3, 3, 16),
    "exact-multiple": ([[0], [0], [1], [1]], 2, 2),
    "block-m-1": ([[1, 0], [0, 2]], 3, 1),
    "no-tokens": (torch.zeros(0, 2, dtype=torch.int32), 4, 16),
}


@pytest.mark.parametrize("method", ["sorted", "direct"])
@pytest.mark.parametrize("name", list(EDGE_CASES))
def test_plan_contract_on_edge_cases(name: str, method: str) -> None:
    ids, num_experts, bm = EDGE_CASES[name]
    topk_ids = torch.as_tensor(ids, dtype=torch.int32)
    check_plan(align_experts(topk_ids, num_experts, bm, method), topk_ids, num_experts)


@settings(max_examples=60, deadline=None)
@given(
    num_tokens=st.integers(0, 40),
    num_experts=st.integers(1, 13),
    data=st.data(),
    block_m=st.sampled_from([1, 2, 4, 16, 64]),
    method=st.sampled_from(["sorted", "direct"]),
    dtype=st.sampled_from([torch.int32, torch.int64]),
)
def test_plan_contract_on_random_routings(
    num_tokens: int, num_experts: int, data: st.DataObject, block_m: int, method: str, dtype
) -> None:
    k = data.draw(st.integers(1, num_experts))
    rows = [
        data.draw(st.permutations(range(num_experts)))[:k] for _ in range(num_tokens)
    ]  # distinct experts per token, as top-k gives
    topk_ids = torch.tensor(rows, dtype=dtype).reshape(num_tokens, k)
    check_plan(align_experts(topk_ids, num_experts, block_m, method), topk_ids, num_experts)


@pytest.mark.parametrize("method", ["sorted", "direct"])
def test_no_host_sync(method: str) -> None:
    """Meta tensors have no values: .item(), nonzero, unique or a branch on a value would
    raise. Output shapes depend only on T, k, E and block_m (the worst case)."""
    with pytest.raises((RuntimeError, NotImplementedError)):
        torch.ones(1, device="meta").item()  # the premise: meta values cannot reach the host
    topk_ids = torch.empty(9, 2, dtype=torch.int32, device="meta")
    plan = align_experts(topk_ids, 6, 16, method)
    assert plan.sorted_pair_ids.device.type == "meta"
    assert plan.max_blocks == max_plan_blocks(18, 6, 16, method)
    assert plan.num_valid_blocks.shape == (1,)


def test_worst_case_bound_is_reached() -> None:
    # 6 experts with one pair each: each wastes block_m - 1 rows.
    topk_ids = torch.arange(6, dtype=torch.int32).reshape(3, 2)
    plan = align_experts(topk_ids, 6, 8)
    assert int(plan.num_valid_blocks) == plan.max_blocks == 6


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((torch.zeros(3, dtype=torch.int32), 4, 16), "must be \\[T, k\\]"),
        ((torch.zeros(3, 1), 4, 16), "int32 or int64"),
        ((torch.zeros(3, 1, dtype=torch.int32), 4, 0), "block_m"),
        ((torch.zeros(3, 1, dtype=torch.int32), 0, 16), "num_experts"),
        ((torch.zeros(3, 1, dtype=torch.int32), 4, 16, "bucket"), "method must be"),
    ],
)
def test_bad_inputs(args: tuple, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        align_experts(*args)
