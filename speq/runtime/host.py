"""Experts computed on the host: their weights stay in host memory and the host computes them for
the tokens routed to them while the device computes the resident ones; only activations move.

One host lane per run serves jobs, one MoE layer's host experts each, in issue order:

- `ThreadHost` (cpu, cuda): a worker thread computes each job from the host store's weights (the
  same math as the device path, speq.kernels.expert_ffn). On the cpu backend a job completes no
  earlier than its emulated time (``throttle``): the profile's host rates slowed by the factor
  that slows the emulated link, so one expert's host compute costs as many decode-layer times as
  on the reference machine, as one copy does.
- `VirtualHost` (sim, trace): the job's compute runs at once (sim) or not at all (trace: no
  weights); its time on the virtual clock is modelled, and the compute waits for it after the
  layer's device work (`join`).

A job's time: the profile's ``host_latency_us`` once, plus per expert the slower of reading its
bytes and doing its flops at the host's rates (speq.sim.cost.host_seconds).
"""

from __future__ import annotations

import queue
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import torch

from speq.runtime.link import Link
from speq.sim.cost import host_seconds, link_seconds
from speq.sim.profiles import HardwareProfile


@dataclass(frozen=True)
class HostRate:
    """The host's speed as a run sees it: ``profile``'s host rates, every time multiplied by
    ``time_scale`` (1 on the sim backend; on the cpu backend the emulated link's slow-down)."""

    profile: HardwareProfile
    time_scale: float = 1.0

    @classmethod
    def over(cls, profile: HardwareProfile, link: Link, expert_bytes: int, emulated: bool):
        """The rate beside ``link``: the profile's, or where the link is ``emulated`` (the cpu
        backend) slowed by the factor the link is slowed by (its copy of one expert of
        ``expert_bytes`` over the profile's), so that host compute and copies keep the
        reference machine's proportions."""
        if not emulated:
            return cls(profile)
        return cls(profile, link.cost(expert_bytes) / link_seconds(expert_bytes, profile))

    @property
    def latency(self) -> float:
        """Seconds a job costs before its first expert (once per layer sent to the host)."""
        return self.time_scale * self.profile.host_latency_us * 1e-6

    def expert_seconds(self, expert_bytes: int, flops: float) -> float:
        """One expert of ``expert_bytes`` doing ``flops`` on the host."""
        return self.time_scale * host_seconds(expert_bytes, flops, self.profile)

    def job_seconds(self, expert_bytes: int, flops: list[float]) -> float:
        """One job: the latency, then one expert of ``expert_bytes`` per entry of ``flops``."""
        return self.latency + sum(self.expert_seconds(expert_bytes, f) for f in flops)


@dataclass(eq=False)
class HostJob:
    """One layer's experts computed on the host: ``compute`` returns their summed contribution
    ``[T, H]`` (None on the trace backend, which has no weights)."""

    layer: int
    experts: tuple[int, ...]
    seconds: float  # its time on the host lane (emulated or modelled)
    compute: Callable[[], torch.Tensor | None]
    issued_at: float = 0.0
    started_at: float | None = None
    done_at: float | None = None
    result: torch.Tensor | None = None
    error: BaseException | None = None
    event: threading.Event | None = None


class HostLane(ABC):
    """The host's compute lane of one run, on the link's clock."""

    def __init__(self, link: Link) -> None:
        self.link = link
        self._free_at = 0.0  # when the jobs issued so far are expected to be done

    def backlog(self) -> float:
        """Seconds until the jobs issued so far are expected to be done."""
        return max(0.0, self._free_at - self.link.now())

    def submit(self, job: HostJob) -> None:
        now = self.link.now()
        job.issued_at = now
        self._free_at = max(self._free_at, now) + job.seconds
        self._submit(job)

    @abstractmethod
    def _submit(self, job: HostJob) -> None: ...

    @abstractmethod
    def collect(self, job: HostJob) -> float:
        """Make ``job``'s result readable; return the seconds the compute waited for it."""

    def join(self) -> float:
        """Wait, on the clock, for the jobs the compute has collected (only the virtual clock
        defers this); return the seconds waited."""
        return 0.0

    def close(self) -> None:
        """Finish outstanding jobs and release resources."""


class ThreadHost(HostLane):
    """A worker thread computes the jobs for real, in issue order; with ``throttle`` each one
    completes no earlier than ``seconds`` after it started (the cpu backend's emulated host)."""

    def __init__(self, link: Link, throttle: bool) -> None:
        super().__init__(link)
        self.throttle = throttle
        self._jobs: queue.SimpleQueue[HostJob | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name="speq-host", daemon=True)
        self._thread.start()

    def _submit(self, job: HostJob) -> None:
        job.event = threading.Event()
        self._jobs.put(job)

    def _serve(self) -> None:
        while (job := self._jobs.get()) is not None:
            job.started_at = self.link.now()
            try:
                job.result = job.compute()
            except Exception as e:  # reported to the compute that collects it
                job.error = e
            if self.throttle:
                end = job.started_at + job.seconds
                while (left := end - self.link.now()) > 0:
                    time.sleep(left)
            job.done_at = self.link.now()
            job.event.set()

    def collect(self, job: HostJob) -> float:
        t0 = time.perf_counter()
        job.event.wait()
        if job.error is not None:
            raise job.error
        return time.perf_counter() - t0

    def close(self) -> None:
        self._jobs.put(None)
        self._thread.join()


class VirtualHost(HostLane):
    """The host lane on the virtual clock: a job starts when the lane is free, lasts its
    modelled ``seconds``, and its compute (if any) runs at once."""

    def __init__(self, link: Link) -> None:
        super().__init__(link)
        self._due = 0.0  # when the last collected job is done

    def _submit(self, job: HostJob) -> None:
        job.done_at = self._free_at  # `submit` queued it behind the jobs issued before
        job.started_at = job.done_at - job.seconds
        job.result = job.compute()

    def collect(self, job: HostJob) -> float:
        self._due = max(self._due, job.done_at)
        return 0.0

    def join(self) -> float:
        wait = max(0.0, self._due - self.link.now())
        if wait:
            self.link.advance(wait)
        return wait
