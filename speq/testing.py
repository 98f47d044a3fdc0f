"""Hooks for testing speq's failure paths. Not for production use."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from speq.runtime import link


@contextmanager
def inject_copy_faults(rate: float, seed: int = 0) -> Iterator[None]:
    """Within the block, every host → device expert copy of a link created in it fails with
    probability ``rate`` (reproducibly for a ``seed``): the copy completes without its data, as
    a failed DMA would. speq retries a failed copy a bounded number of times, then raises
    `speq.TransferError`. For testing."""
    link._faults.append(link.FaultInjector(rate, seed))
    try:
        yield
    finally:
        link._faults.pop()
