"""The offline tuner behind ``speq tune``: the search space of fused MoE kernel configs, timing
every candidate on the current CUDA device, and writing the best per token-count bucket as a JSON
config file that :func:`~speq.kernels.autotune.get_config` then finds.

The command line (flags, progress bars, printed summary) is ``speq tune`` in :mod:`speq.cli`;
this module takes plain arguments and returns its results.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from speq.kernels._triton import HAS_TRITON, TRITON_VERSION, next_power_of_2
from speq.kernels.autotune import (
    MIN_BLOCK,
    KernelConfig,
    _is_pow2,
    config_path,
    weight_format,
    write_configs,
)
from speq.kernels.fused_moe import fused_moe
from speq.kernels.quant import quantize_experts
from speq.kernels.routing import route_topk
from speq.kernels.shapes import MoEShape

__all__ = ["search_space", "tune_and_write", "tune_shape", "tuning_available"]

log = logging.getLogger(__name__)


def tuning_available() -> bool:
    """Whether this machine can tune: a CUDA device and Triton."""
    return torch.cuda.is_available() and HAS_TRITON


def search_space(
    num_tokens: int, top_k: int, *, group_size: int | None = None
) -> list[KernelConfig]:
    """Candidate configs for one token count: tile shapes, grouping, warps, stages, split-K for
    tiny T and the direct alignment for decode-sized T. Pruned by the rows a block can fill."""
    num_pairs = num_tokens * top_k
    max_m = max(MIN_BLOCK, min(128, next_power_of_2(num_pairs)))
    block_ms = [m for m in (16, 32, 64, 128) if m <= max_m]
    block_ks = (64, 128, 256)
    if group_size is not None and _is_pow2(group_size):
        block_ks = tuple(k for k in block_ks if k <= group_size) or (max(MIN_BLOCK, group_size),)
    split_ks = (1, 2, 4, 8) if num_pairs <= 32 else (1,)
    aligns = ("sorted", "direct") if num_tokens <= 4 else ("sorted",)
    out = []
    for m in block_ms:
        for n in (32, 64, 128, 256):
            for k in block_ks:
                if m * n > 128 * 128 or n * k > 256 * 128:
                    continue
                for group_m in (1, 8) if m >= 64 else (1,):
                    for warps in (4, 8):
                        if warps == 8 and m * n < 64 * 128:
                            continue
                        for stages in (3, 4):
                            for split in split_ks:
                                for align in aligns:
                                    out.append(
                                        KernelConfig(m, n, k, group_m, warps, stages, split, align)
                                    )
    return out


def tune_shape(
    shape: MoEShape,
    dtype: torch.dtype,
    buckets: Sequence[int],
    *,
    bits: int = 0,
    group_size: int = 128,
    max_candidates: int | None = None,
    rep_ms: int = 20,
    progress: Callable[[Iterable[Any]], Iterable[Any]] = lambda it: it,
) -> dict[int, tuple[KernelConfig, float]]:
    """Time every candidate of :func:`search_space` for each bucket on the current CUDA device,
    inside a CUDA graph (``triton.testing.do_bench_cudagraph``), and return bucket ->
    (best config, its time in microseconds). Candidates that fail to compile or launch are
    skipped."""
    if not tuning_available():
        raise RuntimeError("tuning needs a CUDA device and Triton")
    import triton.testing

    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    e, h, i = shape.num_experts, shape.hidden, shape.intermediate
    w13 = torch.randn(e, 2 * i, h, device=dev, dtype=dtype, generator=gen) / math.sqrt(h)
    w2 = torch.randn(e, h, i, device=dev, dtype=dtype, generator=gen) / math.sqrt(i)
    if bits:
        w13, w2 = quantize_experts(w13, bits, group_size), quantize_experts(w2, bits, group_size)
    slots = torch.arange(e, dtype=torch.int32, device=dev)
    best: dict[int, tuple[KernelConfig, float]] = {}
    for tokens in buckets:
        x = torch.randn(tokens, h, device=dev, dtype=dtype, generator=gen)
        logits = torch.randn(tokens, e, device=dev, generator=gen)
        ids, weights = route_topk(logits, shape.top_k)
        candidates = search_space(tokens, shape.top_k, group_size=group_size if bits else None)
        if max_candidates is not None and len(candidates) > max_candidates:
            stride = len(candidates) / max_candidates  # an even sample across the space
            candidates = [candidates[int(j * stride)] for j in range(max_candidates)]
        for cfg in progress(candidates):
            fn = functools.partial(fused_moe, x, w13, w2, ids, weights, slots, config=cfg)
            try:
                fn()
                us = 1e3 * triton.testing.do_bench_cudagraph(fn, rep=rep_ms, return_mode="median")
            except Exception as exc:  # out of shared memory, registers, ...
                log.debug("config %s failed: %s", cfg, exc)
                continue
            if tokens not in best or us < best[tokens][1]:
                best[tokens] = (cfg, us)
        if tokens in best:
            log.info(
                "%s T=%d: %.1f us with %s", shape.name, tokens, best[tokens][1], best[tokens][0]
            )
    return best


def tune_and_write(
    shape: MoEShape,
    dtype: torch.dtype,
    buckets: Sequence[int],
    *,
    bits: int = 0,
    group_size: int = 128,
    max_candidates: int | None = None,
    config_dir: Path | None = None,
    progress: Callable[[Iterable[Any]], Iterable[Any]] = lambda it: it,
) -> tuple[Path, dict[int, tuple[KernelConfig, float]]]:
    """Tune one shape on the current CUDA device (:func:`tune_shape`) and write the best config
    of each bucket to its JSON file under ``config_dir`` (default
    :data:`~speq.kernels.autotune.CONFIG_DIR`), with the timings in its ``meta``. Returns the
    file's path and bucket -> (best config, its time in microseconds)."""
    device_name = torch.cuda.get_device_name()
    best = tune_shape(
        shape,
        dtype,
        buckets,
        bits=bits,
        group_size=group_size,
        max_candidates=max_candidates,
        progress=progress,
    )
    path = config_path(
        shape.num_experts,
        shape.intermediate,
        shape.hidden,
        weight_format(dtype, bits, group_size if bits else None),
        device_name,
        config_dir=config_dir,
    )
    meta = {
        "model": shape.name,
        "top_k": shape.top_k,
        "device": device_name,
        "triton": TRITON_VERSION,
        "torch": torch.__version__,
        "us": {str(t): round(us, 2) for t, (_, us) in sorted(best.items())},
    }
    write_configs(path, {t: cfg for t, (cfg, _) in best.items()}, meta)
    return path, best
