"""`speq.compile`: capture a model's decode step, run the pass pipeline, and return a runnable
`CompiledModel` whose experts are served by the offloading runtime."""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from speq.frontend.capture import capture
from speq.frontend.checkpoint import from_checkpoint
from speq.frontend.reference import from_reference
from speq.frontend.spec import ModelSpec
from speq.ir.graph import Graph
from speq.ir.interpreter import run_graph
from speq.ir.ops import Op
from speq.ir.program import Program
from speq.models.kv_cache import KVCache
from speq.models.model import MoEForCausalLM
from speq.passes.governor import (
    CacheModel,
    Governor,
    HardwareModel,
    Policy,
    govern,
    switch_to_draft,
)
from speq.passes.history import PassHistory, PassRecord
from speq.passes.make_draft import DRAFT_PREFIX
from speq.passes.pipeline import default_passes, run_passes
from speq.runtime.budget import Budget, MemoryPlan, parse_budget, plan_memory
from speq.runtime.cache import ALLOCATIONS, EVICTIONS, ExpertCache
from speq.runtime.calibrate import time_passes
from speq.runtime.execute import BACKENDS as EXEC_BACKENDS
from speq.runtime.execute import Session
from speq.runtime.link import Copy, CudaLink, EmulatedLink, Link, Priority, VirtualLink
from speq.runtime.metrics import Metrics, Timeline
from speq.runtime.offload import ExpertPool, OffloadPolicy, OffloadRuntime
from speq.runtime.policies import POLICIES, NextGate, OnDemand, Oracle, Resident, RoutingRecorder
from speq.runtime.replay import Replayer
from speq.runtime.sampling import SamplingParams, pick
from speq.runtime.speculative import SpecPolicy, Speq, speculative_decode
from speq.runtime.store import ExpertStore

log = logging.getLogger("speq")

BACKENDS = ("cpu", "sim", "cuda")
# A mid-run switch to the draft is weighed on the copies of the last SWITCH_WINDOW one-token
# steps, past the first SWITCH_WARMUP (which fill the cache from the prompt's experts)
SWITCH_WARMUP = 4
SWITCH_WINDOW = 8
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
            ("policy", self.policy, POLICIES),
            ("backend", self.backend, BACKENDS),
            ("cache_allocation", self.cache_allocation, ALLOCATIONS),
        ):
            if value not in allowed:
                raise ValueError(f"CompileOptions.{name} = {value!r}: expected one of {allowed}")
        if self.eviction is not None and self.eviction not in EVICTIONS:
            raise ValueError(
                f"CompileOptions.eviction = {self.eviction!r}: expected one of {EVICTIONS}"
            )
        if self.eviction == "lookahead" and self.policy != "oracle":
            raise ValueError(
                "CompileOptions.eviction = 'lookahead' needs a policy that knows the future (oracle)"
            )
        if self.link_gbps is not None and not self.link_gbps > 0:
            raise ValueError(f"CompileOptions.link_gbps must be > 0, got {self.link_gbps}")
        if self.link_latency_us is not None and self.link_latency_us < 0:
            raise ValueError(
                f"CompileOptions.link_latency_us must be >= 0, got {self.link_latency_us}"
            )
        if self.backend == "cuda" and not torch.cuda.is_available():
            raise ValueError("CompileOptions.backend = 'cuda' but no CUDA device is available")
        if self.device_memory is not None:
            parse_budget(self.device_memory)
        if self.k is not None and (not isinstance(self.k, int) or self.k < 1):
            raise ValueError(f"CompileOptions.k must be an int >= 1 or None, got {self.k!r}")
        if self.k is not None and self.policy != "speq":
            raise ValueError("CompileOptions.k applies to policy='speq' only")
        if self.predictor not in PREDICTORS:
            raise ValueError(
                f"CompileOptions.predictor = {self.predictor!r}: expected one of {PREDICTORS}"
            )
        if self.predictor != "draft" and self.policy != "speq":
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


class CompiledModel:
    """A compiled model: the step graph after every pass, the expert store, and `generate`."""

    def __init__(
        self,
        spec: ModelSpec,
        params: dict[str, torch.Tensor],
        options: CompileOptions,
        graphs: PassHistory,
    ) -> None:
        from speq.sim.profiles import get_profile

        self.spec, self.options, self.graphs = spec, options, graphs
        self.profile = get_profile(options.profile)
        self.device = torch.device("cuda" if options.backend == "cuda" else "cpu")
        self.store = ExpertStore(spec, params, pin=options.backend == "cuda")
        self.params = {k: v.to(self.device) for k, v in self.store.resident.items()}
        self.draft_bytes = 0
        if "draft" in self.program:
            self.params.update(self._quantize_draft())
        self.memory = self._plan_memory()
        self.pool = None
        self._pool_filled = False  # the resident policy's pool holds every expert once filled
        if options.backend != "sim":
            self.pool = ExpertPool.allocate(self.store, self.memory.slots, self.device)
        self.metrics: Metrics | None = None
        self._node_seconds: dict = {}  # the sim backend's modelled node times, reused
        self.governed: Policy | None = None
        self._calibrated_on_input = False
        # the draft's weights, and their bytes, while the expert cache has its memory
        self._host_draft: dict[str, object] = {}
        self._host_draft_bytes = 0
        self._draft_slots = 0  # expert slots beside the draft
        self._switched_after: int | None = None  # tokens decoded before a mid-run switch
        self._run_routing: dict | None = None
        self.replayer: Replayer | None = None
        self._kv: KVCache | None = None  # the decodes' KV cache under replay (see kv_cache)
        if options.backend == "cuda" and options.cuda_graphs:
            from speq.kernels.fused_moe import TRITON_DTYPES  # lazily: see speq.kernels._triton

            if spec.dtype in TRITON_DTYPES:  # float64 runs torch paths that sync with the host
                self.replayer = Replayer(capture=True)
        if options.policy == "speq" and options.k is None:
            self._calibrate(None)

    # ------------------------------------------------------------------ set-up
    @property
    def config(self):
        return self.spec.config

    @property
    def program(self) -> Program:
        """The program that runs: the output of the last pass."""
        return self.graphs.final

    @property
    def graph(self) -> Graph:
        """The target's step graph that runs."""
        return self.program["step"]

    def _quantize_draft(self) -> dict[str, object]:
        """The draft's experts: weight-only quantized copies, resident on the device."""
        from speq.kernels import quantize_experts

        out = {}
        for node in self.program["draft"].find(Op.PARAM):
            name = node.attrs["name"]
            if "bits" in node.attrs:
                dense = self.store.dense_param(name.removeprefix(DRAFT_PREFIX))
                bits, group = node.attrs["bits"], node.attrs["group_size"]
                q = quantize_experts(dense, bits, group).to(self.device)
                out[name] = q
                self.draft_bytes += q.nbytes
        return out

    def _plan_memory(self) -> MemoryPlan:
        cfg, store = self.config, self.store
        total = len(store.layers) * cfg.num_experts
        if self.options.policy == "resident":
            min_slots = total
        elif self.options.cache_allocation == "per_layer":
            min_slots = cfg.top_k * len(store.layers)
        else:
            min_slots = cfg.top_k
        budget = (
            None if self.options.device_memory is None else parse_budget(self.options.device_memory)
        )
        counted = self.options.memory_dtype or self.spec.dtype

        def size(nbytes: int) -> int:  # bytes of a weight or cache tensor in the counted dtype
            return nbytes * counted.itemsize // self.spec.dtype.itemsize

        return plan_memory(
            budget,
            non_expert_bytes=size(store.resident_bytes),
            kv_bytes=size(KVCache(cfg, 1, self.spec.dtype, "meta").nbytes),
            draft_bytes=self.draft_bytes,
            expert_bytes=size(store.expert_bytes),
            min_slots=min_slots,
            max_slots=total,
        )

    @property
    def budget(self) -> Budget | None:
        return self.memory.budget

    @property
    def link_params(self) -> tuple[float, float]:
        """(GB/s, latency in us) of the host -> device link: the options', else the profile's."""
        lat = self.options.link_latency_us
        return (
            self.options.link_gbps or self.profile.link_gbps,
            self.profile.link_latency_us if lat is None else lat,
        )

    def _link(self, virtual: bool) -> Link:
        gbps, lat = self.link_params
        if virtual or self.options.backend == "sim":
            return VirtualLink(gbps, lat)
        if self.options.backend == "cuda":
            return CudaLink(gbps, lat, self.device)
        return EmulatedLink(gbps, lat)

    def _session(
        self, policy: OffloadPolicy, virtual: bool = False, slots: int | None = None
    ) -> Session:
        """A runtime for one decode; ``slots`` (virtual only) overrides the planned cache size."""
        slots = self.memory.slots if slots is None else slots
        cache = self._cache(policy, slots)
        timeline = Timeline() if self.options.trace_path and not virtual else None
        link = self._link(virtual)
        pool = None if virtual else self.pool
        runtime = OffloadRuntime(self.store, cache, link, pool, policy, timeline)
        if isinstance(policy, Resident) or slots >= len(self.store.keys()):
            self._preload(cache)  # every expert fits: all are resident from the start
        backend = "sim" if virtual else self.options.backend
        return Session(
            self.spec, self.params, runtime, backend, self.profile, timeline, self._node_seconds
        )

    def _cache(self, policy: OffloadPolicy, slots: int) -> ExpertCache:
        return ExpertCache(
            slots,
            self.store.layers,
            self.config.num_experts,
            allocation=self.options.cache_allocation,
            eviction=self.options.eviction or policy.eviction,
            next_use=getattr(policy, "next_use", None),
            device=self.device,
        )

    def _calibrate(self, prompt: torch.Tensor | None) -> None:
        """Let the governor choose the policy from a calibration on ``prompt`` (None: a fixed
        random prompt, at compile time), keeping or dropping the draft as it decides."""
        t0 = time.perf_counter()
        self._restore_draft()
        self._draft_slots = self.memory.slots  # the cache beside the draft
        self.governed = self._govern(prompt)
        if not self.governed.use_draft:
            self._drop_draft()
        name = "governor" if prompt is None else "governor (recalibrated on the first prompt)"
        self.graphs.records.append(
            PassRecord(
                name,
                self.program,
                time.perf_counter() - t0,
                False,
                "governor: " + self.governed.describe(),
            )
        )

    def _govern(
        self, prompt: torch.Tensor | None, probe_k: int = 8, probe_tokens: int = 32
    ) -> Policy:
        """Calibrate on this backend (pass times, then short virtual-clock probes of speculation
        for the acceptance, routing locality and cache reuse, and of one-token decoding with the
        draft's memory as cache) and let the governor choose the policy."""
        cfg = self.config
        if prompt is None:
            # a fixed random prompt: a counting sequence makes the model babble digits that
            # touch only a few experts, which says nothing about a cache's misses on real text
            gen = torch.Generator().manual_seed(0)
            prompt = torch.randint(0, cfg.vocab_size, (16,), generator=gen)
        draft_s, verify = time_passes(self, prompt[None])
        copy_s = VirtualLink(*self.link_params).cost(self.store.expert_bytes)
        hw = HardwareModel(draft_s, verify, copy_s, source=f"measured ({self.options.backend})")
        # the probes count experts, not time: the virtual clock serves them without waiting
        n = max(1, min(probe_tokens, cfg.max_seq_len - prompt.shape[0] - probe_k - 1))
        acceptance, needs, new, tokens = self._probe(prompt, probe_k, n)
        cache = CacheModel.observed(cfg, self.memory.slots, needs, new, tokens)
        fits = cache.largest_fitting_k(cfg)
        if cache.kept(needs) < needs / 2 and fits:
            # the probe's windows overflowed the cache, which hides how much a window keeps from
            # the one before: probe again at the largest k whose window fits
            _, needs, new, _ = self._probe(prompt, fits, n)
            cache = dataclasses.replace(cache, reuse=cache.observed_reuse(needs, new))
        # the other split of the memory: no draft, its bytes as cache slots, one token per pass
        # (a virtual-clock run: with LRU and no prefetch, which experts miss does not depend on
        # timing); its copies per token in the steady state, past the first half of the run, as
        # the speculative probe's cycles are counted past the first
        total = len(self.store.keys())
        slots = min(total, self.memory.slots + self.draft_bytes // self.memory.expert_bytes)
        session = self._session(OnDemand(), virtual=True, slots=slots)
        moved: list[int] = []
        counters = session.runtime.counters
        self._decode(
            prompt, n, SamplingParams(), session, lambda _: moved.append(counters.experts_moved)
        )
        session.finish("calibrate", prompt.shape[0], n)
        half = len(moved) // 2
        plain_copies = (moved[-1] - (moved[half - 1] if half else 0)) / (len(moved) - half)
        return govern(
            cfg,
            hw,
            acceptance or [0.5],
            cache,
            ttft_budget_s=math.inf
            if self.options.ttft_budget_ms is None
            else self.options.ttft_budget_ms / 1e3,
            plain_copies_per_token=plain_copies,
        )

    def _probe(
        self, prompt: torch.Tensor, k: int, n: int
    ) -> tuple[list[float], float, float, float]:
        """Speculate at a fixed ``k`` for ``n`` tokens on the virtual clock: (acceptance by draft
        position, experts needed at verification per cycle, of which copied during the cycle,
        tokens per window), the cache's steady state (past the first cycle, which starts from
        the prefill's experts)."""
        probe = Speq(SpecPolicy(k=k))
        session = self._session(probe, virtual=True)
        self._decode(prompt, n, SamplingParams(), session)
        session.finish("calibrate", prompt.shape[0], n)
        st = probe.stats
        steady = slice(1 if st.cycles > 1 else 0, None)
        ks, io = st.k_per_cycle[steady], st.io_per_cycle[steady]
        needs, new = (sum(x) / len(io) for x in zip(*io))
        return probe.extra_metrics()["acceptance_by_position"], needs, new, 1 + sum(ks) / len(ks)

    def _drop_draft(self) -> None:
        """The governor chose no draft: its memory becomes expert cache slots. The quantized
        weights are kept in host memory, to come back over the link if the split changes."""
        draft = {k: v for k, v in self.params.items() if k.startswith(DRAFT_PREFIX)}
        self._host_draft = {k: v.to("cpu") for k, v in draft.items()}
        self._host_draft_bytes = self.draft_bytes
        self.params = {k: v for k, v in self.params.items() if k not in draft}
        self.draft_bytes = 0
        self._replan()

    def _restore_draft(self) -> None:
        """Bring the draft back (between runs, not timed) if a previous decision dropped it."""
        if "draft" in self.program and not self.draft_bytes:
            self.params.update({k: v.to(self.device) for k, v in self._host_draft.items()})
            self.draft_bytes = self._host_draft_bytes
            self._replan()

    def _switch_to_draft(self, session: Session, policy: Policy) -> Speq:
        """Mid-run: give the cache's memory back to the draft, which comes over the link while
        the compute waits, and speculate under ``policy`` with the smaller cache (it starts
        empty: the old slots are freed before the draft and the new pool are allocated)."""
        rt = session.runtime
        rt.quiesce()
        rt.pool = self.pool = None
        host = self._host_draft
        if session.backend == "sim":  # no real copies: the host tensors serve the compute
            device, src, dst = dict(host), (), ()
        else:
            device = {
                k: dataclasses.replace(
                    q,
                    data=torch.empty_like(q.data, device=self.device),
                    scales=torch.empty_like(q.scales, device=self.device),
                )
                for k, q in host.items()
            }
            src = tuple(t for q in host.values() for t in (q.data, q.scales))
            dst = tuple(t for q in device.values() for t in (q.data, q.scales))
        nbytes = self._host_draft_bytes
        rt.upload(Copy("draft", -1, nbytes, Priority.DEMAND, rt.link.now(), src, dst))
        self.params.update(device)
        self.draft_bytes = nbytes
        self._replan()
        speq = Speq(policy.spec, Governor(policy, self.config), self._run_routing)
        rt.rebind(self._cache(speq, self.memory.slots), self.pool, speq)
        return speq

    def _switch_cost_s(self) -> float:
        """Seconds a mid-run switch to the draft costs: its upload, and copying a cache's worth
        of experts again into the smaller cache."""
        link = VirtualLink(*self.link_params)
        return link.cost(self._host_draft_bytes) + self._draft_slots * link.cost(
            self.store.expert_bytes
        )

    def _replan(self) -> None:
        self.memory = self._plan_memory()
        if self.options.backend != "sim":
            self.pool = None  # freed before the new one is allocated
            self.pool = ExpertPool.allocate(self.store, self.memory.slots, self.device)
            self._pool_filled = False

    def _preload(self, cache: ExpertCache) -> None:
        """Every expert resident, in a fixed slot order (the pool is filled once)."""
        fill = not self._pool_filled
        for slot, key in enumerate(self.store.keys()):
            entry = cache.insert(key)
            assert entry.slot == slot, "resident slots are assigned in order"
            if fill and self.pool is not None:
                self.pool.w13[slot].copy_(self.store.w13[key.layer][key.expert])
                self.pool.w2[slot].copy_(self.store.w2[key.layer][key.expert])
        self._pool_filled = True

    def _policy(self, prompt: torch.Tensor, n: int, sampling: SamplingParams) -> OffloadPolicy:
        name = self.options.policy
        if name == "resident":
            return Resident()
        if name == "ondemand":
            return OnDemand()
        if name == "nextgate":
            return NextGate()
        if name == "speq" and self.governed is not None and not self.governed.use_draft:
            return OnDemand()  # the governor's split: no draft, a larger cache
        if name == "speq":
            routing = (
                self._record_routing(prompt, n, sampling)
                if self.options.predictor == "oracle"
                else None
            )
            if self.governed is not None:
                return Speq(self.governed.spec, Governor(self.governed, self.config), routing)
            return Speq(SpecPolicy(k=self.options.k), routing=routing)
        # oracle: record the run's routing first (a virtual-clock pass; its cost is not measured)
        session = self._session(OnDemand(), virtual=True)
        self._decode(prompt, n, sampling, session)
        session.finish("record", 0, 0)
        cache = session.runtime.cache
        return Oracle(session.runtime.needs_log, cache.group_of, cache.group_slots)

    def _record_routing(
        self, prompt: torch.Tensor, n: int, sampling: SamplingParams
    ) -> dict[tuple[int, int], frozenset[int]]:
        """The target's experts at each (position, MoE layer) of the output, from a one-token-
        at-a-time virtual-clock pass (not measured)."""
        recorder = RoutingRecorder()
        session = self._session(recorder, virtual=True)
        self._decode(prompt, n, sampling, session)
        session.finish("record", 0, 0)
        layers = len(self.store.layers)
        needs = recorder.needs[layers if prompt.shape[0] > 1 else 0 :]  # past the prefill pass
        first = prompt.shape[0] - 1  # the position of the first one-token step
        return {(first + i // layers, layer): experts for i, (layer, experts) in enumerate(needs)}

    # ------------------------------------------------------------------ running
    def _step(
        self, graph: str, tokens: torch.Tensor, cache: KVCache, pos: int, session: Session
    ) -> torch.Tensor:
        ctx = session.context(cache, pos, tokens.shape[0])
        inputs = {"tokens": tokens.to(self.device), "pos": pos}
        if self.replayer is None:
            (logits,) = run_graph(self.program[graph], inputs, ctx, EXEC_BACKENDS)
        else:  # the position as a device tensor: one capture serves every position
            inputs["pos"] = torch.tensor(pos, device=self.device)
            (logits,) = self.replayer.run(self.program[graph], inputs, ctx, EXEC_BACKENDS)
        cache.length = pos + tokens.shape[0]
        return logits

    def kv_cache(self) -> KVCache:
        """An empty KV cache for one decode. Under replay the same one every time: captured
        regions write into the cache they were captured with (and stale entries past the
        length are never read: attention masks every position after the query's)."""
        if self.replayer is None:
            return KVCache(self.config, 1, self.spec.dtype, self.device)
        if self._kv is None:
            self._kv = KVCache(self.config, 1, self.spec.dtype, self.device)
        self._kv.truncate(0)
        return self._kv

    def _decode(
        self,
        prompt: torch.Tensor,
        n: int,
        sampling: SamplingParams,
        session: Session,
        callback: Callable[[int], None] | None = None,
        may_switch: bool = False,
    ) -> list[int]:
        """Process the prompt but its last token, then decode ``n`` tokens from there. With
        ``may_switch``, one-token decoding of a governed ``speq`` model that dropped its draft
        watches its copies per token and switches to speculation when the governor says so."""
        gen = sampling.generator()
        cache = self.kv_cache()
        if prompt.shape[0] > 1:
            self._step("step", prompt[:-1], cache, 0, session)
        session.prefill_done()

        def speculate(speq: Speq, out: list[int], n: int) -> list[int]:
            def emit(tokens: list[int]) -> None:
                for t in tokens:
                    if callback is not None:
                        callback(t)

            return speculative_decode(
                lambda graph, tokens, pos: self._step(graph, tokens, cache, pos, session),
                cache.truncate,
                speq,
                out,
                n,
                self.config.max_seq_len,
                sampling,
                gen,
                session.link.now,
                emit,
            )

        policy = session.runtime.policy
        if isinstance(policy, Speq):
            return speculate(policy, prompt.tolist(), n)
        out = prompt.tolist()
        rt = session.runtime
        marks = [(rt.counters.experts_moved, len(rt.needs_log))]  # after each token
        for i in range(n):
            logits = self._step("step", torch.tensor([out[-1]]), cache, len(out) - 1, session)[-1]
            out.append(pick(logits.cpu(), sampling, gen))
            if callback is not None:
                callback(out[-1])
            marks.append((rt.counters.experts_moved, len(rt.needs_log)))
            if may_switch and SWITCH_WARMUP + SWITCH_WINDOW <= i + 1 < n:
                switched = self._reweigh_split(rt, marks, n - i - 1)
                if switched is not None:
                    self._switched_after = i + 1
                    return speculate(self._switch_to_draft(session, switched), out, n - i - 1)
        return out

    def _reweigh_split(
        self, rt: OffloadRuntime, marks: list[tuple[int, int]], remaining: int
    ) -> Policy | None:
        """The governor's view, from the last SWITCH_WINDOW one-token steps (copies per token,
        and the experts a layer they were routed over), of switching to the draft now."""
        (moved0, log0), (moved1, log1) = marks[-1 - SWITCH_WINDOW], marks[-1]
        experts: dict[int, set[int]] = {}
        for layer, chosen in rt.needs_log[log0:log1]:
            experts.setdefault(layer, set()).update(chosen)
        per_layer = sum(map(len, experts.values())) / max(len(experts), 1)
        pool = CacheModel.observed_pool(self.config, per_layer, SWITCH_WINDOW)
        copies = (moved1 - moved0) / SWITCH_WINDOW
        cost = self._switch_cost_s()
        return switch_to_draft(self.governed, self.config, copies, pool, remaining, cost)

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int = 32,
        *,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        callback: Callable[[int], None] | None = None,
    ) -> torch.Tensor:
        """Decode ``max_new_tokens`` tokens after ``input_ids`` (``[1, T]`` or ``[T]``).

        Greedy by default; ``do_sample=True`` samples with ``temperature`` / ``top_k`` / ``top_p``,
        reproducibly for a given ``seed``. ``callback(token)`` is called after each new token.
        Returns ``[1, T + max_new_tokens]`` int64; what was measured is in ``self.metrics``.
        """
        prompt = self.check_input_ids(input_ids)
        if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
        total = prompt.shape[0] + max_new_tokens
        if total > self.config.max_seq_len:
            raise ValueError(
                f"prompt ({prompt.shape[0]} tokens) + max_new_tokens ({max_new_tokens}) = {total} "
                f"exceeds the model's max_seq_len ({self.config.max_seq_len})"
            )
        sampling = SamplingParams(do_sample, temperature, top_k, top_p, seed)
        if max_new_tokens == 0:
            return prompt[None].clone()
        if self.governed is not None and not self._calibrated_on_input:
            # the compile-time choice came from a random prompt; real text routes differently
            # (it reuses experts), which decides whether the draft earns its memory
            self._calibrated_on_input = True
            self._calibrate(prompt)
        may_switch = self.governed is not None and not self.governed.use_draft
        if may_switch and self.draft_bytes:
            self._drop_draft()  # a run that switched to the draft left it resident
        self._switched_after = None
        self._run_routing = (  # perfect prediction, should the run switch to speculation
            self._record_routing(prompt, max_new_tokens, sampling)
            if may_switch and self.options.predictor == "oracle"
            else None
        )
        policy = self._policy(prompt, max_new_tokens, sampling)
        session = self._session(policy)
        try:
            out = self._decode(prompt, max_new_tokens, sampling, session, callback, may_switch)
        finally:
            self.metrics = session.finish(self.options.policy, prompt.shape[0], max_new_tokens)
        if self.draft_bytes:
            self.metrics.extra["draft_bytes"] = self.draft_bytes
        if may_switch:  # new tokens decoded before switching to the draft; None: no switch
            self.metrics.extra["switched_to_draft_after"] = self._switched_after
        if session.timeline is not None:
            session.timeline.write(self.options.trace_path)
        return torch.tensor([out], dtype=torch.int64)

    def check_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``input_ids`` as a 1-D int64 tensor, or a ValueError saying what was expected."""
        if not isinstance(input_ids, torch.Tensor):
            raise ValueError(f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"input_ids must be int64 (or int32) token ids, got {input_ids.dtype}")
        if input_ids.dim() == 2 and input_ids.shape[0] == 1:
            input_ids = input_ids[0]
        if input_ids.dim() != 1:
            raise ValueError(
                f"input_ids must have shape [1, T] or [T] (speq decodes one sequence at a time), "
                f"got {tuple(input_ids.shape)}"
            )
        if input_ids.numel() == 0:
            raise ValueError("input_ids is empty: give at least one prompt token")
        v = self.config.vocab_size
        if int(input_ids.min()) < 0 or int(input_ids.max()) >= v:
            raise ValueError(f"input_ids must lie in [0, {v}) (the vocabulary size)")
        return input_ids.to(torch.int64).cpu()


def compile(
    model: MoEForCausalLM | str | os.PathLike, options: CompileOptions | None = None
) -> CompiledModel:
    """Capture ``model``'s decode step, run the pass pipeline and return a `CompiledModel`.

    ``model`` is a `speq.models.MoEForCausalLM` or the path of a checkpoint folder, whose weights
    are then memory-mapped rather than loaded.
    """
    options = options or CompileOptions()
    if not isinstance(options, CompileOptions):
        raise TypeError(f"options must be a speq.CompileOptions, got {type(options).__name__}")
    if isinstance(model, (str, os.PathLike)):
        spec, params = from_checkpoint(model, options.dtype)
    else:
        spec, params = from_reference(model, options.dtype)
    t0 = time.perf_counter()
    program = Program((capture(spec),))
    history = run_passes(program, default_passes(options), time.perf_counter() - t0)
    if os.environ.get("SPEQ_DEBUG"):
        log.warning("speq.compile pass history:\n%s", history)
    return CompiledModel(spec, params, options, history)
