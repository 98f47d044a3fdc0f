"""Whether Triton is there, and the choice between the Triton and torch backends.

The package must import on machines without Triton (macOS, CPU-only CI images), so every other
module asks this one whether Triton is there. Nothing imports Triton before a kernel is first
launched: Triton reads ``TRITON_INTERPRET`` when a function is decorated, and importing Triton
decorates its own ``triton.language`` helpers, so an early import would leave them compiled for
a GPU while the kernels that call them run in the interpreter. This module finds Triton without
importing it; the ``@triton.jit`` modules (``_*_kernels.py``) are imported at the first launch.
That lets tests (and users) switch the interpreter on after ``import speq``.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import os
from typing import Literal

import torch

# the dtypes the Triton kernels take; float64 (speq's exact tests) runs the torch paths
TRITON_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32})

log = logging.getLogger(__name__)


def _find_triton() -> tuple[bool, str | None]:
    """(installed, version) of Triton, found without importing it."""
    try:
        if importlib.util.find_spec("triton") is None:  # also when sys.modules blocks it
            return False, None
        return True, importlib.metadata.version("triton")
    except (ImportError, ValueError, importlib.metadata.PackageNotFoundError) as exc:
        log.debug("Triton unavailable (%s); kernels use the torch backend", exc)
        return False, None


HAS_TRITON, TRITON_VERSION = _find_triton()

Backend = Literal["auto", "triton", "torch"]
BACKENDS: tuple[str, ...] = ("auto", "triton", "torch")


def interpreter_active() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    if not HAS_TRITON:
        return False
    import triton  # asked at a launch: see the module docstring

    try:
        return bool(triton.knobs.runtime.interpret)
    except AttributeError:  # older Triton without knobs
        return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def select_backend(
    requested: str,
    device: torch.device,
    dtypes: tuple[torch.dtype, ...],
    triton_dtypes: frozenset[torch.dtype],
    op: str,
) -> Literal["triton", "torch"]:
    """Pick the backend that runs ``op`` on tensors of ``dtypes`` on ``device``.

    ``"auto"`` takes Triton for CUDA tensors of a dtype the kernel supports and torch otherwise.
    ``"triton"`` insists on Triton and raises a ValueError naming what is missing: Triton itself,
    a CUDA device (or ``TRITON_INTERPRET=1`` for CPU tensors), or dtype support. ``"torch"`` always
    takes the torch implementation, which runs on any device and supports float64.
    """
    if requested not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {BACKENDS}, got {requested!r}")
    if requested == "torch":
        return "torch"
    dtype_ok = all(d in triton_dtypes for d in dtypes)
    device_ok = device.type == "cuda" or (device.type == "cpu" and interpreter_active())
    if requested == "auto":
        return "triton" if HAS_TRITON and device.type == "cuda" and dtype_ok else "torch"
    if not HAS_TRITON:
        raise ValueError(f"{op}: backend='triton' but Triton is not installed")
    if not dtype_ok:  # first: no device serves this dtype with the Triton kernel
        names = sorted(str(d).removeprefix("torch.") for d in triton_dtypes)
        got = [str(d).removeprefix("torch.") for d in dtypes]
        raise ValueError(f"{op}: the Triton kernel supports dtypes {names}, got {got}")
    if not device_ok:
        raise ValueError(
            f"{op}: the Triton kernel needs CUDA tensors, or CPU tensors with TRITON_INTERPRET=1 "
            f"set before speq's kernels are first launched; got device {device}"
        )
    return "triton"


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= n (and >= 1)."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    """Ceiling division of non-negative ints."""
    return -(-a // b)
