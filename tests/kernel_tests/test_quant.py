"""quantize_experts / QuantizedExperts: the error bound, the storage layout, odd sizes."""

from __future__ import annotations

import pytest
import torch

from speq.kernels import QuantizedExperts, quantize_experts
from speq.kernels.quant import QUANT_BITS

SHAPES_GROUPS = [
    ((3, 8, 33), 16),  # odd K: odd nibble count and a short last group
    ((2, 5, 33), 7),
    ((4, 6, 40), 128),  # one group longer than K
    ((2, 3, 128), 128),
    ((1, 4, 9), 1),  # a scale per element
    ((5, 17), 4),  # 2-D
]


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize(("shape", "group"), SHAPES_GROUPS)
def test_round_trip_error_bound(shape: tuple, group: int, bits: int, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(sum(shape) + group + bits)
    w = (torch.randn(shape, generator=gen) * torch.rand(shape[-1], generator=gen) * 3).to(dtype)
    q = quantize_experts(w, bits, group)
    qmax = 7 if bits == 4 else 127
    assert q.qmax == qmax and q.shape == shape and q.dtype == dtype
    w64 = w.double()
    # scale = max |w| over the group / qmax
    k = shape[-1]
    for g in range((k + group - 1) // group):
        amax = w64[..., g * group : (g + 1) * group].abs().amax(-1)
        torch.testing.assert_close(q.scales[..., g].double(), amax / qmax, rtol=1e-6, atol=0)
    scale = q.scales.double().repeat_interleave(group, -1)[..., :k]
    codes = q.codes()
    assert codes.dtype == torch.int8 and codes.abs().max() <= qmax
    err = (w64 - codes.double() * scale).abs()
    assert (err <= scale / 2 * (1 + 1e-6)).all()
    deq = q.dequantize()
    assert deq.dtype == dtype and deq.shape == shape
    torch.testing.assert_close(deq, (codes.double() * scale).to(dtype))


def test_int4_packing_layout() -> None:
    # K = 3 with group 3: scale = 7 / 7 = 1, codes = the values; the odd K pads one nibble.
    w = torch.tensor([[[-7.0, 3.0, 7.0]]])
    q = quantize_experts(w, bits=4, group_size=3)
    assert q.data.dtype == torch.uint8 and q.data.shape == (1, 1, 2)
    # byte 0: low nibble -7+8 = 1, high nibble 3+8 = 11 -> 0xB1; byte 1: 7+8 = 15 | (0+8) << 4
    assert q.data.flatten().tolist() == [0xB1, 0x8F]
    assert q.codes().flatten().tolist() == [-7, 3, 7]


def test_int8_layout_and_zero_group() -> None:
    w = torch.zeros(2, 2, 6)
    w[0, 0, :3] = torch.tensor([1.0, -0.5, 0.25])
    q = quantize_experts(w, bits=8, group_size=3)
    assert q.data.dtype == torch.int8 and q.data.shape == (2, 2, 6)
    assert q.codes()[0, 0, :3].tolist() == [127, -64, 32]  # round(-63.5) -> -64 (half to even)
    assert (q.scales[1] == 0).all() and (q.dequantize()[1] == 0).all()


def test_select_and_nbytes() -> None:
    w = torch.randn(3, 4, 10)
    q = quantize_experts(w, 4, 4)
    one = q.select(1)
    assert one.shape == (4, 10)
    torch.testing.assert_close(one.dequantize(), q.dequantize()[1])
    assert q.nbytes == 3 * 4 * 5 + 3 * 4 * 3 * 4
    assert q.to("cpu").device.type == "cpu"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(bits=3), "bits must be"),
        (dict(group_size=0), "group_size"),
    ],
)
def test_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        quantize_experts(torch.randn(2, 4, 8), **kwargs)


def test_bad_tensors() -> None:
    with pytest.raises(ValueError, match="floating point"):
        quantize_experts(torch.zeros(2, 4, dtype=torch.int32))
    q = quantize_experts(torch.randn(2, 4, 8), 4, 4)
    with pytest.raises(ValueError, match="data has shape"):
        QuantizedExperts(q.data[:, :, :3], q.scales, 4, 4, q.shape, q.dtype)
    with pytest.raises(ValueError, match="scales has shape"):
        QuantizedExperts(q.data, q.scales[:, :, :1], 4, 4, q.shape, q.dtype)


@pytest.mark.parametrize("bits", QUANT_BITS)
def test_expert_by_expert_quantization_is_the_whole_tensors(bits, monkeypatch):
    """A stack is quantized one expert at a time (the host holds one expert's temporaries): the
    codes and scales are those of quantizing the whole tensor at once, also from an ExpertStack."""
    import speq.kernels.quant as quant
    from speq.kernels.quant import _quantize
    from speq.models.weights import ExpertStack

    monkeypatch.setattr(quant, "ROWS_AT_ONCE", 5)  # 12 rows: chunks of 5, 5 and 2
    w = torch.randn(5, 12, 40, dtype=torch.bfloat16)
    whole, by_expert = _quantize(w, bits, 16), quantize_experts(w, bits, 16)
    assert torch.equal(whole.data, by_expert.data) and torch.equal(whole.scales, by_expert.scales)
    stack = ExpertStack([[w[e, :5], w[e, 5:]] for e in range(5)])
    from_stack = quantize_experts(stack, bits, 16)
    assert torch.equal(from_stack.data, whole.data) and from_stack.shape == whole.shape
