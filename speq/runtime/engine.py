"""`Engine`: runs a compiled program on a backend.

It owns what one compiled model needs at run time: the host expert store and the device pool,
the memory plan, the draft's weights, a session per decode (link, expert cache, offloading
runtime and policy), the one-token and speculative decode loops, the recordings that the oracle
policies need first, calibration (speq.runtime.calibrate), and the memory split the governor
chose, read from ``program.annotations["policy"]``, including the switch to the draft mid-run
(speq.runtime.switch).
"""

from __future__ import annotations

import dataclasses
import secrets
import time
from collections.abc import Callable

import torch

from speq.cost import Calibration, Policy
from speq.ir.program import Program
from speq.ir.run import run_graph
from speq.models.kv_cache import KVCache
from speq.models.spec import ModelSpec
from speq.runtime.backends import SIM, Backend, get_backend
from speq.runtime.budget import BudgetError
from speq.runtime.cache import ExpertCache
from speq.runtime.calibrate import Calibrator
from speq.runtime.draft import DraftWeights
from speq.runtime.draft_slots import share_draft_memory
from speq.runtime.host import HostRate
from speq.runtime.link import Link
from speq.runtime.metrics import Metrics, Timeline
from speq.runtime.offload import OffloadPolicy, OffloadRuntime
from speq.runtime.options import CompileOptions
from speq.runtime.planning import plan_engine_memory
from speq.runtime.policies import OnDemand, draftless, get_policy
from speq.runtime.replay import Replayer
from speq.runtime.requests import check_request
from speq.runtime.sampling import SamplingParams, pick
from speq.runtime.session import Session
from speq.runtime.speculative import Recorder, Speq, Window, speculative_decode
from speq.runtime.store import ExpertPool, ExpertStore, place_evenly, preload_all
from speq.runtime.switch import MidRunSwitch
from speq.runtime.trace_routing import TraceRecorder, TraceRouting
from speq.sim.profiles import get_profile
from speq.sim.routing_trace import RoutingTrace


class Engine:
    """Runs ``program`` (the output of the pass pipeline) for ``spec``'s model, whose weights are
    ``params``, as ``options`` say."""

    def __init__(
        self,
        spec: ModelSpec,
        params: dict[str, torch.Tensor],
        program: Program,
        options: CompileOptions,
        routing_trace: RoutingTrace | None = None,
    ) -> None:
        """``routing_trace``: where the ``trace`` backend's routing and acceptance come from."""
        self.spec, self.options, self.program = spec, options, program
        self.backend = get_backend(options.backend)
        if (routing_trace is not None) != (self.backend.name == "trace"):
            raise ValueError(
                "the trace backend runs from a routing trace (speq.simulate), and only it does"
            )
        self.policy_class = get_policy(options.policy)
        self.profile = get_profile(options.profile)
        self.device = self.backend.device
        self.store = ExpertStore(spec, params, pin=self.backend.pins_memory)
        self.params = {k: v.to(self.device) for k, v in self.store.resident.items()}
        self.draft = DraftWeights(program, self.store, self.device, options.shared_draft)
        self.draft_fits = True  # False: the governor's draft has no room beside the minimum cache
        try:
            self.memory = plan_engine_memory(self)
        except BudgetError:
            if not self.governs:
                raise
            self.draft.drop()  # the governor's other split: no draft (raises if that fails too)
            self.memory = plan_engine_memory(self)
            self.draft_fits = False
        self.pool: ExpertPool | None = None
        self._pool_filled = False  # a pool holding every expert is filled once
        self._allocate_pool()
        self.node_seconds: dict = {}  # the sim backend's modelled node times, reused
        self.governed: Policy | None = None
        self.metrics: Metrics | None = None  # of the last generate
        self.calibration_s: float | None = None  # the last calibration's seconds (wall clock)
        self.switch = MidRunSwitch(self)
        self.routing_trace = routing_trace
        self.measured_node_times = False  # trace backend: node times from the trace's record
        self.recorder: TraceRecorder | None = None  # records the next generate's run
        self.calibrator = Calibrator(self)
        self.replayer: Replayer | None = None
        self._kv: KVCache | None = None  # the decodes' KV cache under replay (see kv_cache)
        if self.backend.device_type == "cuda" and options.cuda_graphs:
            from speq.kernels._triton import TRITON_DTYPES

            if spec.dtype in TRITON_DTYPES:  # float64 runs torch paths that sync with the host
                self.replayer = Replayer(capture=True)

    # ------------------------------------------------------------------ set-up
    @property
    def config(self):
        return self.spec.config

    @property
    def deployment_dtype(self) -> torch.dtype:
        """The dtype the model's weights have where it is deployed (CompileOptions.memory_dtype,
        else the compute dtype): device memory, every copy over the link and the sim backend's
        node costs count bytes in it, so that a model computed in float64 for exact tests is
        budgeted, moved and timed as the bf16 model it stands for. (The draft's INT4/INT8 codes
        and fp32 scales have one size everywhere.)"""
        return self.options.memory_dtype or self.spec.dtype

    @property
    def governs(self) -> bool:
        """Whether the governor chooses this program's policy (speculation without a fixed k)
        and has a choice to make (its draft fits the budget beside the smallest cache)."""
        return self.policy_class.drafts and self.options.k is None and self.draft_fits

    @property
    def link_params(self) -> tuple[float, float]:
        """(GB/s, latency in us) of the host -> device link: the options', else the profile's."""
        lat = self.options.link_latency_us
        return (
            self.options.link_gbps or self.profile.link_gbps,
            self.profile.link_latency_us if lat is None else lat,
        )

    def use(self, program: Program) -> None:
        """Run ``program`` from now on, and the split of device memory its policy chose: without
        a draft, the draft's bytes become expert cache slots."""
        self.program = program
        self.governed = program.annotations.get("policy")
        if self.governed is not None and not self.governed.use_draft:
            self.drop_draft()

    def _allocate_pool(self) -> None:
        """The expert pool the plan sizes, and under shared draft memory the INT4 slots beside
        it (None where the backend copies nothing)."""
        self.int4 = None
        if self.backend.copies_weights:
            self.pool = None  # freed (and given back to the device) before the new one
            self.backend.release_memory()
            self.pool = ExpertPool.allocate(self.store, self.memory.slots, self.device)
            self._pool_filled = False
            if self.memory.int4_slots:
                self.int4 = self.draft.slots(self.memory.int4_slots, self.device)

    def replan(self) -> None:
        """Plan the memory again (the draft came or went) and allocate the pool it leaves. Every
        capture goes first: captures hold the weights and the pool they read (and, on CUDA,
        their graphs' memory), so the old draft and pool would otherwise stay beside the new."""
        if self.replayer is not None:
            self.replayer.clear()
        self.memory = plan_engine_memory(self)
        self._allocate_pool()

    def drop_draft(self) -> None:
        """The draft's weights to host memory, their bytes to the expert cache."""
        if self.draft.on_device:
            if self.replayer is not None:
                self.replayer.clear()  # before the drop: a capture holds the draft's weights
            self.draft.drop()
            self.replan()

    def restore_draft(self) -> None:
        """The draft back on the device (between runs, not timed) if a decision dropped it."""
        if self.draft.params and not self.draft.on_device and self.draft_fits:
            self.draft.restore()
            self.replan()

    # ------------------------------------------------------------------ sessions
    def session(
        self, policy: OffloadPolicy, virtual: bool = False, slots: int | None = None
    ) -> Session:
        """A runtime for one decode under ``policy``: on the backend, or (``virtual``) on the sim
        backend's clock without copying anything; ``slots`` (virtual only) overrides the
        planned cache size."""
        slots = self.memory.slots if slots is None else slots
        backend = SIM if virtual and not self.backend.modelled_time else self.backend
        cache = self.cache(policy, slots)
        timeline = Timeline() if self.options.trace_path and not virtual else None
        link = backend.link(*self.link_params, self.device)
        pool = None if virtual else self.pool
        expert = self.memory.expert_bytes
        host = (backend.host(link), self.host_rate(backend, link)) if policy.host_compute else None
        runtime = OffloadRuntime(self.store, cache, link, pool, policy, timeline, expert, host)
        if self.routing_trace is not None:  # each run replays the trace from its start
            runtime.trace = TraceRouting(
                self.routing_trace, self.store.layers, self.program, self.measured_node_times
            )
        shares = policy.drafts and self.draft.shared and self.draft.on_device
        if policy.all_resident or slots >= len(self.store.keys()):
            # every expert fits: all are resident from the start (the engine's pool filled once)
            fill = pool is not None and not self._pool_filled
            preload_all(self.store, cache, pool if fill else None)
            self._pool_filled = self._pool_filled or fill
        elif policy.places_at_load or shares:  # shared: the INT4 slots hold the rest
            place_evenly(self.store, cache, pool)
        if shares:
            share_draft_memory(self, runtime, slots)
        # a dict of the session's own: a mid-run switch adds the draft's weights to it
        params = {**self.params, **(self.draft.params if self.draft.on_device else {})}
        return Session(
            self.spec,
            params,
            runtime,
            backend,
            self.profile,
            timeline,
            self.node_seconds,
            self.deployment_dtype.itemsize,
        )

    def host_rate(self, backend: Backend, link: Link) -> HostRate:
        """The host's rate for a run on ``backend`` over ``link`` (`HostRate.over`); a trace
        backend run on measured node times keeps the recorded run's (its emulated host's)."""
        if self.routing_trace is not None and self.measured_node_times:
            return HostRate(self.profile, self.routing_trace.host_time_scale)
        emulated = not backend.modelled_time and backend.device_type == "cpu"
        return HostRate.over(self.profile, link, self.memory.expert_bytes, emulated)

    def cache(self, policy: OffloadPolicy, slots: int) -> ExpertCache:
        """An empty expert cache of ``slots`` slots with ``policy``'s eviction."""
        return ExpertCache(
            slots,
            self.store.layers,
            self.config.num_experts,
            allocation=self.options.cache_allocation,
            eviction=self.options.eviction or policy.eviction,
            next_use=getattr(policy, "next_use", None),
            device=self.device,
        )

    def record_needs(self, prompt: torch.Tensor, n: int, sampling: SamplingParams):
        """The run's expert needs, from a one-token-at-a-time virtual-clock pass (not measured):
        (every need in order, the cache's slot group of each layer, each group's slots)."""
        session = self.session(OnDemand(), virtual=True)
        self.decode(prompt, n, sampling, session)
        session.finish("record", 0, 0)
        cache = session.runtime.cache
        return session.runtime.needs_log, cache.group_of, cache.group_slots

    def record_windows(
        self,
        speq: Speq,
        prompt: torch.Tensor,
        n: int,
        sampling: SamplingParams,
        gen: torch.Generator | None = None,
    ) -> list[Window]:
        """The verification windows of decoding ``n`` tokens after ``prompt`` under ``speq``'s
        policy (its governor's k included), from a virtual-clock pass with its own KV cache
        (not measured); ``gen``: the sampling generator's state to start from."""
        recorder = Recorder(speq)
        session = self.session(recorder, virtual=True)
        cache = KVCache(self.config, 1, self.spec.dtype, self.device)
        self.decode(prompt, n, sampling, session, cache=cache, gen=gen)
        session.finish("record", 0, 0)
        return recorder.recorded

    # ------------------------------------------------------------------ running
    def step(
        self, graph: str, tokens: torch.Tensor, cache: KVCache, pos: int, session: Session
    ) -> torch.Tensor:
        """One forward pass of ``graph`` over ``tokens`` at ``pos``: the logits."""
        ctx = session.context(cache, pos, tokens.shape[0])
        kernels = session.backend.kernels
        trace, recorder = session.runtime.trace, session.runtime.recorder
        if trace is not None:
            trace.begin(graph, pos, tokens.shape[0])
        if recorder is not None:
            recorder.begin(graph, pos, tokens.tolist())
        t0, start = time.perf_counter(), session.link.now()
        if self.replayer is None or cache is not self._kv:  # replay serves the decodes' cache
            inputs = {"tokens": tokens.to(self.device), "pos": pos}
            (logits,) = run_graph(self.program[graph], inputs, ctx, kernels)
        else:  # the position as a device tensor: one capture serves every position
            # tokens and position in one asynchronous copy from pinned memory (torch's pinned
            # allocator keeps the block until the copy is done)
            staged = torch.cat([tokens.reshape(-1), torch.tensor([pos])])
            if self.backend.pins_memory:
                staged = staged.pin_memory()
            staged = staged.to(self.device, non_blocking=True)
            inputs = {"tokens": staged[:-1], "pos": staged[-1]}
            (logits,) = self.replayer.run(self.program[graph], inputs, ctx, kernels)
        cache.length = pos + tokens.shape[0]
        if trace is not None:  # meta logits: the trace says what the loop accepts
            session.link.advance(trace.overhead())
            logits = trace.logits(self.config.vocab_size)
        if recorder is not None:
            recorder.end(logits, time.perf_counter() - t0)
        if session.timeline is not None:  # the passes, on a lane of their own
            session.timeline.span("pass", f"{graph} x{tokens.shape[0]}", start, session.link.now())
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

    def decode(
        self,
        prompt: torch.Tensor,
        n: int,
        sampling: SamplingParams,
        session: Session,
        callback: Callable[[int], None] | None = None,
        may_switch: bool = False,
        *,
        cache: KVCache | None = None,
        gen: torch.Generator | None = None,
    ) -> list[int]:
        """Process the prompt but its last token, then decode ``n`` tokens from there. With
        ``may_switch``, one-token decoding of a governed model that dropped its draft watches
        its copies per token and switches to speculation when the governor says so. ``cache``:
        a KV cache of its own (default: `kv_cache`); ``gen``: the sampling generator to go on
        from (default: a new one from ``sampling``)."""
        gen = sampling.generator() if gen is None else gen
        cache = self.kv_cache() if cache is None else cache
        if prompt.shape[0] > 1:
            self.step("step", prompt[:-1], cache, 0, session)
        session.prefill_done()

        def speculate(speq: Speq, out: list[int], n: int) -> list[int]:
            def emit(tokens: list[int]) -> None:
                for t in tokens:
                    if callback is not None:
                        callback(t)

            return speculative_decode(
                lambda graph, tokens, pos: self.step(graph, tokens, cache, pos, session),
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
        watch = self.switch.watch(session.runtime) if may_switch else None
        for i in range(n):
            logits = self.step("step", torch.tensor([out[-1]]), cache, len(out) - 1, session)[-1]
            out.append(pick(logits.cpu(), sampling, gen))
            if callback is not None:
                callback(out[-1])
            if watch is not None:
                speq = watch.after_token(i + 1, n - i - 1, session, out, sampling, gen)
                if speq is not None:
                    return speculate(speq, out, n - i - 1)
        return out

    def calibrate(self, prompt: torch.Tensor | None) -> Calibration:
        """Measure what the governor decides from (`Calibrator.measure`), with the draft on the
        device; `use` then applies the program the governor pass annotated."""
        self.restore_draft()
        return self.calibrator.measure(prompt)

    def generate(
        self,
        prompt: torch.Tensor,
        n: int,
        sampling: SamplingParams,
        callback: Callable[[int], None] | None = None,
    ) -> list[int]:
        """Decode ``n`` tokens after ``prompt`` (1-D int64, checked): the prompt and the new
        tokens; what was measured is in ``self.metrics``."""
        may_switch = self.governed is not None and not self.governed.use_draft
        if sampling.do_sample and sampling.seed is None:  # a recording must draw the same
            sampling = dataclasses.replace(sampling, seed=secrets.randbits(63))
        if may_switch:  # the governor's split: no draft, a larger cache
            self.drop_draft()  # a run that switched to the draft left it resident
            self.switch.switched_after = None
            policy: OffloadPolicy = draftless(self.options.host_compute, self.governed)
        elif self.policy_class.drafts and not self.draft_fits:
            policy = draftless(self.options.host_compute)
        else:
            policy = self.policy_class.for_run(self, prompt, n, sampling)
        session = self.session(policy)
        session.runtime.recorder = self.recorder
        if self.recorder is not None:
            scale = self.host_rate(self.backend, session.link).time_scale
            self.recorder.trace.host_time_scale = scale
        try:
            out = self.decode(prompt, n, sampling, session, callback, may_switch)
        except BaseException:  # an error or an interrupt: drop queued copies, stop the link
            session.link.abort()
            raise
        finally:
            self.metrics = metrics = session.finish(self.options.policy, prompt.shape[0], n)
        if self.draft.on_device:
            metrics.extra["draft_bytes"] = self.memory.draft_bytes
        metrics.extra["calibration_s"] = self.calibration_s
        if may_switch:  # new tokens decoded before switching to the draft; None: no switch
            metrics.extra["switched_to_draft_after"] = self.switch.switched_after
        if session.timeline is not None:
            session.timeline.write(self.options.trace_path)
        return out

    def check_request(
        self, input_ids: torch.Tensor, max_new_tokens: int, callback: object = None
    ) -> torch.Tensor:
        """``input_ids`` as a 1-D int64 CPU tensor, or an error (`check_request`)."""
        return check_request(self.config, input_ids, max_new_tokens, callback)
