"""The backends a compiled model runs on, by name: one `Backend` object each, looked up once (at
compile) in `BACKENDS`; everything else reads the object, never the name.

- ``cpu``: real execution on the CPU; the copy engine is a background thread whose link is
  emulated at a given bandwidth and latency, so overlap and stalls are real and measured by the
  wall clock; experts computed on the host run on another thread, throttled likewise.
- ``sim``: real compute for the tokens, but time is a virtual clock: each node costs what the
  cost model says for a hardware profile, each copy what the link's bandwidth says. No expert is
  copied (the compute reads the host store).
- ``cuda``: a GPU: pinned host memory, a copy stream per priority, events, graph replay.
- ``trace``: the ``sim`` backend's clock without weights or compute: tensors live on the
  ``meta`` device, routing and acceptance come from a routing trace (speq.runtime.ops_trace),
  so models of any size simulate in seconds.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

import torch

from speq.ir.run import ImplTable
from speq.runtime.host import HostLane, ThreadHost, VirtualHost
from speq.runtime.link import CudaLink, EmulatedLink, Link, VirtualLink
from speq.runtime.ops_eager import EAGER
from speq.runtime.ops_offload import OFFLOAD
from speq.runtime.ops_trace import TRACE, shape_only

KERNELS = ImplTable((("offload", OFFLOAD), ("eager", EAGER)))  # the executing backends' ops
TRACE_KERNELS = ImplTable((("trace", TRACE), ("offload", OFFLOAD), ("eager", shape_only(EAGER))))


@dataclass(frozen=True)
class Backend:
    """What a backend provides: its device, its link (``link(gbps, latency_us, device)``), its
    clock (``modelled_time``: node and copy times from the cost model on a virtual clock,
    instead of the wall clock), its op implementations (``kernels``, which `lower` records
    in the plan and the run loop dispatches on), and how it computes experts on the host
    (``host(link)``: speq.runtime.host)."""

    name: str
    device_type: str
    link: Callable[[float, float, torch.device], Link]
    modelled_time: bool = False
    kernels: ImplTable = KERNELS
    host: Callable[[Link], HostLane] = VirtualHost

    @property
    def device(self) -> torch.device:
        return torch.device(self.device_type)

    @property
    def pins_memory(self) -> bool:
        """Host tensors are pinned, so copies to the device can be asynchronous."""
        return self.device_type == "cuda"

    @property
    def copies_weights(self) -> bool:
        """Experts really move into a device pool (not under a modelled clock, whose compute
        reads the host store)."""
        return not self.modelled_time

    def synchronize(self) -> None:
        """Wait for the work queued on the device (CUDA queues it; the CPU runs it at once), so
        that the wall clock measures compute, not enqueueing."""
        if self.device_type == "cuda":
            torch.cuda.synchronize()

    def release_memory(self) -> None:
        """Give the device memory that tensors no longer use back to the device (CUDA's caching
        allocator keeps freed blocks; a larger pool allocated next could not reuse them)."""
        if self.device_type == "cuda":
            torch.cuda.empty_cache()

    def unavailable(self) -> str | None:
        """Why this backend cannot run here, or None."""
        if self.device_type == "cuda" and not torch.cuda.is_available():
            return "no CUDA device is available"
        return None


BACKENDS: Mapping[str, Backend] = MappingProxyType(
    {
        "cpu": Backend(
            "cpu",
            "cpu",
            lambda gbps, lat, _: EmulatedLink(gbps, lat),
            host=lambda link: ThreadHost(link, throttle=True),
        ),
        "sim": Backend("sim", "cpu", lambda gbps, lat, _: VirtualLink(gbps, lat), True),
        "cuda": Backend("cuda", "cuda", CudaLink, host=lambda link: ThreadHost(link, False)),
        "trace": Backend(
            "trace", "meta", lambda gbps, lat, _: VirtualLink(gbps, lat), True, TRACE_KERNELS
        ),
    }
)
SIM = BACKENDS["sim"]  # the virtual clock that calibration probes and recording passes run on


def get_backend(name: str) -> Backend:
    """The backend called ``name``, or a ValueError listing those that exist."""
    try:
        return BACKENDS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown backend {name!r}: expected one of {tuple(BACKENDS)}") from None
