"""route_topk: the Triton kernel and the torch reference agree on ids (ties included) and
weights for every mode, and the reference matches the documented formulas."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from speq.kernels import route_topk, route_topk_torch

from .kernel_cases import TRITON_DEVICE, params, triton_unsupported


@dataclass(frozen=True)
class RouteCase:
    name: str
    T: int
    E: int
    k: int
    mode: str = "softmax_topk"
    renormalize: bool = True
    dtype: torch.dtype = torch.float32
    ties: bool = False  # integer logits in a narrow range: many equal values

    def __str__(self) -> str:
        return self.name


CASES = [
    RouteCase("t1-e8-k2", 1, 8, 2),
    RouteCase("t3-e7-k1-topk-softmax", 3, 7, 1, "topk_softmax"),
    RouteCase("t7-e5-k5-k-eq-E", 7, 5, 5, renormalize=False),
    RouteCase("t33-e60-k4-no-renorm-fp16", 33, 60, 4, renormalize=False, dtype=torch.float16),
    RouteCase("t16-e64-k6-bf16", 16, 64, 6, dtype=torch.bfloat16),
    RouteCase("t70-e3-k2-ties-topk-softmax", 70, 3, 2, "topk_softmax", ties=True),
    RouteCase("t9-e16-k4-ties-fp16", 9, 16, 4, dtype=torch.float16, ties=True),
    RouteCase("t5-e13-k3-fp64", 5, 13, 3, dtype=torch.float64),
]


def route_supports(case: RouteCase, backend: str) -> str | None:
    if backend == "torch":
        return None
    if case.dtype == torch.bfloat16:  # upcast at the load, which the interpreter handles
        return triton_unsupported(torch.float32)
    return triton_unsupported(case.dtype)


def _logits(case: RouteCase) -> torch.Tensor:
    gen = torch.Generator().manual_seed(case.T * 100 + case.E)
    if case.ties:
        return torch.randint(-2, 3, (case.T, case.E), generator=gen).to(case.dtype)
    return torch.randn(case.T, case.E, generator=gen).to(case.dtype)


@pytest.mark.parametrize("case", params(CASES, "triton", route_supports))
def test_triton_matches_reference(case: RouteCase) -> None:
    logits = _logits(case).to(TRITON_DEVICE)
    ids, weights = route_topk(logits, case.k, case.mode, case.renormalize, backend="triton")
    ref_ids, ref_weights = route_topk_torch(logits.cpu(), case.k, case.mode, case.renormalize)
    assert ids.dtype == torch.int32 and weights.dtype == torch.float32
    assert torch.equal(ids.cpu(), ref_ids)
    torch.testing.assert_close(weights.cpu(), ref_weights, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_reference_formulas_and_order(case: RouteCase) -> None:
    logits = _logits(case)
    ids, weights = route_topk_torch(logits, case.k, case.mode, case.renormalize)
    assert ids.dtype == torch.int32
    assert weights.dtype == torch.promote_types(case.dtype, torch.float32)
    x = logits.to(weights.dtype)
    for t in range(case.T):
        row = x[t].tolist()
        # descending logit, then ascending id: the documented order
        expected = sorted(range(case.E), key=lambda e: (-row[e], e))[: case.k]
        assert ids[t].tolist() == expected
    sel = x.gather(1, ids.long())
    if case.mode == "topk_softmax" or case.renormalize:
        expected_w = torch.exp(sel) / torch.exp(sel).sum(-1, keepdim=True)
    else:
        expected_w = torch.exp(sel) / torch.exp(x).sum(-1, keepdim=True)
    torch.testing.assert_close(weights, expected_w)
    assert (weights[:, :-1] >= weights[:, 1:]).all()


def test_float64_weights_stay_float64() -> None:
    ids, w = route_topk(torch.randn(4, 6, dtype=torch.float64), 2)
    assert w.dtype == torch.float64 and ids.dtype == torch.int32


def test_modes_agree_when_renormalized() -> None:
    logits = torch.randn(10, 9)
    a = route_topk_torch(logits, 3, "softmax_topk", True)
    b = route_topk_torch(logits, 3, "topk_softmax")
    assert torch.equal(a[0], b[0])
    torch.testing.assert_close(a[1], b[1])


@pytest.mark.skipif(triton_unsupported(torch.float32) is not None, reason="no Triton path here")
def test_triton_nan_logits_count_as_minus_inf() -> None:
    logits = torch.tensor([[0.5, float("nan"), 2.0, -1.0]], device=TRITON_DEVICE)
    ids, weights = route_topk(logits, 2, backend="triton")
    ref_ids, ref_weights = route_topk_torch(logits.cpu(), 2)
    assert ids.cpu().tolist() == [[2, 0]] == ref_ids.tolist()
    torch.testing.assert_close(weights.cpu(), ref_weights)


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((torch.randn(3), 1), "must be \\[T, E\\]"),
        ((torch.randn(3, 4), 5), "k must be in"),
        ((torch.randn(3, 4), 0), "k must be in"),
        ((torch.zeros(3, 4, dtype=torch.int32), 1), "floating point"),
        ((torch.randn(3, 4), 1, "sigmoid"), "mode must be"),
    ],
)
def test_bad_inputs(args: tuple, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        route_topk(*args)
