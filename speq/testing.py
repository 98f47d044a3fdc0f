"""Hooks for testing speq's failure paths. Not for production use."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from speq.runtime import link


@contextmanager
def inject_copy_faults(rate: float, seed: int = 0) -> Iterator[link.FaultInjector]:
    """Within the block, every host → device expert copy of a link created in it fails with
    probability ``rate`` (reproducibly for a ``seed``): the copy completes without its data, as
    a failed DMA would. speq retries a failed copy a bounded number of times, then raises
    `speq.TransferError`. For testing. Yields the injector (``injected``: copies failed so
    far)."""
    faults = link.FaultInjector(rate, seed)
    link._faults.append(faults)
    try:
        yield faults
    finally:
        link._faults.pop()
