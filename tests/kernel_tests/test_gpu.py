"""GPU tier: the compiled kernels on CUDA at the preset models' real shapes, CUDA graph capture
with a changing slot table, and no host synchronisation. Skipped without CUDA."""

from __future__ import annotations

import math

import pytest
import torch

from speq.kernels import (
    PRESETS,
    align_experts,
    fused_moe,
    fused_moe_torch,
    quantize_experts,
    route_topk,
    route_topk_torch,
)
from speq.kernels.alignment import align_experts_torch
from speq.kernels.fused_moe import _dot_in_fp32

from .kernel_cases import assert_close

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _layer(name: str, num_tokens: int, dtype: torch.dtype, seed: int = 0, pool_extra: int = 0):
    s = PRESETS[name]
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(seed)
    slots_total = s.num_experts + pool_extra
    w13 = torch.randn(slots_total, 2 * s.intermediate, s.hidden, device=dev, generator=gen)
    w13 = (w13 / math.sqrt(s.hidden)).to(dtype)
    w2 = torch.randn(slots_total, s.hidden, s.intermediate, device=dev, generator=gen)
    w2 = (w2 / math.sqrt(s.intermediate)).to(dtype)
    x = torch.randn(num_tokens, s.hidden, device=dev, generator=gen).to(dtype)
    logits = torch.randn(num_tokens, s.num_experts, device=dev, generator=gen)
    ids, weights = route_topk(logits, s.top_k)
    perm = torch.randperm(slots_total, device=dev, generator=gen)[: s.num_experts]
    return x, w13, w2, ids, weights, perm.to(torch.int32)


@pytest.mark.parametrize("num_tokens", [1, 16, 64])
@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_bf16(name: str, num_tokens: int) -> None:
    # compiled, so the native bf16 dot: the fp32 upcast is for the interpreter only
    assert not _dot_in_fp32(torch.bfloat16)
    args = _layer(name, num_tokens, torch.bfloat16, pool_extra=2)
    assert_close(fused_moe(*args), fused_moe_torch(*args), torch.bfloat16)


@pytest.mark.parametrize("name", ["qwen1.5-moe-a2.7b", "deepseek-v2-lite"])
@pytest.mark.parametrize(("bits", "group"), [(4, 128), (8, 64)])
def test_quantized_presets_fp16(name: str, bits: int, group: int) -> None:
    x, w13, w2, ids, weights, slots = _layer(name, 8, torch.float16)
    q13, q2 = quantize_experts(w13, bits, group), quantize_experts(w2, bits, group)
    out = fused_moe(x, q13, q2, ids, weights, slots)
    assert_close(out, fused_moe_torch(x, q13, q2, ids, weights, slots), torch.float16)


def test_fp32_and_deterministic() -> None:
    args = _layer("qwen1.5-moe-a2.7b", 33, torch.float32)
    ref = fused_moe_torch(*args)
    assert_close(fused_moe(*args), ref, torch.float32)
    a = fused_moe(*args, deterministic=True)
    b = fused_moe(*args, deterministic=True)
    assert torch.equal(a, b)
    assert_close(a, ref, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_routing_kernel(dtype: torch.dtype) -> None:
    logits = torch.randn(1000, 60, device="cuda").to(dtype)
    logits[::7, :5] = 1.0  # ties
    for mode in ("softmax_topk", "topk_softmax"):
        ids, w = route_topk(logits, 4, mode)
        ref_ids, ref_w = route_topk_torch(logits, 4, mode)
        assert torch.equal(ids, ref_ids)
        torch.testing.assert_close(w, ref_w, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("method", ["sorted", "direct"])
def test_alignment_kernel_equals_the_torch_plan(method: str) -> None:
    """The compiled one-program alignment (``"auto"`` on CUDA) against the torch reference, up
    to the kernel's sizes."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    for t, k, e, block_m in [(1, 8, 256, 16), (4, 6, 64, 16), (17, 8, 256, 64), (128, 8, 512, 64),
                             (512, 8, 1024, 16), (33, 1, 1, 32)]:  # fmt: skip
        ids = torch.stack([torch.randperm(e, device="cuda", generator=gen)[:k] for _ in range(t)])
        for dtype in (torch.int32, torch.int64):
            plan = align_experts(ids.to(dtype), e, block_m, method)
            ref = align_experts_torch(ids.to(dtype), e, block_m, method)
            for name in ("sorted_pair_ids", "block_expert", "num_valid_blocks"):
                assert torch.equal(getattr(plan, name), getattr(ref, name)), (t, k, e, name)


def test_no_host_sync() -> None:
    x, w13, w2, ids, weights, slots = _layer("deepseek-v2-lite", 16, torch.bfloat16)
    logits = torch.randn(16, 64, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        route_topk(logits, 6)
        align_experts(ids, 64, 16)
        fused_moe(x, w13, w2, ids, weights, slots)
        fused_moe(x, w13, w2, ids, weights, slots, deterministic=True)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_cuda_graph_replay_with_changing_experts() -> None:
    """Capture routing + alignment + fused MoE once; new tokens, a new slot table and new pool
    contents between replays give the reference result for the new state."""
    x, w13, w2, _, _, slots = _layer("qwen1.5-moe-a2.7b", 4, torch.bfloat16, pool_extra=4)
    logits = torch.randn(4, 60, device="cuda")

    def step() -> torch.Tensor:
        i, w = route_topk(logits, 4)
        return fused_moe(x, w13, w2, i, w, slots)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # compile and warm up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    for seed in range(3):
        gen = torch.Generator(device="cuda").manual_seed(seed + 1)
        logits.copy_(torch.randn(logits.shape, device="cuda", generator=gen))
        x.copy_(torch.randn(x.shape, device="cuda", generator=gen))
        slots.copy_(torch.randperm(w13.shape[0], device="cuda", generator=gen)[:60])
        w13[slots[:3].long()] = w13[slots[:3].long()].flip(1)  # the cache loads new contents
        graph.replay()
        i, w = route_topk_torch(logits, 4)
        assert_close(out, fused_moe_torch(x, w13, w2, i, w, slots), torch.bfloat16)
