"""`CompileOptions`: how to compile and run a model (validated against the runtime's registries
of policies, backends and cache layouts before any work is done)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from speq.runtime.backends import BACKENDS
from speq.runtime.budget import parse_budget
from speq.runtime.cache import ALLOCATIONS, EVICTIONS
from speq.runtime.policies import POLICIES

PREDICTORS = ("draft", "oracle")


@dataclass(frozen=True)
class CompileOptions:
    """How to compile and run.

    - ``policy``: how experts reach the device: ``speq`` (a quantized draft predicts them and they
      are prefetched while it drafts; verification checks k drafted tokens at once),
      ``resident`` (all on the device), ``ondemand`` (LRU cache, fetch on miss), ``nextgate``
      (also prefetch the next layer's predicted experts), ``oracle`` (perfect knowledge of the
      run's routing: the I/O bound).
    - ``device_memory``: the device budget, bytes or a string like ``"6GB"`` / ``"512MB"``; None
      means room for every expert. Non-expert weights and the KV cache are always resident; the
      rest becomes expert cache slots.
    - ``backend``: ``cpu`` (real compute, copies over a link emulated on the wall clock), ``sim``
      (real compute for the tokens, a virtual clock from the hardware ``profile`` for time),
      ``cuda`` (a GPU: copy streams and events).
    - ``link_gbps`` / ``link_latency_us``: the emulated host → device link (cpu and sim backends);
      None takes the ``profile``'s.
    - ``profile``: a hardware profile name from ``speq.sim.PROFILES``.
    - ``cache_allocation``: ``global`` (any slot holds any layer's expert) or ``per_layer``.
    - ``eviction``: ``lru``, ``lfu`` or ``lookahead``; None takes the policy's own.
    - ``trace_path``: write a Chrome-trace timeline of compute and copies after each generate.
    - ``dtype``: the compute dtype (default: the model's own).
    - ``k``: tokens drafted per cycle under ``policy="speq"``; None lets the governor choose it
      (and re-choose it every cycle) from a short calibration on the backend in use.
    - ``ttft_budget_ms``: the governor keeps one cycle within this time (k_SLO); None: no limit.
      (The paper's example is 500 ms on a GPU; on the cpu backend times are the CPU's own.)
    - ``draft_bits`` / ``draft_group_size``: the draft's weight-only expert quantization (INT4 or
      INT8, symmetric, one scale per group along the reduction dimension).
    - ``predictor``: what fills speq's Expert Lookahead Buffer: the draft's routers (``draft``),
      or ``oracle``: the target's own routing of the output, recorded in a first pass (perfect
      prediction, the best any predictor can do; a benchmark bound, since it needs the output
      first). The draft still proposes the tokens either way.
    - ``memory_dtype``: the dtype in which the device budget counts the model's weights and KV
      cache (default: the compute dtype). Tests and benchmarks compute in float64 so that outputs
      compare exactly; setting this to the deployment dtype (bfloat16) makes the budget split
      between non-expert weights, the draft (INT4/INT8 codes and fp32 scales, whatever the
      compute dtype) and the expert slots as it would on a GPU.
    - ``cuda_graphs``: on the ``cuda`` backend, capture each replay region of the lowered plan
      as a CUDA graph and replay it (speq.runtime.replay); False runs every node eagerly, as do
      float64 models (their kernels' torch paths sync with the host).
    """

    policy: str = "resident"
    device_memory: int | str | None = None
    backend: str = "cpu"
    link_gbps: float | None = None
    link_latency_us: float | None = None
    profile: str = "a100-40g-pcie4"
    cache_allocation: str = "global"
    eviction: str | None = None
    trace_path: str | None = None
    dtype: torch.dtype | None = None
    k: int | None = None
    draft_bits: int = 4
    draft_group_size: int = 128
    ttft_budget_ms: float | None = None
    predictor: str = "draft"
    memory_dtype: torch.dtype | None = None
    cuda_graphs: bool = True

    def __post_init__(self) -> None:
        for name, value, allowed in (
            ("policy", self.policy, tuple(POLICIES)),
            ("backend", self.backend, tuple(BACKENDS)),
            ("cache_allocation", self.cache_allocation, ALLOCATIONS),
        ):
            if value not in allowed:
                raise ValueError(f"CompileOptions.{name} = {value!r}: expected one of {allowed}")
        policy = POLICIES[self.policy]
        if self.eviction is not None and self.eviction not in EVICTIONS:
            raise ValueError(
                f"CompileOptions.eviction = {self.eviction!r}: expected one of {EVICTIONS}"
            )
        if self.eviction == "lookahead" and not policy.knows_future:
            raise ValueError(
                "CompileOptions.eviction = 'lookahead' needs a policy that knows the future (oracle)"
            )
        if self.link_gbps is not None and not self.link_gbps > 0:
            raise ValueError(f"CompileOptions.link_gbps must be > 0, got {self.link_gbps}")
        if self.link_latency_us is not None and self.link_latency_us < 0:
            raise ValueError(
                f"CompileOptions.link_latency_us must be >= 0, got {self.link_latency_us}"
            )
        unavailable = BACKENDS[self.backend].unavailable()
        if unavailable:
            raise ValueError(f"CompileOptions.backend = {self.backend!r} but {unavailable}")
        if self.device_memory is not None:
            parse_budget(self.device_memory)
        if self.k is not None and (not isinstance(self.k, int) or self.k < 1):
            raise ValueError(f"CompileOptions.k must be an int >= 1 or None, got {self.k!r}")
        if self.k is not None and not policy.drafts:
            raise ValueError("CompileOptions.k applies to policy='speq' only")
        if self.predictor not in PREDICTORS:
            raise ValueError(
                f"CompileOptions.predictor = {self.predictor!r}: expected one of {PREDICTORS}"
            )
        if self.predictor != "draft" and not policy.drafts:
            raise ValueError("CompileOptions.predictor applies to policy='speq' only")
        if self.memory_dtype is not None and not (
            isinstance(self.memory_dtype, torch.dtype) and self.memory_dtype.is_floating_point
        ):
            raise ValueError(
                f"CompileOptions.memory_dtype must be a floating torch.dtype or None, "
                f"got {self.memory_dtype!r}"
            )
        if self.draft_bits not in (4, 8):
            raise ValueError(f"CompileOptions.draft_bits must be 4 or 8, got {self.draft_bits}")
        if self.draft_group_size < 1:
            raise ValueError(
                f"CompileOptions.draft_group_size must be >= 1, got {self.draft_group_size}"
            )
