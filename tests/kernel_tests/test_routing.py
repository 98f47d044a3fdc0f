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


# ---------------------------------------------------------------- DeepSeek's routing
def _deepseek_v2(logits, k, n_group, topk_group, scale):
    """DeepSeek-V2's group-limited greedy routing, written as its reference code computes it."""
    scores = logits.softmax(dim=-1)
    t, e = scores.shape
    group_scores = scores.view(t, n_group, e // n_group).max(dim=-1).values
    group_idx = torch.topk(group_scores, k=topk_group, dim=-1)[1]
    mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
    mask = mask.unsqueeze(-1).expand(t, n_group, e // n_group).reshape(t, e)
    w, ids = torch.topk(scores.masked_fill(~mask.bool(), 0.0), k=k, dim=-1)
    return ids, w * scale


def _deepseek_v3(logits, bias, k, n_group, topk_group, scale, renormalize):
    scores = logits.sigmoid()
    choice = scores + bias
    t, e = scores.shape
    group_scores = choice.view(t, n_group, e // n_group).topk(2, dim=-1)[0].sum(dim=-1)
    group_idx = torch.topk(group_scores, k=topk_group, dim=-1)[1]
    mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
    mask = mask.unsqueeze(-1).expand(t, n_group, e // n_group).reshape(t, e)
    ids = torch.topk(choice.masked_fill(~mask.bool(), float("-inf")), k=k, dim=-1)[1]
    w = scores.gather(1, ids)
    if renormalize:
        w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
    return ids, w * scale


def _by_id(ids, w):
    order = ids.long().argsort(dim=-1)
    return ids.long().gather(1, order), w.gather(1, order)


@pytest.mark.parametrize("groups", [(1, 1), (4, 2), (8, 3)])
def test_group_limited_softmax_routing_is_deepseek_v2s(groups):
    from speq.kernels.routing import Limits

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(40, 16, generator=gen, dtype=torch.float64)
    lim = Limits(scale=2.5, n_group=groups[0], topk_group=groups[1])
    ids, w = route_topk_torch(logits, 4, "softmax_topk", False, lim)
    ref_ids, ref_w = _deepseek_v2(logits, 4, *groups, 2.5)
    assert torch.equal(_by_id(ids, w)[0], _by_id(ref_ids, ref_w)[0])
    torch.testing.assert_close(_by_id(ids, w)[1], _by_id(ref_ids, ref_w)[1], rtol=0, atol=1e-12)
    if groups[0] > 1:  # the limit bites: some rows' plain top-k leave the allowed groups
        plain, _ = route_topk_torch(logits, 4, "softmax_topk", False)
        assert not torch.equal(_by_id(plain, w)[0], _by_id(ids, w)[0])


@pytest.mark.parametrize("renormalize", [True, False])
def test_sigmoid_routing_with_a_correction_bias_is_deepseek_v3s(renormalize):
    from speq.kernels.routing import Limits

    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(40, 16, generator=gen, dtype=torch.float64)
    bias = 0.3 * torch.randn(16, generator=gen, dtype=torch.float64)
    lim = Limits(scale=1.5, n_group=4, topk_group=2, bias=bias)
    ids, w = route_topk_torch(logits, 4, "sigmoid_topk", renormalize, lim)
    ref_ids, ref_w = _deepseek_v3(logits, bias, 4, 4, 2, 1.5, renormalize)
    assert torch.equal(_by_id(ids, w)[0], _by_id(ref_ids, ref_w)[0])
    torch.testing.assert_close(_by_id(ids, w)[1], _by_id(ref_ids, ref_w)[1], rtol=0, atol=1e-12)
    # the bias steers the choice, not the weights: without it other experts win
    no_bias, _ = route_topk_torch(logits, 4, "sigmoid_topk", renormalize, Limits(1.5, 4, 2))
    assert not torch.equal(_by_id(no_bias, w)[0], _by_id(ids, w)[0])


def test_bad_group_limits_are_named():
    from speq.kernels.routing import Limits

    logits = torch.randn(3, 16)
    with pytest.raises(ValueError, match="n_group = 5"):
        route_topk_torch(logits, 2, "softmax_topk", True, Limits(n_group=5))
    with pytest.raises(ValueError, match="exceeds the experts of topk_group = 1"):
        route_topk_torch(logits, 5, "softmax_topk", True, Limits(n_group=4, topk_group=1))
    with pytest.raises(ValueError, match="no Triton kernel"):
        route_topk(logits, 2, "sigmoid_topk", backend="triton")


@pytest.mark.parametrize("eps", [0.01, 0.3])
def test_sparsemixer_routing_is_phimoes(eps):
    """Against transformers' own sparsemixer (inference mode), on logits close enough together
    that the jitter threshold decides which experts each softmax sees."""
    from transformers.models.phimoe.modeling_phimoe import sparsemixer

    from speq.kernels.routing import Limits

    gen = torch.Generator().manual_seed(2)
    logits = 0.05 * torch.randn(64, 8, generator=gen, dtype=torch.float64)
    ref_w, ref_ids = sparsemixer(logits, eps, False, 2)
    ids, w = route_topk_torch(logits, 2, "sparsemixer", False, Limits(jitter_eps=eps))
    assert torch.equal(ids.long(), ref_ids)
    torch.testing.assert_close(w, ref_w, rtol=0, atol=1e-12)
