"""The draft's INT4 experts in the layout of torch's CPU INT4 matmul: the same codes and scales
as `QuantizedExperts`, and the fused MoE on them equal to the dequantized one (to bfloat16
activations)."""

import pytest
import torch

from speq.kernels import fused_moe, quantize_experts
from speq.kernels.quant import CpuInt4Experts, to_cpu_int4


def _quantized(s, n, k, group=128, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return quantize_experts(torch.randn(s, n, k, generator=gen), 4, group)


@pytest.mark.parametrize(
    "n, k, group, kernel_group",
    [(64, 256, 128, 128), (768, 192, 128, 64), (32, 64, 128, 64), (48, 96, 32, 32)],
)
def test_the_cpu_layout_holds_the_same_codes_and_scales(n, k, group, kernel_group):
    """Multiplying the identity reads each weight back: within bfloat16 rounding of the
    dequantized INT4 weight, far inside the half-scale a code off by one would miss by. A group
    the kernel does not take is split into smaller ones sharing its scale."""
    q = _quantized(3, n, k, group)
    c = to_cpu_int4(q)
    assert isinstance(c, CpuInt4Experts) and c.group_size == kernel_group
    assert c.data.shape == (3, n, k // 2) and c.scales.shape == (3, k // kernel_group, n, 2)
    eye = torch.eye(k)
    for s in range(3):
        back = c.matmul(eye, s).t()  # [n, k]
        want = q.select(s).dequantize(torch.float32)
        scale = q.select(s).scales.repeat_interleave(group, dim=-1)[:, :k]
        assert ((back - want).abs() <= scale / 4 + 1e-6).all()


def test_shapes_the_kernel_cannot_take_stay_as_they_were():
    assert to_cpu_int4(_quantized(2, 40, 64)) is None  # N not a multiple of 16
    assert to_cpu_int4(_quantized(2, 32, 24, group=8)) is None  # no group size it takes
    assert to_cpu_int4(quantize_experts(torch.randn(2, 32, 64), 8, 32)) is None  # INT8


@pytest.mark.parametrize("tokens", [1, 3, 9])
def test_fused_moe_on_the_cpu_layout_equals_the_dequantized_weights(tokens):
    gen = torch.Generator().manual_seed(1)
    e, h, i, top_k = 6, 128, 96, 2
    w13, w2 = _quantized(e, 2 * i, h, seed=2), _quantized(e, h, i, seed=3)
    x = torch.randn(tokens, h, generator=gen)
    ids = torch.stack([torch.randperm(e, generator=gen)[:top_k] for _ in range(tokens)])
    weights = torch.softmax(torch.randn(tokens, top_k, generator=gen), -1)
    want = fused_moe(x, w13, w2, ids.to(torch.int32), weights)
    got = fused_moe(x, to_cpu_int4(w13), to_cpu_int4(w2), ids.to(torch.int32), weights)
    assert got.dtype == x.dtype
    torch.testing.assert_close(got, want, rtol=3e-2, atol=3e-2 * want.abs().max().item())


def test_the_cpu_layout_is_refused_by_the_triton_path():
    w13, w2 = to_cpu_int4(_quantized(2, 64, 64)), to_cpu_int4(_quantized(2, 64, 32))
    x, ids, w = torch.randn(1, 64), torch.zeros(1, 1, dtype=torch.int32), torch.ones(1, 1)
    with pytest.raises(ValueError, match="torch backend only"):
        fused_moe(x, w13, w2, ids, w, backend="triton")
