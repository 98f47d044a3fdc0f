"""`OffloadRuntime`: serves a decode step's expert needs from a bounded device cache.

At every MoE layer the step's WAIT node asks for the experts its tokens were routed to: resident
ones are hits; missing ones are fetched on demand over the link while the compute waits (stall);
a layer that needs more experts than its slots is computed in chunks. PREFETCH nodes and the
policy's hooks start copies early. Every need, copy, byte and stall is counted.

Experts a policy sends to the host instead (`OffloadPolicy.host_experts`) are computed there
from the host store's weights while the device computes the resident ones (speq.runtime.host);
only activations move.

A copy that fails is tried again, up to `MAX_COPY_ATTEMPTS` times in all; one that fails every
time is dropped from the cache (its slot never counts as resident), and the layer that needs it
raises `speq.TransferError`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from speq.runtime.cache import Entry, ExpertCache, NoSlotError
from speq.runtime.errors import TransferError
from speq.runtime.host import HostLane, HostRate
from speq.runtime.host_experts import GhostLRU, HostExperts
from speq.runtime.link import Copy, CopyCancelled, Link, Priority
from speq.runtime.metrics import Counters, Timeline
from speq.runtime.store import ExpertKey, ExpertPool, ExpertStore

if TYPE_CHECKING:
    from speq.runtime.draft_slots import Int4Slots

MAX_COPY_ATTEMPTS = 8  # tries of one transfer before TransferError (a 20% fault rate: 3e-6)


@dataclass
class Residency:
    """What a WAIT made resident for one layer: the experts, split into chunks that fit, and
    the experts the host computes instead (expert -> tokens routed to it)."""

    layer: int
    chunks: list[list[int]]
    entries: list[Entry]  # of the first chunk, pinned
    host: dict[int, int] = field(default_factory=dict)


class OffloadPolicy:
    """Hooks a policy adds to the runtime. The base class fetches on demand only.

    Class attributes say what a policy needs from the rest of speq (the registry in
    speq.runtime.policies is read for them, never the policy's name): ``drafts``, a draft graph
    and its quantized experts; ``next_layer_prefetch``, PREFETCH nodes fed by the next layer's
    router; ``knows_future``, the run's routing recorded first (lookahead eviction needs it);
    ``all_resident``, a slot for every expert; ``host_compute``, a host lane (it sends experts
    to the host: `host_experts`); ``host_only``, no expert slot at all; ``places_at_load``,
    every slot filled before the run. `for_run` makes the instance for one run."""

    name = "ondemand"
    eviction = "lru"
    drafts = False
    next_layer_prefetch = False
    knows_future = False
    all_resident = False
    host_compute = False
    host_only = False
    places_at_load = False

    @classmethod
    def for_run(cls, engine: Any, prompt: torch.Tensor, n: int, sampling: Any) -> OffloadPolicy:
        """The policy for one `generate` of ``n`` tokens after ``prompt`` by ``engine`` (a
        `speq.runtime.engine.Engine`, for the recordings some policies need first)."""
        return cls()

    def extra_metrics(self) -> dict:
        """Policy-specific numbers for `Metrics.extra`."""
        return {}

    def on_need(self, rt: OffloadRuntime, layer: int, experts: Sequence[int]) -> None:
        """Called at each WAIT with every expert the layer needs."""

    def on_routing(self, rt: OffloadRuntime, layer: int, rows: list[list[int]]) -> None:
        """Called at each WAIT with each token's chosen experts (row t: token t's top-k)."""

    def before_ensure(self, rt: OffloadRuntime, layer: int, experts: Sequence[int]) -> None:
        """Called before each group of experts is made resident (a WAIT, or a later chunk)."""

    def after_layer(self, rt: OffloadRuntime, layer: int) -> None:
        """Called when a layer's routed experts have been computed and released."""

    def on_draft_route(self, rt: OffloadRuntime, layer: int, ids, weights) -> None:
        """Called by the draft graph's PREFETCH nodes with the draft router's choice."""
        raise RuntimeError(f"policy {self.name} has no draft")

    def host_experts(self, rt: OffloadRuntime, layer: int, tokens: Mapping[int, int]) -> list[int]:
        """Which of a WAIT's experts (expert -> tokens routed to it) the host computes instead
        of the device; the base class: none."""
        return []


class OffloadRuntime:
    def __init__(
        self,
        store: ExpertStore,
        cache: ExpertCache,
        link: Link,
        pool: ExpertPool | None,
        policy: OffloadPolicy,
        timeline: Timeline | None = None,
        copy_bytes: int | None = None,
        host: tuple[HostLane, HostRate] | None = None,
    ) -> None:
        """``copy_bytes``: what one expert copy moves over the link, counted in the deployment
        dtype (default: the store's dtype). ``host``: the host lane and its rate, for policies
        that compute experts on the host."""
        self.store, self.cache, self.link, self.pool = store, cache, link, pool
        self.copy_bytes = store.expert_bytes if copy_bytes is None else copy_bytes
        self.counters = Counters()
        self.timeline = timeline
        self.host: HostExperts | None = None
        if host is not None:
            lane, rate = host
            self.host = HostExperts(lane, rate, store, self.copy_bytes, self.counters, timeline)
        self.policy = policy
        self.trace = None  # the trace backend's routing (speq.runtime.trace_routing)
        self.recorder = None  # a TraceRecorder while a run is recorded
        # every ensure (and every layer's experts sent to the host), in order
        self.needs_log: list[tuple[int, frozenset[int]]] = []
        # copies in flight, in issue order (a dict: iteration order must not depend on ids)
        self._loading: dict[Entry, None] = {}
        self._prefetched: set[Entry] = set()
        # the draft's INT4 slots under shared draft memory (`Int4Slots.attach`), and the last
        # draft MoE's (full-precision, INT4) experts
        self.int4: Int4Slots | None = None
        self.draft_split = (0, 0)
        device = cache.slot_tables[store.layers[0]].device
        self._identity = torch.arange(store.num_experts, dtype=torch.int32, device=device)

    # ------------------------------------------------------------------ serving needs
    def need(self, layer: int, ids: torch.Tensor) -> Residency:
        """The WAIT of ``layer``: make the experts in ``ids`` resident (the first chunk now)."""
        rows = ids.reshape(ids.shape[0], -1).tolist()  # host sync: a DATA_DEPENDENT op
        self.counters.routings += sum(map(len, rows))
        tokens: dict[int, int] = {}
        for e in sorted(e for row in rows for e in row):
            tokens[e] = tokens.get(e, 0) + 1
        experts = list(tokens)
        self.policy.on_routing(self, layer, rows)
        self.policy.on_need(self, layer, experts)
        if self.host is not None:
            if self.host.ghost is None:  # from what the cache holds when the run starts
                self.host.ghost = GhostLRU(
                    self.cache.group_of, self.cache.group_slots, self.cache.entries
                )
            self.host.ghost.observe(layer, experts)
        host = {e: tokens[e] for e in self.policy.host_experts(self, layer, tokens)}
        if host:
            self.needs_log.append((layer, frozenset(host)))
            self.counters.needs += len(host)
            self.counters.host_expert_runs += len(host)
            experts = [e for e in experts if e not in host]
            if not experts:
                return Residency(layer, [], [], host)
        cap = self.cache.capacity(layer)
        if len(experts) > cap:  # chunks: what is loaded first, then what is loading, then the rest
            experts.sort(key=lambda e: (self._state(ExpertKey(layer, e)), e))
        chunks = [experts[i : i + cap] for i in range(0, len(experts), cap)]
        return Residency(layer, chunks, self.ensure(layer, chunks[0]), host)

    def ensure(self, layer: int, experts: Sequence[int]) -> list[Entry]:
        """Make ``experts`` of ``layer`` resident and loaded; pin them; count hits and stalls."""
        self.needs_log.append((layer, frozenset(experts)))
        self.policy.before_ensure(self, layer, experts)
        self.settle()
        keys = [ExpertKey(layer, e) for e in experts]
        protect = frozenset(keys)
        entries, waits = [], []
        for key in keys:
            c = self.counters
            c.needs += 1
            entry = self.cache.get(key)
            if entry is None:
                c.demand_fetches += 1
                entry = self._fetch(key, Priority.DEMAND, protect)
                waits.append(entry.copy)
            else:
                if entry.prefetched:
                    c.prefetches_used += 1
                    entry.prefetched = False
                    self._prefetched.discard(entry)
                if entry.loading:
                    c.late += 1
                    waits.append(entry.copy)
                else:
                    c.hits += 1
            self.cache.pin(entry)
            self.cache.touch(entry)
            entries.append(entry)
        if waits:
            t0 = self.link.now()
            stall = self._await(entries)
            self.counters.stall_s += stall
            if self.timeline is not None and stall > 0:
                self.timeline.span("compute", f"stall L{layer}", t0, t0 + stall, experts=len(waits))
        for entry in entries:
            if entry.failed is not None:
                raise entry.failed
        return entries

    def _await(self, entries: Sequence[Entry]) -> float:
        """Wait until none of ``entries`` is loading (their retries included): the stall."""
        stall = 0.0
        while pending := [e.copy for e in entries if e.loading]:
            stall += self.link.wait(pending)
            self.settle()
        return stall

    def _state(self, key: ExpertKey) -> int:
        """0: resident and loaded, 1: being copied, 2: not cached."""
        entry = self.cache.get(key)
        return 2 if entry is None else int(entry.loading)

    def release(self, entries: Sequence[Entry]) -> None:
        for e in entries:
            self.cache.unpin(e)

    def prefetch(
        self,
        layer: int,
        experts: Sequence[int],
        priority: Priority = Priority.NORMAL,
        before: float = math.inf,
    ) -> int:
        """Start copies of the ``experts`` of ``layer`` that are not cached, while a slot can be
        had without evicting anything needed before ``before``. Returns the number issued."""
        self.settle()
        issued = 0
        for e in experts:
            key = ExpertKey(layer, e)
            if key in self.cache:
                continue
            if not self.cache.evictable_for(key, before) or not self._int4_room(layer):
                break
            self.fetch_into(key, None, priority)
            issued += 1
        return issued

    def fetch_into(self, key: ExpertKey, victim: ExpertKey | None, priority: Priority) -> Entry:
        """Prefetch ``key`` into a free slot (``victim`` None) or into ``victim``'s slot."""
        self.settle()
        entry = self._fetch(key, priority, victim=victim)
        entry.prefetched = True
        self._prefetched.add(entry)
        self.counters.prefetches += 1
        return entry

    def _fetch(
        self,
        key: ExpertKey,
        priority: Priority,
        protect: frozenset[ExpertKey] = frozenset(),
        victim: ExpertKey | None = None,
    ) -> Entry:
        while True:
            try:
                if victim is None and not self._int4_room(layer=key.layer):
                    raise NoSlotError(f"no INT4 slot for the expert {key} would evict")
                entry = self.cache.insert(key, protect, victim)
                break
            except NoSlotError:
                # every slot is pinned or still loading, or no INT4 slot is free for the victim:
                # wait for the oldest copy in flight (the first issued among equal times)
                if not self._loading:
                    raise
                oldest = min(self._loading, key=lambda e: e.copy.issued_at)
                self.counters.stall_s += self._await([oldest])
        self._prefetched = {e for e in self._prefetched if e.key in self.cache}
        nbytes = self.copy_bytes
        src: tuple[torch.Tensor, ...] = ()
        dst: tuple[torch.Tensor, ...] = ()
        if self.pool is not None:
            src, dst = self.store.copy_pairs(
                key, self.pool.w13[entry.slot], self.pool.w2[entry.slot]
            )
        entry.loading = True
        self._loading[entry] = None
        self._submit(entry, Copy(key, entry.slot, nbytes, priority, self.link.now(), src, dst))
        return entry

    def _submit(self, entry: Entry, copy: Copy) -> None:
        entry.copy = copy
        self.link.submit(copy)
        self.counters.experts_moved += 1
        self.counters.bytes_moved += copy.nbytes

    def upload(self, copy: Copy) -> None:
        """Move other weights (the draft's) over the link while the compute waits, retrying a
        failed copy like an expert's."""
        while True:
            self.link.submit(copy)
            self.counters.stall_s += self.link.wait([copy])
            self.counters.bytes_moved += copy.nbytes
            if copy.error is None:
                return
            if copy.attempt >= MAX_COPY_ATTEMPTS:
                raise TransferError(str(copy.key), copy.attempt, copy.error)
            self.counters.copy_retries += 1
            copy = copy.retry(self.link.now())

    def quiesce(self) -> None:
        """Wait for every copy in flight (and its retries) and mark it loaded."""
        self.counters.stall_s += self._await(list(self._loading))
        self.settle()

    def _int4_room(self, layer: int) -> bool:
        """Whether an insert for ``layer`` may go ahead: it evicts nothing, or a free INT4 slot
        takes its victim."""
        return self.int4 is None or self.cache.has_free(layer) or self.int4.has_room()

    def rebind(self, cache: ExpertCache, pool: ExpertPool | None, policy: OffloadPolicy) -> None:
        """Serve later needs from another ``cache`` and ``pool`` under another ``policy`` (a
        new split of the device memory); the old cache's experts are gone with its slots."""
        if self.int4 is not None:
            raise RuntimeError("a run with shared draft memory does not change its split")
        self.quiesce()
        self.cache, self.pool, self.policy = cache, pool, policy
        self._prefetched.clear()
        if self.host is not None:  # the reuse a cache of the new size would see
            self.host.ghost = None

    def settle(self) -> None:
        """Mark entries whose copies have completed as loaded (and record them on the timeline)."""
        for entry in [e for e in self._loading if self.link.done(e.copy)]:
            if entry.copy.error is not None:
                self._retry_or_drop(entry)
                continue
            entry.loading = False
            self._loading.pop(entry, None)
            if self.int4 is not None:  # held at full precision now
                self.int4.release(entry.key)
            if self.timeline is not None:
                c = entry.copy
                self.timeline.span(
                    "copy", str(c.key), c.started_at, c.done_at, priority=c.priority.name
                )

    def _retry_or_drop(self, entry: Entry) -> None:
        """A failed copy: try it again, or after `MAX_COPY_ATTEMPTS` tries drop the entry from
        the cache with the error its next need raises."""
        c = entry.copy
        if c.attempt < MAX_COPY_ATTEMPTS and not isinstance(c.error, CopyCancelled):
            self.counters.copy_retries += 1
            self._submit(entry, c.retry(self.link.now()))
            return
        key = c.key
        what = f"expert {key} (layer {key.layer}, expert {key.expert})"
        entry.failed = TransferError(what, c.attempt, c.error)
        entry.loading = False
        self._loading.pop(entry, None)
        self._prefetched.discard(entry)
        self.cache.discard(entry)

    def unused_prefetches(self) -> int:
        """Prefetched experts still cached and never needed (wasted if the run ends now)."""
        return sum(1 for e in self._prefetched if e.key in self.cache and e.prefetched)

    # ------------------------------------------------------------------ compute
    def moe(
        self,
        x: torch.Tensor,
        ids: torch.Tensor,
        weights: torch.Tensor,
        residency: Residency,
        **extras,
    ) -> torch.Tensor:
        """The routed-expert block of one layer through the fused kernel, chunk by chunk;
        ``extras``: fused_moe's expert biases and activation (GPT-OSS)."""
        from speq.kernels import fused_moe

        layer = residency.layer
        job = None
        if self.host is not None:
            job = self.host.start(layer, residency.host, x, ids, weights, **extras)
        out = None
        for chunk, entries in self.serve(residency):
            ids_c, w_c = ids, weights
            if len(residency.chunks) > 1 or residency.host:  # this chunk's pairs only
                inside = torch.isin(ids, torch.tensor(chunk, device=ids.device))
                ids_c = torch.where(inside, ids, torch.full_like(ids, chunk[0]))
                w_c = weights * inside
            if self.pool is None:  # sim: no real copies; compute from the host weights
                (w13, w2), slots = self.store.stacked(layer), self._identity
            else:
                w13, w2, slots = self.pool.w13, self.pool.w2, self.cache.slot_tables[layer]
            y = fused_moe(x, w13, w2, ids_c.to(torch.int32), w_c, slots, **extras)
            if self.pool is not None:
                self.link.released([e.slot for e in entries])
            out = y if out is None else out + y
        if job is not None:
            y = self.host.finish(job).to(x.device)
            out = y if out is None else out + y
        return out

    # ------------------------------------------------------------------ host compute
    def host_choice(self, layer: int, tokens: Mapping[int, int], always: bool = False) -> list[int]:
        """The experts of ``tokens`` (expert -> tokens routed to it) not resident that the host
        computes (`HostExperts.choose`): each where it finishes first; with ``always``, every
        one not cached."""
        copies: dict[int, float | None] = {}
        for e in tokens:
            entry = self.cache.get(ExpertKey(layer, e))
            if entry is None:
                copies[e] = None
            elif entry.loading:
                copies[e] = self.link.landing(entry.copy, [x.copy for x in self._loading])
        return self.host.choose(tokens, copies, self.link.cost(self.copy_bytes), always)

    def link_backlog(self) -> float:
        """Seconds until the copies in flight are expected to be done."""
        return self.link.backlog([e.copy for e in self._loading])

    def join_host(self) -> None:
        """After a layer's device work on the virtual clock: wait for its host experts."""
        if self.host is not None:
            self.host.join()

    def serve(self, residency: Residency) -> Iterator[tuple[list[int], list[Entry]]]:
        """Each chunk of a layer's experts with its entries, resident and loaded, while the
        caller computes it; released after, and the policy told the layer is done. (The
        trace-driven backend computes nothing in between.)"""
        layer = residency.layer
        for i, chunk in enumerate(residency.chunks):
            entries = residency.entries if i == 0 else self.ensure(layer, chunk)
            for e in entries:
                if e.loading or (e.copy is not None and not self.link.done(e.copy)):
                    raise RuntimeError(f"expert {e.key} read before its copy completed")
            yield chunk, entries
            self.release(entries)
        self.policy.after_layer(self, layer)
