"""Weight-only INT4 / INT8 quantization of expert weights, for the draft model.

Symmetric round-to-nearest with one scale per group of ``group_size`` consecutive elements along
the last (reduction) dimension: K = H for ``w13 [S, 2I, H]`` and K = I for ``w2 [S, H, I]``. When
K is not a multiple of ``group_size`` the last group is short. For element ``w[..., n, c]``::

    g = c // group_size
    scale[..., n, g] = max_{c' in group g} |w[..., n, c']| / qmax      (qmax = 7 for INT4, 127 for INT8)
    q[..., n, c] = clamp(round(w[..., n, c] / scale[..., n, g]), -qmax, qmax)
    dequantize(): w[..., n, c] ~= q[..., n, c] * scale[..., n, g],  error <= scale / 2

Storage: INT8 keeps ``q`` as int8 ``[..., N, K]``. INT4 packs two codes per byte in a uint8
``[..., N, ceil(K / 2)]``: byte b holds ``q[2b] + 8`` in its low nibble and ``q[2b + 1] + 8`` in its
high nibble (an odd K pads the last high nibble with the code for 0). Scales are float32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from speq.kernels._triton import cdiv

__all__ = ["QUANT_BITS", "CpuInt4Experts", "QuantizedExperts", "quantize_experts", "to_cpu_int4"]

QUANT_BITS: tuple[int, ...] = (4, 8)
ROWS_AT_ONCE = 256  # of a 3-d weight's experts, quantized together (bounds the temporaries)


def _qmax(bits: int) -> int:
    return (1 << (bits - 1)) - 1


@dataclass(frozen=True)
class QuantizedExperts:
    """Quantized weights ``w [..., N, K]``; see the module docstring for the layout.

    Attributes:
        data: packed codes, uint8 ``[..., N, ceil(K/2)]`` (INT4) or int8 ``[..., N, K]`` (INT8).
        scales: float32 ``[..., N, ceil(K / group_size)]``; ``scales[..., n, g]`` scales the
            codes ``c`` with ``c // group_size == g`` of row n.
        bits: 4 or 8.
        group_size: elements per scale along K (the last group may be shorter).
        shape: the original shape ``(..., N, K)``.
        dtype: the original dtype, which :meth:`dequantize` returns by default.
    """

    data: torch.Tensor
    scales: torch.Tensor
    bits: int
    group_size: int
    shape: tuple[int, ...]
    dtype: torch.dtype

    def __post_init__(self) -> None:
        if self.bits not in QUANT_BITS:
            raise ValueError(f"bits must be one of {QUANT_BITS}, got {self.bits}")
        k = self.shape[-1]
        packed_k = cdiv(k, 2) if self.bits == 4 else k
        want_data = (*self.shape[:-1], packed_k)
        want_scales = (*self.shape[:-1], cdiv(k, self.group_size))
        if tuple(self.data.shape) != want_data:
            raise ValueError(f"data has shape {tuple(self.data.shape)}, expected {want_data}")
        if tuple(self.scales.shape) != want_scales:
            raise ValueError(f"scales has shape {tuple(self.scales.shape)}, expected {want_scales}")

    @property
    def qmax(self) -> int:
        """Largest code magnitude: 7 for INT4, 127 for INT8."""
        return _qmax(self.bits)

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def nbytes(self) -> int:
        """Bytes of codes and scales together."""
        return self.data.numel() * self.data.element_size() + self.scales.numel() * 4

    def codes(self) -> torch.Tensor:
        """The integer codes ``q`` as int8, in the original shape."""
        if self.bits == 8:
            return self.data
        low = (self.data & 0xF).to(torch.int8) - 8
        high = (self.data >> 4).to(torch.int8) - 8
        both = torch.stack((low, high), dim=-1).flatten(-2)
        return both[..., : self.shape[-1]]

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``q * scale`` in ``dtype`` (default: the original dtype), computed in float32 or wider."""
        dtype = self.dtype if dtype is None else dtype
        compute = torch.promote_types(dtype, torch.float32)
        scale = self.scales.to(compute).repeat_interleave(self.group_size, dim=-1)
        return (self.codes().to(compute) * scale[..., : self.shape[-1]]).to(dtype)

    def select(self, index: int) -> QuantizedExperts:
        """The weights of one leading index (one slot of ``[S, N, K]``)."""
        return QuantizedExperts(
            self.data[index],
            self.scales[index],
            self.bits,
            self.group_size,
            self.shape[1:],
            self.dtype,
        )

    def to(self, device: torch.device | str) -> QuantizedExperts:
        return QuantizedExperts(
            self.data.to(device),
            self.scales.to(device),
            self.bits,
            self.group_size,
            self.shape,
            self.dtype,
        )


def quantize_experts(w: torch.Tensor, bits: int = 4, group_size: int = 128) -> QuantizedExperts:
    """Quantize ``w [..., N, K]`` along its last dimension (see the module docstring). A 3-d
    ``w [E, N, K]`` (or anything with ``shape``, ``dtype`` and ``w[e]``, such as an expert
    stack that is never materialised) is quantized `ROWS_AT_ONCE` rows of one expert at a time
    into the result, so the memory this takes beyond the result is those rows' temporaries."""
    if len(w.shape) != 3:
        return _quantize(w, bits, group_size)
    if w[0].is_meta:  # shapes only (a simulated model): in one go, no memory to bound
        return _quantize(torch.empty(w.shape, dtype=w.dtype, device="meta"), bits, group_size)
    data = scales = None
    for e in range(w.shape[0]):
        expert = w[e]
        for r in range(0, expert.shape[0], ROWS_AT_ONCE):  # rows quantize independently
            q = _quantize(expert[r : r + ROWS_AT_ONCE], bits, group_size)
            if data is None:
                data = q.data.new_empty((*w.shape[:2], q.data.shape[-1]))
                scales = q.scales.new_empty((*w.shape[:2], q.scales.shape[-1]))
            data[e, r : r + ROWS_AT_ONCE], scales[e, r : r + ROWS_AT_ONCE] = q.data, q.scales
    return QuantizedExperts(data, scales, bits, group_size, tuple(w.shape), w.dtype)


def _quantize(w: torch.Tensor, bits: int, group_size: int) -> QuantizedExperts:
    if bits not in QUANT_BITS:
        raise ValueError(f"bits must be one of {QUANT_BITS}, got {bits}")
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    if w.dim() < 1 or w.shape[-1] == 0:
        raise ValueError(f"w must have a non-empty last dimension, got shape {tuple(w.shape)}")
    if not w.is_floating_point():
        raise ValueError(f"w must be floating point, got {w.dtype}")
    qmax = _qmax(bits)
    k = w.shape[-1]
    num_groups = cdiv(k, group_size)
    compute = torch.promote_types(w.dtype, torch.float32)
    padded = torch.nn.functional.pad(w.to(compute), (0, num_groups * group_size - k))
    grouped = padded.unflatten(-1, (num_groups, group_size))
    scales = (grouped.abs().amax(dim=-1) / qmax).to(torch.float32)
    # Divide by the stored float32 scale so the error bound holds for what dequantize() uses.
    safe = torch.where(scales > 0, scales, torch.ones_like(scales)).to(compute)
    q = torch.round(grouped / safe.unsqueeze(-1)).clamp_(-qmax, qmax).flatten(-2)[..., :k]
    q = q.to(torch.int8)
    if bits == 8:
        data = q
    else:
        if k % 2:
            q = torch.nn.functional.pad(q, (0, 1))
        u = (q + 8).to(torch.uint8)
        data = u[..., 0::2] | (u[..., 1::2] << 4)
    return QuantizedExperts(
        data.contiguous(), scales.contiguous(), bits, group_size, tuple(w.shape), w.dtype
    )


CPU_INT4_GROUPS = (32, 64, 128, 256)  # the group sizes torch's CPU INT4 matmul takes


@dataclass(frozen=True)
class CpuInt4Experts:
    """INT4 weights ``[S, N, K]`` in the layout of torch's CPU INT4 matmul
    (``aten._weight_int4pack_mm_for_cpu``), which multiplies by the codes without unpacking a
    whole weight first: the same codes as a `QuantizedExperts` (``q + 8`` in a nibble) and
    the same scales, in bfloat16 pairs ``(scale, 0)``, one per ``group_size`` elements (the
    matmul computes ``(code - 8) * scale + 0``). Made by `to_cpu_int4`; its ``group_size``
    may be a divisor of the original one, each scale then repeated.

    Attributes:
        data: uint8 ``[S, N, K / 2]``, one expert's ``[N, K / 2]`` packed by
            ``aten._convert_weight_to_int4pack_for_cpu``.
        scales: bfloat16 ``[S, K / group_size, N, 2]``.
        group_size: elements per scale along K.
        shape: the original shape ``(S, N, K)``.
        dtype: the original dtype.
    """

    data: torch.Tensor
    scales: torch.Tensor
    group_size: int
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def nbytes(self) -> int:
        return self.data.numel() + self.scales.numel() * self.scales.element_size()

    def to(self, device: torch.device | str) -> CpuInt4Experts:
        if torch.device(device).type != "cpu":
            raise ValueError(f"CpuInt4Experts live on the CPU, not {device}")
        return self

    def matmul(self, x: torch.Tensor, slot: int) -> torch.Tensor:
        """``x [T, K] @ w[slot]^T`` in x's dtype, computed with bfloat16 activations."""
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(
            x.to(torch.bfloat16), self.data[slot], self.group_size, self.scales[slot]
        )
        return y.to(x.dtype)


def to_cpu_int4(q: QuantizedExperts) -> CpuInt4Experts | None:
    """``q`` (INT4, ``[S, N, K]``, on the CPU) in the CPU INT4 matmul's layout, or None where
    that kernel cannot take it: INT8, N not a multiple of 16, or no group size it accepts that
    divides both K and ``q.group_size`` (the scales are repeated for a smaller group)."""
    if q.bits != 4 or len(q.shape) != 3 or q.device.type != "cpu":
        return None
    s, n, k = q.shape
    if n % 16 or not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
        return None
    group = math.gcd(q.group_size, k)
    if group not in CPU_INT4_GROUPS:
        return None
    repeat = q.group_size // group if k > group else 1
    data, scales = [], []
    for e in range(s):
        one = q.select(e)
        codes = one.codes().to(torch.int32) + 8
        data.append(torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1))
        sc = one.scales.repeat_interleave(repeat, dim=-1)[:, : k // group]  # [N, K / group]
        scales.append(torch.stack((sc.t(), torch.zeros_like(sc.t())), dim=-1))
    return CpuInt4Experts(
        torch.stack(data), torch.stack(scales).to(torch.bfloat16), group, q.shape, q.dtype
    )
