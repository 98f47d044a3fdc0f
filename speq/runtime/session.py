"""`Session`: the state of one generate call's run: the offloading runtime, the clock, the
timeline and the metrics it ends with."""

from __future__ import annotations

from typing import Any

import torch

from speq.ir.graph import Node
from speq.ir.ops import Op
from speq.ir.run import RunContext
from speq.ir.schema import bind
from speq.models.kv_cache import KVCache
from speq.models.spec import ModelSpec
from speq.runtime.backends import Backend
from speq.runtime.draft_slots import SharedWeight
from speq.runtime.link import Link
from speq.runtime.metrics import Counters, Metrics, Timeline
from speq.runtime.offload import OffloadRuntime
from speq.sim.cost import node_cost, node_seconds

_READS_CONTEXT = (Op.ATTENTION, Op.MLA_ATTENTION)  # ops whose cost grows with the context


class Session:
    """The state of one generate call under offloading: runtime, clocks, timeline, metrics."""

    def __init__(
        self,
        spec: ModelSpec,
        params: dict[str, torch.Tensor],
        runtime: OffloadRuntime,
        backend: Backend,
        profile: Any = None,
        timeline: Timeline | None = None,
        seconds_cache: dict | None = None,
        dtype_bytes: int | None = None,
    ) -> None:
        """``seconds_cache``: modelled node times by (node, tokens, context, experts), kept by
        the compiled model across calls (the sim backend's hot path); ``dtype_bytes``: bytes
        per float element the modelled node times count (the deployment dtype's; default the
        compute dtype's)."""
        self.dtype_bytes = spec.dtype.itemsize if dtype_bytes is None else dtype_bytes
        self.spec, self.params, self.runtime = spec, params, runtime
        self._seconds = {} if seconds_cache is None else seconds_cache
        self.backend, self.profile, self.timeline = backend, profile, timeline
        self.link: Link = runtime.link
        self._tokens = 1
        self._context = 1
        self._start = self.link.now()
        self._prefill_end: float | None = None
        self._prefill_counters = Counters()
        self._stall_mark = runtime.counters.stall_s

    def context(self, cache: KVCache, pos: int, tokens: int) -> RunContext:
        self._tokens, self._context = tokens, pos + tokens
        return RunContext(self.params, cache, pos, self.runtime, self._observe)

    def _observe(self, node: Node, args: tuple, outs: tuple, seconds: float) -> None:
        recorder, trace = self.runtime.recorder, self.runtime.trace
        if recorder is not None:
            if node.op is Op.ROUTER:
                recorder.route(node.attrs["layer"], *outs)
            stalled = 0.0
            if not self.backend.modelled_time:  # a wall-clock node time includes its stalls
                stalled, self._stall_mark = (
                    self.runtime.counters.stall_s - self._stall_mark,
                    self.runtime.counters.stall_s,
                )
            recorder.node(node, seconds, stalled)
        measured = trace.node_seconds(node) if trace is not None and trace.measured else None
        if measured is not None:
            self.link.advance(measured)
            seconds = measured
        elif self.backend.modelled_time:
            touched, full = None, 0
            a = bind(node, args) if node.op is Op.FUSED_MOE else None
            residency = None if a is None else a["residency"]
            if residency is not None:  # the experts the WAIT made resident
                touched = sum(len(c) for c in residency.chunks)
            elif a is not None and isinstance(a["w13"], SharedWeight):  # the draft's, shared
                full, int4 = self.runtime.draft_split
                touched = full + int4
            # only attention's cost reads the context (speq.sim.cost): other nodes' times are
            # reused across positions
            context = self._context if node.op in _READS_CONTEXT else None
            key = (id(node), self._tokens, context, touched, full)
            seconds = self._seconds.get(key)
            if residency is not None and not residency.chunks:
                seconds = 0.0  # every routed expert on the host: no device kernel
            elif seconds is None:
                cost = node_cost(
                    node,
                    self.spec.config,
                    self._tokens,
                    self._context,
                    self.dtype_bytes,
                    experts_touched=touched,
                    experts_full=full,
                )
                seconds = self._seconds[key] = node_seconds(cost, self.profile)
            self.link.advance(seconds)
        if self.timeline is not None and seconds > 0:
            end = self.link.now()
            label = node.op.name.lower() + (
                f" L{node.attrs['layer']}" if "layer" in node.attrs else ""
            )
            self.timeline.span("compute", label, end - seconds, end)
        if node.op is Op.FUSED_MOE and self.backend.modelled_time:
            self.runtime.join_host()  # the layer's host experts, after its device work

    def prefill_done(self) -> None:
        self._prefill_end = self.link.now()
        c = self.runtime.counters
        self._prefill_counters = Counters(**vars(c))

    def finish(self, policy: str, prompt_tokens: int, new_tokens: int) -> Metrics:
        end = self.link.now()
        self.link.close()
        if self.runtime.host is not None:
            self.runtime.host.close()
        self.runtime.settle()
        prefill_end = self._prefill_end if self._prefill_end is not None else end
        d = self.runtime.counters.minus(self._prefill_counters)
        decode_s = end - prefill_end
        wasted = self.runtime.cache.evicted_prefetches + self.runtime.unused_prefetches()
        # demand fetches and late prefetches: the compute waited for a copy
        stalls = d.needs - d.hits - d.host_expert_runs
        return Metrics(
            policy=policy,
            backend=self.backend.name,
            prompt_tokens=prompt_tokens,
            tokens=new_tokens,
            prefill_ms=(prefill_end - self._start) * 1e3,
            tpot_ms=decode_s / new_tokens * 1e3 if new_tokens else 0.0,
            decode_ms=decode_s * 1e3,
            hit_rate=d.hits / d.needs if d.needs else 1.0,
            covered_rate=(d.hits + d.late) / d.needs if d.needs else 1.0,
            stalls_per_token=stalls / new_tokens if new_tokens else 0.0,
            token_hit_rate=1 - stalls / d.routings if d.routings else 1.0,
            needs=d.needs,
            hits=d.hits,
            late=d.late,
            demand_fetches=d.demand_fetches,
            experts_moved=d.experts_moved,
            bytes_moved=d.bytes_moved,
            prefetches_issued=self.runtime.counters.prefetches,
            prefetches_used=self.runtime.counters.prefetches_used,
            prefetches_wasted=wasted,
            stall_ms=d.stall_s * 1e3,
            prefill_bytes_moved=self._prefill_counters.bytes_moved,
            cache_slots=self.runtime.cache.num_slots,
            copy_retries=d.copy_retries,
            extra={
                **self.runtime.policy.extra_metrics(),
                "host_expert_runs": d.host_expert_runs,
                "host_compute_ms": d.host_s * 1e3,
                "full_precision_slots": sum(
                    not e.loading for e in self.runtime.cache.entries.values()
                ),
                "demotions": d.demotions,
            },
        )
