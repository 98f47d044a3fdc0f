"""`HostExperts`: one run's experts computed on the host instead of the device: which ones (the
cost rule, `choose`), and each MoE layer's job on the host lane (`start`, `finish`, `join`)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch

from speq.kernels.moe_cpu import expert_ffn
from speq.runtime.host import HostJob, HostLane, HostRate
from speq.runtime.metrics import Counters, Timeline
from speq.runtime.store import ExpertStore


class GhostLRU:
    """The keys an LRU cache of the run's size would hold, per slot group, fed every need (the
    host's experts too): its hit rate is the reuse a copied expert would see, whether or not
    experts are copied. Keys only, no weights."""

    def __init__(
        self, group_of: Mapping[int, int], group_slots: list[int], held: Iterable = ()
    ) -> None:
        """``held``: the keys (with ``layer`` and ``expert``) the cache starts with."""
        self.group_of, self.group_slots = group_of, group_slots
        self._held: list[dict[tuple[int, int], None]] = [{} for _ in group_slots]
        for key in held:
            self._held[group_of[key.layer]][(key.layer, key.expert)] = None
        self.hits = self.lookups = 0

    def observe(self, layer: int, experts: list[int]) -> None:
        g = self.group_of[layer]
        held, cap = self._held[g], self.group_slots[g]
        for e in experts:
            key = (layer, e)
            self.lookups += 1
            if key in held:
                self.hits += 1
                del held[key]
            held[key] = None
            if len(held) > cap:
                del held[next(iter(held))]

    @property
    def hit_rate(self) -> float:
        return self.hits / self.lookups if self.lookups else 0.0


class HostExperts:
    """The host side of one offloading run: ``lane`` computes, at ``rate``, from ``store``'s
    weights; every job and wait is counted in ``counters`` (and drawn on ``timeline``)."""

    def __init__(
        self,
        lane: HostLane,
        rate: HostRate,
        store: ExpertStore,
        expert_bytes: int,
        counters: Counters,
        timeline: Timeline | None = None,
    ) -> None:
        """``expert_bytes``: one expert's bytes as the host reads them (the deployment dtype's)."""
        self.lane, self.rate, self.store = lane, rate, store
        self.ghost: GhostLRU | None = None  # set by the runtime, which knows the cache
        self.expert_bytes, self.counters, self.timeline = expert_bytes, counters, timeline

    def seconds(self, tokens: int) -> float:
        """One expert for ``tokens`` tokens on the host (the job's latency not included)."""
        return self.rate.expert_seconds(self.expert_bytes, self.store.expert_flops * tokens)

    def choose(
        self,
        tokens: Mapping[int, int],
        copies: Mapping[int, float | None],
        copy_s: float,
        always: bool = False,
    ) -> list[int]:
        """Which experts the host computes, of those ``copies`` lists as not resident (expert ->
        seconds until its copy in flight lands, or None: not cached): each where it finishes
        first, on the host (after the jobs queued there and the experts already sent to it) or
        by copy (the copy in flight; for one not cached, a demand copy of ``copy_s`` after the
        misses already sent over the link). ``tokens``: expert -> tokens routed to it. With
        ``always``, every expert not cached (copies in flight are awaited). A copy in flight
        goes on either way: the expert lands in the cache for later needs.

        A demand copy also serves the expert's later needs while it stays cached: h / (1 - h)
        of them on average, h being the hit rate of an LRU cache of this size (`GhostLRU`);
        computed on the host instead, each of those is a miss again. So a miss's host time
        counts 1 / (1 - h) times against a new copy."""
        if always:
            return [e for e, landing in copies.items() if landing is None]
        reuse = 1.0 / max(1.0 - (self.ghost.hit_rate if self.ghost else 0.0), 1e-9)
        host_t, link_t, chosen = self.lane.backlog() + self.rate.latency, 0.0, []
        for e in sorted(copies):
            h = host_t + self.seconds(tokens[e])
            landing = copies[e]
            c = link_t + copy_s if landing is None else landing
            if (h if landing is not None else host_t + (h - host_t) * reuse) <= c:
                chosen.append(e)
                host_t = h
            elif landing is None:
                link_t = c
        return chosen

    def start(
        self,
        layer: int,
        host: Mapping[int, int],
        x: torch.Tensor | None,
        ids: torch.Tensor | None,
        weights: torch.Tensor | None,
        **extras,
    ) -> HostJob | None:
        """Send ``layer``'s ``host`` experts (expert -> tokens routed to it) to the lane; None
        when there are none. With ``x`` None (the trace backend) nothing is computed, only
        timed."""
        if not host:
            return None
        experts = tuple(host)
        seconds = self.rate.latency + sum(self.seconds(n) for n in host.values())
        compute: Callable[[], torch.Tensor | None] = lambda: None
        if x is not None:
            compute = self._compute(layer, experts, x, ids, weights, **extras)
        job = HostJob(layer, experts, seconds, compute)
        self.lane.submit(job)
        return job

    def _compute(self, layer, experts, x, ids, weights, b13=None, b2=None, activation=None):
        """The host's work for one job: each expert on the tokens routed to it, from the host
        store's weights (speq.kernels.expert_ffn, as the device path computes it), combined in
        fp32 (float64 for float64 models)."""
        cpu = torch.device("cpu")
        x, ids, weights = x.to(cpu), ids.to(cpu), weights.to(cpu)
        b13 = None if b13 is None else b13.to(cpu)
        b2 = None if b2 is None else b2.to(cpu)
        w13, w2 = self.store.w13[layer], self.store.w2[layer]
        act = {} if activation is None else {"activation": activation}

        def run() -> torch.Tensor:
            acc = torch.promote_types(x.dtype, torch.float32)
            out = torch.zeros(x.shape, dtype=acc)
            for e in experts:
                token, choice = torch.where(ids == e)
                bias = (None if b13 is None else b13[e], None if b2 is None else b2[e])
                y = expert_ffn(x[token], w13[e], w2[e], *bias, **act)
                out.index_add_(0, token, weights[token, choice].to(acc)[:, None] * y.to(acc))
            return out.to(x.dtype)

        return run

    def finish(self, job: HostJob) -> torch.Tensor | None:
        """``job``'s result, once done (the wall clock waits here; the virtual clock in
        `join`, after the layer's device work), counted and drawn."""
        t0 = self.lane.link.now()
        stall = self.lane.collect(job)
        self.counters.stall_s += stall
        self.counters.host_s += job.done_at - job.started_at
        if self.timeline is not None:
            n = len(job.experts)
            self.timeline.span("host", f"host L{job.layer}", job.started_at, job.done_at, experts=n)
            if stall > 0:
                self.timeline.span("compute", f"stall (host) L{job.layer}", t0, t0 + stall)
        return job.result

    def join(self) -> None:
        """After a layer's device work on the virtual clock: wait for its host experts."""
        t0 = self.lane.link.now()
        stall = self.lane.join()
        self.counters.stall_s += stall
        if self.timeline is not None and stall > 0:
            self.timeline.span("compute", "stall (host)", t0, t0 + stall)

    def close(self) -> None:
        self.lane.close()
