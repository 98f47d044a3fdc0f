"""Counts: one MoE layer's decode step (``route_topk`` + ``fused_moe`` on the Triton path, with a
slot table as offloading passes one) issues a fixed, small number of torch ops and Triton
launches. On a GPU each is a launch or an allocation inside the captured graph of every layer of
every step, so a regression here is a regression in decode latency. Measured under the
interpreter (or compiled on CUDA), float32."""

from __future__ import annotations

import contextlib
import importlib
from collections import Counter
from collections.abc import Iterator

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from speq.kernels import fused_moe, route_topk

from .kernel_cases import TRITON_DEVICE, triton_unsupported

REASON = triton_unsupported(torch.float32)

# Measured, and so the bounds: T = 1 takes the "direct" plan and T >= 2 the "sorted" one, each
# one alignment launch. Launches: routing, alignment, gate/up, down. Torch ops: 6 ``empty``
# (routing's ids and weights, the plan's three tensors, the intermediate h) and 1 ``zeros`` (the
# fp32 output the down kernel adds into). Before the alignment kernel, the sorted plan alone
# was about 30 torch ops.
MAX_LAUNCHES = {1: 4, 4: 4}
MAX_TORCH_OPS = {1: 7, 4: 7}


class _Counts(TorchDispatchMode):
    """Counts the aten ops issued outside Triton launches, and the launches by kernel."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()
        self.launches: Counter[str] = Counter()
        self.in_launch = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.in_launch:  # the interpreter's own copies are not the program's ops
            self.ops[str(func.overloadpacket.__name__)] += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def counting() -> Iterator[_Counts]:
    """Wrap every ``@triton.jit`` kernel of speq so that its launches are counted."""
    from speq.kernels import _alignment_kernels, _fused_moe_kernels, _routing_kernels

    counts = _Counts()

    class Counted:
        def __init__(self, name: str, kernel) -> None:
            self.name, self.kernel = name, kernel

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                counts.launches[self.name] += 1
                counts.in_launch = True
                try:
                    return self.kernel[grid](*args, **kwargs)
                finally:
                    counts.in_launch = False

            return launch

    patch = pytest.MonkeyPatch()
    for module in (_alignment_kernels, _fused_moe_kernels, _routing_kernels):
        for name in [n for n in vars(module) if n.endswith("_kernel")]:
            patch.setattr(module, name, Counted(name, getattr(module, name)))
    try:
        with counts:
            yield counts
    finally:
        patch.undo()


def _layer(num_tokens: int) -> tuple[torch.Tensor, ...]:
    """A layer of E=8 experts, top-2, in a pool of 12 slots (an offloading cache's slot table)."""
    g = torch.Generator().manual_seed(num_tokens)
    e, slots, h, i = 8, 12, 64, 32
    x = torch.randn(num_tokens, h, generator=g)
    logits = torch.randn(num_tokens, e, generator=g)
    w13 = torch.randn(slots, 2 * i, h, generator=g) / 8
    w2 = torch.randn(slots, h, i, generator=g) / 8
    slot_of_expert = torch.randperm(slots, generator=g)[:e].to(torch.int32)
    return tuple(t.to(TRITON_DEVICE) for t in (x, logits, w13, w2, slot_of_expert))


@pytest.mark.skipif(REASON is not None, reason=str(REASON))
@pytest.mark.parametrize("num_tokens", sorted(MAX_LAUNCHES))
def test_one_layer_decode_issues_few_ops_and_launches(monkeypatch, num_tokens: int) -> None:
    x, logits, w13, w2, slot_of_expert = _layer(num_tokens)
    # value checks run on CPU tensors only (on a GPU they would be host syncs): not counted
    module = importlib.import_module("speq.kernels.fused_moe")  # the package exports the function
    monkeypatch.setattr(module, "_check_values", lambda *args: None)
    with counting() as counts:
        ids, weights = route_topk(logits, 2, backend="triton")
        out = fused_moe(x, w13, w2, ids, weights, slot_of_expert, backend="triton")
    assert out.shape == x.shape
    expected = {"_route_topk_kernel", "_align_kernel", "_gate_up_kernel", "_down_kernel"}
    assert set(counts.launches) == expected, counts.launches
    assert sum(counts.launches.values()) <= MAX_LAUNCHES[num_tokens], counts.launches
    assert sum(counts.ops.values()) <= MAX_TORCH_OPS[num_tokens], counts.ops
