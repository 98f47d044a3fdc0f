"""`CompileOptions`: how to compile and run a model (validated against the runtime's registries
of policies, backends and cache layouts before any work is done)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from speq.runtime.backends import BACKENDS
from speq.runtime.budget import parse_budget
from speq.runtime.cache import ALLOCATIONS, EVICTIONS
from speq.runtime.policies import POLICIES
from speq.sim.profiles import PROFILES, HardwareProfile

PREDICTORS = ("draft", "oracle")
HOST_COMPUTE = ("auto", True, False)
DRAFT_MEMORY = ("shared", "separate")


@dataclass(frozen=True)
class CompileOptions:
    """How to compile and run.

    - ``policy``: how experts reach the device: ``speq`` (a quantized draft predicts them and they
      are prefetched while it drafts; verification checks k drafted tokens at once),
      ``resident`` (all on the device), ``ondemand`` (LRU cache, fetch on miss), ``nextgate``
      (also prefetch the next layer's predicted experts), ``hostcompute`` (every routed expert
      computed on the host, none on the device), ``fiddler`` (an LRU cache whose misses the host
      computes), ``oracle`` (perfect knowledge of the run's routing: the I/O bound).
    - ``device_memory``: the device budget, bytes or a string like ``"6GB"`` / ``"512MB"``; None
      means room for every expert. Non-expert weights and the KV cache are always resident; the
      rest becomes expert cache slots.
    - ``backend``: ``cpu`` (real compute, copies over a link emulated on the wall clock), ``sim``
      (real compute for the tokens, a virtual clock from the hardware ``profile`` for time),
      ``cuda`` (a GPU: copy streams and events).
    - ``link_gbps`` / ``link_latency_us``: the emulated host → device link (cpu and sim backends);
      None takes the ``profile``'s.
    - ``profile``: a hardware profile name from ``speq.sim.PROFILES``, or a `HardwareProfile`
      (one measured here: ``speq.sim.measure.measure_profile``).
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
      or ``oracle``: for every verification window, exactly the experts the target's
      verification of that window routes to, rejected positions included, recorded in a first
      speculative pass over the same windows (perfect prediction, the best any predictor can
      do; a benchmark bound: it needs the output first, and its recording pass is not timed).
      The draft still proposes the tokens either way. ``oracle`` needs a separate draft
      (``draft_memory="separate"``): a shared draft's tokens depend on when copies land.
    - ``memory_dtype``: the deployment dtype: the one in which the device budget counts the
      model's weights and KV cache, each expert copy's bytes over the link count, and the sim
      backend's node times count (default: the compute dtype). Tests and benchmarks compute in
      float64 so that outputs compare exactly; setting this to bfloat16 makes the budget split
      between non-expert weights, the draft (INT4/INT8 codes and fp32 scales, whatever the
      compute dtype) and the expert slots, and the link's traffic, as they would be on a GPU.
    - ``cuda_graphs``: on the ``cuda`` backend, capture each replay region of the lowered plan
      as a CUDA graph and replay it (speq.runtime.replay); False runs every node eagerly, as do
      float64 models (their kernels' torch paths sync with the host).
    - ``workspace_memory``: device memory set aside from ``device_memory`` for what is not a
      weight or the KV cache (activations, MoE intermediates, library workspaces, CUDA-graph
      pools), bytes or a string like ``"512MB"``; None: on the ``cuda`` backend an estimate
      from the model's shapes (`speq.runtime.budget.workspace_estimate`, which does not count a
      long prompt's prefill), on ``cpu`` and ``sim`` 0 (their budgets count weights and the KV
      cache, as the paper's do).
    - ``host_compute``: under ``policy="speq"``, which experts missing from the device cache at
      verification the host computes from host memory (only activations move) instead of
      copying them: ``"auto"``, each where the cost model (the profile's host and link rates)
      says that finishes first; ``True``, every one; ``False``, none (every miss is copied, as
      before host compute existed). Predicted experts are prefetched either way. Other policies
      ignore ``"auto"``; ``hostcompute`` and ``fiddler`` are the host-compute baselines.
    - ``draft_memory``: under ``policy="speq"``, ``"shared"`` (the default): each expert is held
      once, at full precision while cached and as INT4 otherwise (an evicted expert is quantized
      on the device into an INT4 slot; the draft reads each expert at the precision resident),
      so the same budget holds more experts at full precision (speq.runtime.draft_slots). The
      cache then starts filled at load, and a run whose governor dropped the draft does not
      bring it back mid-run. On ``cuda`` (not yet run on a GPU) the draft's MoE reads the two
      precisions in two kernel launches, outside the replay regions (the host picks each
      expert's precision). ``"separate"``: the draft's
      INT4 copy of every expert stays on the device beside the expert cache (an expert the
      cache holds is held twice). Other policies have no draft and ignore the default.
    - ``max_seq_len``: the context the KV cache holds (prompt + new tokens), at most the model's
      own; None: the model's, capped at `DEFAULT_MAX_SEQ_LEN` (Hugging Face models declare
      contexts of 32k-160k tokens, whose KV cache would take the device budget).
    """

    policy: str = "resident"
    device_memory: int | str | None = None
    backend: str = "cpu"
    link_gbps: float | None = None
    link_latency_us: float | None = None
    profile: str | HardwareProfile = "a100-40g-pcie4"
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
    max_seq_len: int | None = None
    workspace_memory: int | str | None = None
    host_compute: bool | str = "auto"
    draft_memory: str = "shared"

    @property
    def shared_draft(self) -> bool:
        """Whether the draft's INT4 experts share the experts' memory: ``draft_memory="shared"``
        under a policy that drafts (the others have no draft and ignore the default)."""
        return self.draft_memory == "shared" and POLICIES[self.policy].drafts

    def __post_init__(self) -> None:
        """Every option checked before any work: a TypeError for a wrong type, a ValueError for
        a bad value, each naming the option, the value and what is accepted."""
        for name, value, allowed in (
            ("policy", self.policy, tuple(POLICIES)),
            ("backend", self.backend, tuple(BACKENDS)),
            ("cache_allocation", self.cache_allocation, ALLOCATIONS),
            ("predictor", self.predictor, PREDICTORS),
        ):
            if not isinstance(value, str) or value not in allowed:
                raise ValueError(f"CompileOptions.{name} = {value!r}: expected one of {allowed}")
        if not isinstance(self.profile, HardwareProfile) and self.profile not in PROFILES:
            raise ValueError(
                f"CompileOptions.profile = {self.profile!r}: expected one of {tuple(PROFILES)} "
                "or a HardwareProfile"
            )
        policy = POLICIES[self.policy]
        if self.eviction is not None and self.eviction not in EVICTIONS:
            raise ValueError(
                f"CompileOptions.eviction = {self.eviction!r}: expected one of {EVICTIONS} or None"
            )
        if self.eviction == "lookahead" and not policy.knows_future:
            raise ValueError(
                "CompileOptions.eviction = 'lookahead' needs a policy that knows the future (oracle)"
            )
        _number("link_gbps", self.link_gbps, "GB/s", lambda v: v > 0, "> 0")
        _number("link_latency_us", self.link_latency_us, "microseconds", lambda v: v >= 0, ">= 0")
        _number("ttft_budget_ms", self.ttft_budget_ms, "milliseconds", lambda v: v > 0, "> 0")
        unavailable = BACKENDS[self.backend].unavailable()
        if unavailable:
            raise ValueError(f"CompileOptions.backend = {self.backend!r} but {unavailable}")
        if self.device_memory is not None:
            parse_budget(self.device_memory)
        if self.workspace_memory not in (None, 0):
            parse_budget(self.workspace_memory, "workspace_memory")
        for name, value in (
            ("k", self.k),
            ("draft_group_size", self.draft_group_size),
            ("max_seq_len", self.max_seq_len),
        ):
            if value is not None and (not _is_int(value) or value < 1):
                raise ValueError(f"CompileOptions.{name} must be an int >= 1, got {value!r}")
        if self.draft_group_size is None:
            raise ValueError("CompileOptions.draft_group_size must be an int >= 1, got None")
        if self.k is not None and not policy.drafts:
            raise ValueError("CompileOptions.k applies to policy='speq' only")
        if self.predictor != "draft" and not policy.drafts:
            raise ValueError("CompileOptions.predictor applies to policy='speq' only")
        if self.host_compute not in HOST_COMPUTE or not isinstance(self.host_compute, (bool, str)):
            raise ValueError(
                f"CompileOptions.host_compute = {self.host_compute!r}: expected one of {HOST_COMPUTE}"
            )
        if self.host_compute is True and not policy.drafts:
            raise ValueError(
                "CompileOptions.host_compute applies to policy='speq' only (the host-compute "
                "baselines are the policies 'hostcompute' and 'fiddler')"
            )
        if self.draft_memory not in DRAFT_MEMORY or not isinstance(self.draft_memory, str):
            raise ValueError(
                f"CompileOptions.draft_memory = {self.draft_memory!r}: expected one of {DRAFT_MEMORY}"
            )
        if self.draft_memory == "separate" and not policy.drafts:
            raise ValueError(
                "CompileOptions.draft_memory = 'separate' applies to policy='speq' only"
            )
        if self.draft_memory == "shared" and self.predictor == "oracle":
            # the recording pass's windows are replayed cycle by cycle; a shared draft reads each
            # expert at the precision resident when it runs, so its tokens (and the windows)
            # depend on when copies land, and the measured run can leave the recorded windows
            raise ValueError(
                "CompileOptions.predictor = 'oracle' needs draft_memory = 'separate': a shared "
                "draft's tokens depend on which copies have landed, so the run need not follow "
                "the recording pass's windows"
            )
        for name, value in (("dtype", self.dtype), ("memory_dtype", self.memory_dtype)):
            if value is None or (isinstance(value, torch.dtype) and value.is_floating_point):
                continue
            error = ValueError if isinstance(value, torch.dtype) else TypeError
            raise error(
                f"CompileOptions.{name} must be a floating torch.dtype or None, got {value!r}"
            )
        if not _is_int(self.draft_bits) or self.draft_bits not in (4, 8):
            raise ValueError(f"CompileOptions.draft_bits must be 4 or 8, got {self.draft_bits!r}")
        if not isinstance(self.cuda_graphs, bool):
            raise TypeError(f"CompileOptions.cuda_graphs must be a bool, got {self.cuda_graphs!r}")
        if self.trace_path is not None:
            _check_writable(self.trace_path)


DEFAULT_MAX_SEQ_LEN = 4096


def context_length(options: CompileOptions, model_max: int) -> int:
    """The KV cache's length for a model of context ``model_max`` under ``options``."""
    if options.max_seq_len is None:
        return min(model_max, DEFAULT_MAX_SEQ_LEN)
    if options.max_seq_len > model_max:
        raise ValueError(
            f"CompileOptions.max_seq_len = {options.max_seq_len} exceeds the model's context "
            f"({model_max} tokens)"
        )
    return options.max_seq_len


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(name: str, value: object, unit: str, ok, expected: str) -> None:
    """A numeric option: None, or a finite int or float for which ``ok`` holds."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"CompileOptions.{name} must be a number ({unit}) or None, got {value!r}")
    if not math.isfinite(value) or not ok(value):
        raise ValueError(f"CompileOptions.{name} must be {expected} ({unit}), got {value!r}")


def _check_writable(path: object) -> None:
    """``trace_path``'s folder exists and is writable (checked now: the trace is written after
    the work, which must not be lost to a bad path)."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"CompileOptions.trace_path must be a path or None, got {path!r}")
    target = Path(path)
    folder = target.parent
    if target.is_dir():
        raise ValueError(f"CompileOptions.trace_path = {str(path)!r} is a folder; give a file path")
    if not folder.is_dir():
        raise ValueError(
            f"CompileOptions.trace_path = {str(path)!r}: its folder {str(folder)!r} does not exist"
        )
    if not os.access(folder, os.W_OK):
        raise ValueError(
            f"CompileOptions.trace_path = {str(path)!r}: its folder {str(folder)!r} is not writable"
        )
