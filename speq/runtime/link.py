"""Host → device transfer engines: one small interface, three backends.

- `EmulatedLink` (cpu): a background thread serves copies one at a time over a link of a given
  bandwidth and latency, emulated by the wall clock, so overlap and stalls are real.
- `VirtualLink` (sim): the same queue discipline on a virtual clock; compute advances the clock.
- `CudaLink` (cuda): non-blocking copies from pinned memory on a copy stream, with events.

Copies are served highest priority first (demand fetches before prefetches), in issue order
within a priority. A copy that fails completes with its ``error`` set (the runtime retries it);
`speq.testing.inject_copy_faults` makes copies fail on purpose, to test that path.
"""

from __future__ import annotations

import heapq
import itertools
import random
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import IntEnum

import torch


class Priority(IntEnum):
    DEMAND = 0  # a miss: the compute stream is waiting for it
    HIGH = 1  # a prefetch that is needed soon (phase III of speculative prefetch)
    NORMAL = 2  # an early prefetch


@dataclass(eq=False)
class Copy:
    """One expert moving into one slot. Times are in the link's clock (seconds)."""

    key: object
    slot: int
    nbytes: int
    priority: Priority
    issued_at: float
    src: tuple[torch.Tensor, ...] = ()
    dst: tuple[torch.Tensor, ...] = ()
    started_at: float | None = None
    done_at: float | None = None
    event: object = field(default=None, repr=False)
    attempt: int = 1  # 1 for the first try of a transfer, then 2, 3, ... for its retries
    error: BaseException | None = None  # set when the copy completed without its data

    def retry(self, now: float) -> Copy:
        """The next attempt at the same transfer, issued at ``now``."""
        return Copy(
            self.key,
            self.slot,
            self.nbytes,
            self.priority,
            now,
            self.src,
            self.dst,
            attempt=self.attempt + 1,
        )


class CopyFault(RuntimeError):
    """A copy made to fail (speq.testing.inject_copy_faults)."""


class CopyCancelled(RuntimeError):
    """A queued copy dropped because its run stopped."""


class FaultInjector:
    """Makes each copy fail with probability ``rate`` (reproducibly for a ``seed``)."""

    def __init__(self, rate: float, seed: int = 0) -> None:
        if not 0 <= rate <= 1:
            raise ValueError(f"fault rate must be in [0, 1], got {rate!r}")
        self.rate = rate
        self.injected = 0  # copies made to fail so far
        self._rng = random.Random(seed)
        self._lock = threading.Lock()

    def fails(self) -> bool:
        with self._lock:
            fail = self._rng.random() < self.rate
            self.injected += fail
            return fail


_faults: list[FaultInjector] = []  # the active inject_copy_faults blocks, innermost last


def transfer(copy: Copy, faults: FaultInjector | None, non_blocking: bool = False) -> None:
    """Move ``copy``'s tensors, or set its ``error`` (an injected fault, or the copy's own)."""
    if faults is not None and faults.fails():
        copy.error = CopyFault(f"injected fault in the copy of {copy.key}")
        for d in copy.dst:  # garbage, as a failed DMA may leave: the slot must never be read
            d.fill_(float("nan")) if d.is_floating_point() else d.bitwise_not_()
        return
    try:
        for s, d in zip(copy.src, copy.dst):
            d.copy_(s, non_blocking=non_blocking)
    except Exception as e:  # a device error: reported as the copy's, never as a dead thread
        copy.error = e


class Link(ABC):
    """The copy engine of one backend."""

    def __init__(self, gbps: float, latency_us: float) -> None:
        if gbps <= 0 or latency_us < 0:
            raise ValueError(f"link needs gbps > 0 and latency_us >= 0, got {gbps}, {latency_us}")
        self.gbps = gbps
        self.latency_us = latency_us
        self.faults = _faults[-1] if _faults else None

    def cost(self, nbytes: int) -> float:
        """Seconds one copy of ``nbytes`` occupies the link."""
        return self.latency_us * 1e-6 + nbytes / (self.gbps * 1e9)

    def _left(self, copy: Copy) -> float:
        """Seconds of ``copy`` still to go: all of it if it has not started."""
        cost = self.cost(copy.nbytes)
        if copy.started_at is None:
            return cost
        return max(0.0, copy.started_at + cost - self.now())

    def backlog(self, in_flight: Sequence[Copy]) -> float:
        """Seconds until the copies ``in_flight`` are expected to be done (one at a time)."""
        return sum(self._left(c) for c in in_flight)

    def landing(self, copy: Copy, in_flight: Sequence[Copy]) -> float:
        """Seconds until ``copy`` (one of ``in_flight``) is expected to be done: its end if it
        started, else after the one running and every copy served before it (priority, then
        issue order)."""
        if copy.started_at is not None:
            return self._left(copy)
        rank = (copy.priority, copy.issued_at)
        ahead = [c for c in in_flight if c.started_at is None and (c.priority, c.issued_at) < rank]
        running = [self._left(c) for c in in_flight if c.started_at is not None]
        return min(running, default=0.0) + self.backlog(ahead) + self.cost(copy.nbytes)

    @abstractmethod
    def now(self) -> float: ...

    @abstractmethod
    def submit(self, copy: Copy) -> None: ...

    @abstractmethod
    def done(self, copy: Copy) -> bool: ...

    @abstractmethod
    def wait(self, copies: Sequence[Copy]) -> float:
        """Block until ``copies`` are complete; return the seconds spent blocked."""

    def advance(self, seconds: float) -> None:
        """Account ``seconds`` of compute (only the virtual clock needs this)."""

    def released(self, slots: Sequence[int]) -> None:
        """The compute queued so far is the last to read ``slots`` before a copy may overwrite
        them (only the CUDA link, whose compute runs behind the host, needs this)."""

    def close(self) -> None:
        """Finish outstanding copies and release resources."""

    def abort(self) -> None:
        """Drop the copies not started (they complete with `CopyCancelled`) and release
        resources: the run stopped."""
        self.close()


class EmulatedLink(Link):
    """A link emulated by a background thread on the wall clock (the cpu backend)."""

    def __init__(self, gbps: float, latency_us: float) -> None:
        super().__init__(gbps, latency_us)
        self._t0 = time.perf_counter()
        self._heap: list[tuple[int, int, Copy]] = []
        self._seq = itertools.count()
        self._cv = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._serve, name="speq-link", daemon=True)
        self._thread.start()

    def now(self) -> float:
        return time.perf_counter() - self._t0

    def submit(self, copy: Copy) -> None:
        copy.event = threading.Event()
        with self._cv:
            heapq.heappush(self._heap, (int(copy.priority), next(self._seq), copy))
            self._cv.notify()

    def done(self, copy: Copy) -> bool:
        return copy.event.is_set()

    def wait(self, copies: Sequence[Copy]) -> float:
        t0 = time.perf_counter()
        for c in copies:
            c.event.wait()
        return time.perf_counter() - t0

    def _serve(self) -> None:
        while True:
            with self._cv:
                while not self._heap and not self._closed:
                    self._cv.wait()
                if not self._heap:
                    return
                _, _, c = heapq.heappop(self._heap)
            c.started_at = self.now()
            transfer(c, self.faults)
            end = c.started_at + self.cost(c.nbytes)
            while (left := end - self.now()) > 0:
                time.sleep(left)
            c.done_at = self.now()
            c.event.set()

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify()
        self._thread.join()

    def abort(self) -> None:
        with self._cv:
            for _, _, c in self._heap:
                c.error, c.done_at = CopyCancelled(f"copy of {c.key} dropped"), self.now()
                c.event.set()
            self._heap.clear()
        self.close()


class VirtualLink(Link):
    """The same link on a virtual clock (the sim backend): no thread, no copies unless given."""

    def __init__(self, gbps: float, latency_us: float) -> None:
        super().__init__(gbps, latency_us)
        self._now = 0.0
        self._free_at = 0.0
        self._pending: list[tuple[int, int, Copy]] = []
        self._seq = itertools.count()

    def now(self) -> float:
        return self._now

    def submit(self, copy: Copy) -> None:
        heapq.heappush(self._pending, (int(copy.priority), next(self._seq), copy))
        self._schedule(self._now)

    def done(self, copy: Copy) -> bool:
        # every method that moves the clock or adds a copy (submit, advance, wait) schedules up
        # to now, so a check needs no scheduling of its own (settle checks every copy in flight)
        return copy.done_at is not None and copy.done_at <= self._now

    def advance(self, seconds: float) -> None:
        self._now += seconds
        self._schedule(self._now)

    def wait(self, copies: Sequence[Copy]) -> float:
        while any(c.done_at is None for c in copies):
            self._schedule(float("inf"), one=True)
        t = max([self._now, *(c.done_at for c in copies)])
        stall, self._now = t - self._now, t
        self._schedule(self._now)
        return stall

    def _schedule(self, until: float, one: bool = False) -> None:
        """Start, in priority order, every pending copy the link can start by ``until``."""
        while self._pending:
            start = max(self._free_at, min(c.issued_at for _, _, c in self._pending))
            if start > until:
                return
            ready = [e for e in self._pending if e[2].issued_at <= start]
            entry = min(ready)
            self._pending.remove(entry)
            heapq.heapify(self._pending)
            c = entry[2]
            c.started_at, c.done_at = start, start + self.cost(c.nbytes)
            transfer(c, self.faults)
            self._free_at = c.done_at
            if one:
                return


class CudaLink(Link):
    """Asynchronous copies on CUDA streams from pinned host memory; events mark completion.

    Bandwidth and latency are the hardware's own; ``gbps`` / ``latency_us`` are used only by the
    cost model. Two things make it behave as the emulated and virtual links model a link:

    * **Demand fetches do not queue behind prefetches.** Stream priorities order kernels, not
      host-to-device copies, and the copy engine serves what is enqueued in order; so at most
      ``prefetch_depth`` prefetches are enqueued on the device at a time, the rest wait on the
      host (highest priority first, then in issue order) and are enqueued as earlier ones
      complete (checked whenever the runtime calls the link, at least once per MoE layer). A
      demand fetch is enqueued at once, on its own stream, and waits at most for those.
    * **A copy waits only for the last reader of its slot.** `released` records an event after
      the kernels that read a set of slots; a copy into a slot waits for that slot's event, not
      for all compute queued so far.
    """

    def __init__(
        self, gbps: float, latency_us: float, device: torch.device, prefetch_depth: int = 2
    ) -> None:
        super().__init__(gbps, latency_us)
        self.device = device
        self.prefetch_depth = prefetch_depth
        self._held: list[tuple[int, int, Copy]] = []  # prefetches not yet enqueued
        self._seq = itertools.count()
        self._enqueued: list[Copy] = []  # prefetches on the device, maybe not complete
        self._release: dict[int, object] = {}  # slot -> event after its last reader
        self._t0 = time.perf_counter()
        self._setup()

    # the device calls (a CPU test fakes these five)
    def _setup(self) -> None:
        self._streams = {
            Priority.DEMAND: torch.cuda.Stream(self.device, priority=-1),
            Priority.HIGH: torch.cuda.Stream(self.device, priority=0),
            Priority.NORMAL: torch.cuda.Stream(self.device, priority=0),
        }

    def _enqueue(self, copy: Copy) -> None:
        stream = self._streams[copy.priority]
        release = self._release.pop(copy.slot, None)
        if release is not None:  # the kernels that read the slot's previous expert
            stream.wait_event(release)
        with torch.cuda.stream(stream):
            transfer(copy, self.faults, non_blocking=True)
            copy.event = torch.cuda.Event()
            copy.event.record(stream)

    def _complete(self, copy: Copy) -> bool:
        return bool(copy.event.query())

    def _sync(self, copy: Copy) -> None:
        copy.event.synchronize()

    def _drain(self) -> None:
        torch.cuda.synchronize(self.device)

    def released(self, slots: Sequence[int]) -> None:
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        for slot in slots:
            self._release[slot] = event

    # the queue discipline
    def now(self) -> float:
        return time.perf_counter() - self._t0

    def submit(self, copy: Copy) -> None:
        if copy.priority is Priority.DEMAND:
            self._start(copy)
        else:
            heapq.heappush(self._held, (int(copy.priority), next(self._seq), copy))
        self._pump()

    def _start(self, copy: Copy) -> None:
        copy.started_at = self.now()
        self._enqueue(copy)
        if copy.priority is not Priority.DEMAND:
            self._enqueued.append(copy)

    def _pump(self) -> None:
        """Enqueue held prefetches while fewer than ``prefetch_depth`` are incomplete."""
        self._enqueued = [c for c in self._enqueued if not self._complete(c)]
        while self._held and len(self._enqueued) < self.prefetch_depth:
            self._start(heapq.heappop(self._held)[2])

    def done(self, copy: Copy) -> bool:
        self._pump()
        if copy.event is None or not self._complete(copy):
            return False
        if copy.done_at is None:
            copy.done_at = self.now()  # when first seen complete
        return True

    def wait(self, copies: Sequence[Copy]) -> float:
        t0 = time.perf_counter()
        for c in copies:
            self._pump()
            while c.event is None:  # still held: the prefetches ahead of it must finish first
                self._sync(self._enqueued[0])
                self._pump()
            try:
                self._sync(c)
            except RuntimeError as e:  # the copy's CUDA error surfaces at the sync
                c.error = c.error or e
            if c.done_at is None:
                c.done_at = self.now()
        self._pump()
        return time.perf_counter() - t0

    def close(self) -> None:
        while self._held:
            self.wait([self._held[0][2]])
        self._drain()

    def abort(self) -> None:
        for _, _, c in self._held:
            c.error, c.done_at = CopyCancelled(f"copy of {c.key} dropped"), self.now()
        self._held.clear()
        self._drain()
