"""align_experts: the ExpertPlan contract, on edge cases and random routings, and no host
synchronisation (it runs on the meta device, where any read of a value fails); the one-launch
Triton kernel gives exactly the torch reference's plan."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from speq.kernels import ExpertPlan, align_experts
from speq.kernels.alignment import (
    MAX_KERNEL_EXPERTS,
    MAX_KERNEL_PAIRS,
    align_experts_torch,
    kernel_unsupported,
    max_plan_blocks,
)

from .kernel_cases import TRITON_DEVICE, triton_unsupported


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


# ---------------------------------------------------------------- the one-launch Triton kernel
TRITON_REASON = triton_unsupported(torch.float32)


def assert_same_plan(topk_ids: torch.Tensor, num_experts: int, block_m: int, method: str) -> None:
    """The kernel's plan equals the torch reference's, tensor for tensor."""
    ref = align_experts_torch(topk_ids.cpu(), num_experts, block_m, method)
    plan = align_experts(topk_ids.to(TRITON_DEVICE), num_experts, block_m, method, backend="triton")
    for name in ("sorted_pair_ids", "block_expert", "num_valid_blocks"):
        got, want = getattr(plan, name).cpu(), getattr(ref, name)
        assert got.dtype == want.dtype and torch.equal(got, want), (name, got, want)
    assert (plan.num_tokens, plan.top_k, plan.block_m) == (ref.num_tokens, ref.top_k, ref.block_m)


def _distinct(num_tokens: int, k: int, num_experts: int, seed: int, dtype) -> torch.Tensor:
    """Each token's k distinct experts, as top-k routing gives."""
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randperm(num_experts, generator=g)[:k] for _ in range(num_tokens)]
    return torch.stack(rows).to(dtype) if rows else torch.zeros(0, k, dtype=dtype)


KERNEL_CASES = {  # name: (topk_ids, E, block_m)
    "E1": (torch.zeros(5, 1, dtype=torch.int32), 1, 16),
    "all-pairs-one-expert": (torch.full((17, 1), 6, dtype=torch.int64), 8, 16),
    "every-pair-its-own-expert": (torch.arange(64, dtype=torch.int32).reshape(8, 8), 64, 32),
    "every-pair-its-own-expert-reversed": (torch.arange(63, -1, -1).reshape(16, 4), 64, 16),
    "k-eq-E": (_distinct(9, 4, 4, 1, torch.int32), 4, 64),
    "E256-k8": (_distinct(17, 8, 256, 2, torch.int64), 256, 64),
    "one-token-E256": (_distinct(1, 8, 256, 3, torch.int32), 256, 16),
    "many-chunks-E60": (_distinct(96, 4, 60, 4, torch.int32), 60, 16),  # 384 pairs: 6 chunks
    "kernel-limit-P1024-E512": (_distinct(128, 8, 512, 5, torch.int32), 512, 64),
    "no-tokens": (torch.zeros(0, 2, dtype=torch.int32), 4, 16),
    "block-m-1": (torch.tensor([[1, 0], [0, 2]], dtype=torch.int32), 3, 1),
}


@pytest.mark.skipif(TRITON_REASON is not None, reason=str(TRITON_REASON))
@pytest.mark.parametrize("method", ["sorted", "direct"])
@pytest.mark.parametrize("name", list(KERNEL_CASES))
def test_kernel_plan_equals_the_torch_plan_on_edge_cases(name: str, method: str) -> None:
    topk_ids, num_experts, block_m = KERNEL_CASES[name]
    assert_same_plan(topk_ids, num_experts, block_m, method)


@pytest.mark.skipif(TRITON_REASON is not None, reason=str(TRITON_REASON))
def test_kernel_plan_equals_the_torch_plan_over_decode_sizes() -> None:
    """T = 1..17 tokens, k = 1..8 choices, block_m 16/32/64, E from k to 256, int32 and int64
    ids, both methods."""
    for t in range(1, 18):
        for k in range(1, 9):
            num_experts = (k, 8, 60, 256)[(t + k) % 4]
            block_m = (16, 32, 64)[(t * k) % 3]
            dtype = (torch.int32, torch.int64)[t % 2]
            topk_ids = _distinct(t, k, num_experts, seed=t * 10 + k, dtype=dtype)
            for method in ("sorted", "direct"):
                assert_same_plan(topk_ids, num_experts, block_m, method)


@pytest.mark.skipif(TRITON_REASON is not None, reason=str(TRITON_REASON))
@settings(max_examples=30, deadline=None)
@given(
    num_tokens=st.integers(1, 40),
    num_experts=st.integers(1, 70),
    data=st.data(),
    block_m=st.sampled_from([1, 16, 32, 64]),
)
def test_kernel_plan_equals_the_torch_plan_on_random_routings(
    num_tokens: int, num_experts: int, data: st.DataObject, block_m: int
) -> None:
    k = data.draw(st.integers(1, min(8, num_experts)))
    expert = st.integers(0, num_experts - 1)
    flat = data.draw(st.lists(expert, min_size=num_tokens * k, max_size=num_tokens * k))
    topk_ids = torch.tensor(flat, dtype=torch.int32).reshape(num_tokens, k)
    assert_same_plan(topk_ids, num_experts, block_m, "sorted")


def test_kernel_limits_are_named() -> None:
    """backend="triton" past the kernel's sizes says which size it is past."""
    topk_ids = torch.zeros(3, 2, dtype=torch.int32)
    assert kernel_unsupported(MAX_KERNEL_PAIRS, MAX_KERNEL_EXPERTS) is None
    assert "pairs" in kernel_unsupported(MAX_KERNEL_PAIRS + 1, 8)
    big = torch.zeros(MAX_KERNEL_PAIRS + 1, 1, dtype=torch.int32)
    with pytest.raises(ValueError, match="up to 4096 pairs"):
        align_experts(big, 4, 16, backend="triton")
    with pytest.raises(ValueError, match="up to 1024 experts"):
        align_experts(topk_ids, MAX_KERNEL_EXPERTS + 1, 16, backend="triton")
