"""Kernel configurations for the fused MoE: the config type, an analytic default, and tuned JSON
lookups. The search space and the offline tuner behind ``speq tune`` are in
:mod:`speq.kernels.tuner`.

Tuned configs live in ``speq/kernels/configs/`` as one JSON file per
(E, N, K, dtype, device name, Triton version), where N is the expert intermediate size I and K
the hidden size H, with one entry per token-count bucket::

    {"meta": {...}, "configs": {"1": {"block_m": 16, ...}, "2": {...}, ...}}

A lookup takes the bucket nearest the actual token count (ties: the smaller bucket). Shapes
without a file get :func:`default_config`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from speq.kernels._triton import TRITON_VERSION, cdiv, next_power_of_2
from speq.kernels.alignment import ALIGN_METHODS
from speq.kernels.routing import expected_distinct_experts

__all__ = [
    "CONFIG_DIR",
    "DEFAULT_BUCKETS",
    "KernelConfig",
    "config_path",
    "default_config",
    "get_config",
    "load_configs",
    "nearest_bucket",
    "weight_format",
    "write_configs",
]

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
DEFAULT_BUCKETS: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
MIN_BLOCK = 16  # tl.dot needs M, N, K >= 16 on NVIDIA GPUs


def _is_pow2(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


@dataclass(frozen=True)
class KernelConfig:
    """Tiles and launch settings shared by the two GEMM kernels of the fused MoE.

    Attributes:
        block_m: rows (token, choice pairs) per block; the alignment pads each expert's pairs
            to a multiple of it.
        block_n: output columns per program (I for gate/up, H for down).
        block_k: reduction depth per step (H for gate/up, I for down). With quantized weights,
            a block_k dividing the group size lets the kernel scale after the dot.
        group_m: row blocks that consecutive programs walk before the next column tile, so
            programs running together share weight tiles in L2.
        num_warps, num_stages: Triton launch settings (ignored by the interpreter).
        split_k: programs splitting the down GEMM's reduction over I, combined by the atomic
            adds; fills the device when T is tiny. The deterministic combine uses 1.
        align: ``"sorted"`` or ``"direct"`` (see :class:`~speq.kernels.alignment.ExpertPlan`).
    """

    block_m: int = 16
    block_n: int = 64
    block_k: int = 64
    group_m: int = 1
    num_warps: int = 4
    num_stages: int = 3
    split_k: int = 1
    align: str = "sorted"

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n", "block_k"):
            value = getattr(self, name)
            if not _is_pow2(value) or value < MIN_BLOCK:
                raise ValueError(f"{name} must be a power of two >= {MIN_BLOCK}, got {value}")
        if not _is_pow2(self.num_warps):
            raise ValueError(f"num_warps must be a power of two, got {self.num_warps}")
        for name in ("group_m", "num_stages", "split_k"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.align not in ALIGN_METHODS:
            raise ValueError(f"align must be one of {ALIGN_METHODS}, got {self.align!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> KernelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown KernelConfig fields {sorted(unknown)}")
        return cls(**d)


def weight_format(dtype: torch.dtype, bits: int = 0, group_size: int | None = None) -> str:
    """The dtype part of a config key: ``"bfloat16"``, or ``"bfloat16-int4g128"`` when quantized."""
    name = str(dtype).removeprefix("torch.")
    return name if not bits else f"{name}-int{bits}g{group_size}"


def default_config(
    num_tokens: int,
    num_experts: int,
    top_k: int,
    intermediate: int,
    hidden: int,
    *,
    group_size: int | None = None,
    num_sms: int = 132,
) -> KernelConfig:
    """An analytic config for an untuned shape (a pure function of its arguments).

    Few rows per expert (decode): the GEMMs are weight-streaming GEMVs, so take the smallest
    block_m, a deep block_k, and split the down GEMM's reduction until the grid covers about
    two waves of ``num_sms``. Many rows: 64/128-row tiles of 64 columns with grouped ordering
    (sized to compile without spills). Tiles never exceed the problem (rounded up to a power of
    two, at least 16).
    """
    num_pairs = max(1, num_tokens * top_k)
    active = max(1.0, expected_distinct_experts(num_experts, top_k, max(1, num_tokens)))
    rows_per_expert = num_pairs / active
    small_n = max(MIN_BLOCK, next_power_of_2(min(intermediate, hidden)))
    small_k = max(MIN_BLOCK, next_power_of_2(min(intermediate, hidden)))
    if rows_per_expert <= 16:
        cfg = dict(block_m=16, block_n=64, block_k=128, group_m=1, num_warps=4, num_stages=4)
    elif rows_per_expert <= 48:
        cfg = dict(block_m=32, block_n=64, block_k=64, group_m=4, num_warps=4, num_stages=4)
    elif rows_per_expert <= 96:
        cfg = dict(block_m=64, block_n=64, block_k=64, group_m=8, num_warps=4, num_stages=3)
    else:
        cfg = dict(block_m=128, block_n=64, block_k=64, group_m=8, num_warps=8, num_stages=3)
    # block_n 64 for the many-row tiles, and block_k 32 with quantized weights: the gate/up
    # kernel holds two [block_m, block_n] accumulators (and two more dot results when it scales
    # after the dot) beside the dequantized tiles; with block_n 128, or block_k 64 quantized,
    # ptxas spills on sm_80 and sm_90 (tests/kernel_tests/aot_report.py measures it).
    if group_size is not None and cfg["block_m"] >= 64:
        cfg["block_k"] = 32
    cfg["block_n"] = min(cfg["block_n"], small_n)
    cfg["block_k"] = min(cfg["block_k"], small_k)
    if group_size is not None and _is_pow2(group_size) and group_size >= MIN_BLOCK:
        cfg["block_k"] = min(cfg["block_k"], group_size)
    # Split the down GEMM (reduction over I) while the grid is short of two waves.
    blocks = math.ceil(active) * max(1, cdiv(math.ceil(rows_per_expert), cfg["block_m"]))
    programs = blocks * cdiv(hidden, cfg["block_n"])
    split_k = 1
    while (
        programs * split_k * 2 <= 2 * num_sms
        and intermediate // (split_k * 2) >= 4 * cfg["block_k"]
    ):
        split_k *= 2
    align = "direct" if num_tokens == 1 else "sorted"
    return KernelConfig(**cfg, split_k=split_k, align=align)


def config_path(
    num_experts: int,
    intermediate: int,
    hidden: int,
    fmt: str,
    device_name: str,
    triton_version: str | None = TRITON_VERSION,
    config_dir: Path | None = None,
) -> Path:
    """The JSON file for one (E, N=I, K=H, dtype, device, Triton version) key."""
    device = re.sub(r"[^A-Za-z0-9.]+", "_", device_name).strip("_")
    name = f"E={num_experts},N={intermediate},K={hidden},dtype={fmt},device={device},triton={triton_version}.json"
    return (config_dir or CONFIG_DIR) / name


@functools.lru_cache(maxsize=64)
def _read_configs(path: str, mtime_ns: int) -> tuple[tuple[int, KernelConfig], ...]:
    with open(path) as f:
        raw = json.load(f)
    return tuple(
        sorted((int(t), KernelConfig.from_dict(c)) for t, c in raw.get("configs", {}).items())
    )


def load_configs(path: Path) -> dict[int, KernelConfig]:
    """Bucket -> config from one tuned JSON file ({} when the file does not exist)."""
    try:
        mtime = path.stat().st_mtime_ns
    except FileNotFoundError:
        return {}
    return dict(_read_configs(str(path), mtime))


def nearest_bucket(buckets: Iterable[int], num_tokens: int) -> int:
    """The bucket closest to ``num_tokens``; the smaller one on a tie."""
    return min(buckets, key=lambda b: (abs(b - num_tokens), b))


def get_config(
    num_tokens: int,
    num_experts: int,
    top_k: int,
    intermediate: int,
    hidden: int,
    dtype: torch.dtype,
    *,
    bits: int = 0,
    group_size: int | None = None,
    device_name: str | None = None,
    config_dir: Path | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> KernelConfig:
    """The tuned config of the nearest bucket if a file exists for this key, else the analytic
    default; ``overrides`` (field -> value) replace fields of the result. Looked up once per
    process and key (it runs at every MoE layer of every step): `write_configs` forgets the
    lookups, so a file tuned in this process is seen."""
    cfg = _lookup(
        num_tokens, num_experts, top_k, intermediate, hidden, dtype, bits, group_size,
        device_name, config_dir,
    )  # fmt: skip
    return dataclasses.replace(cfg, **overrides) if overrides else cfg


@functools.lru_cache(maxsize=1024)
def _lookup(
    num_tokens: int,
    num_experts: int,
    top_k: int,
    intermediate: int,
    hidden: int,
    dtype: torch.dtype,
    bits: int,
    group_size: int | None,
    device_name: str | None,
    config_dir: Path | None,
) -> KernelConfig:
    cfg = None
    if device_name is not None:
        path = config_path(
            num_experts,
            intermediate,
            hidden,
            weight_format(dtype, bits, group_size),
            device_name,
            config_dir=config_dir,
        )
        tuned = load_configs(path)
        if tuned:
            cfg = tuned[nearest_bucket(tuned, num_tokens)]
    if cfg is None:
        cfg = default_config(
            num_tokens, num_experts, top_k, intermediate, hidden, group_size=group_size
        )
    return cfg


def write_configs(path: Path, configs: Mapping[int, KernelConfig], meta: Mapping[str, Any]) -> None:
    """Write one tuned file (buckets sorted ascending)."""
    _lookup.cache_clear()
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {
        "meta": dict(meta),
        "configs": {str(t): configs[t].to_dict() for t in sorted(configs)},
    }
    path.write_text(json.dumps(body, indent=2) + "\n")
