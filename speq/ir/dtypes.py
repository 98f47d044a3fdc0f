"""The IR's dtype names: one set of float names, one of integer names, and their torch dtypes.

Values carry a dtype name (``f32``, ``i64``, ...); ``i4`` / ``i8`` name weight-only quantized
weights, and ``kv`` / ``residency`` are tokens that order nodes (the KV cache written, a layer's
experts made resident) and carry no data.
"""

from __future__ import annotations

import torch

FLOAT_DTYPES = frozenset({"f16", "bf16", "f32", "f64"})
INT_DTYPES = frozenset({"i32", "i64"})
QUANT_DTYPES = frozenset({"i4", "i8"})

DTYPE_NAMES: dict[torch.dtype, str] = {
    torch.float16: "f16",
    torch.bfloat16: "bf16",
    torch.float32: "f32",
    torch.float64: "f64",
    torch.int32: "i32",
    torch.int64: "i64",
}
DTYPES: dict[str, torch.dtype] = {v: k for k, v in DTYPE_NAMES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    """The IR name of a torch dtype (``torch.float32`` → ``"f32"``)."""
    try:
        return DTYPE_NAMES[dtype]
    except KeyError:
        raise ValueError(
            f"unsupported dtype {dtype}: the IR knows {sorted(map(str, DTYPE_NAMES))}"
        ) from None
