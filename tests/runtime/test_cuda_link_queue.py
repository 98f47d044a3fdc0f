"""The CUDA link's queue discipline, on the CPU: its four device calls are faked, the rest is
the code a GPU runs. Demand fetches are enqueued at once; at most ``prefetch_depth`` prefetches
are on the device, the rest wait on the host in priority order; a copy into a slot waits for
that slot's release event only."""

import torch

from speq.runtime.link import Copy, CopyCancelled, CudaLink, Priority


class FakeDevice(CudaLink):
    """Copies complete when the test says (``finish``); ``order`` is the enqueue order."""

    def _setup(self) -> None:
        self.order: list[str] = []
        self.finished: set[str] = set()
        self.waited_on: dict[str, object] = {}
        self.synced: list[str] = []

    def _enqueue(self, copy: Copy) -> None:
        self.order.append(copy.key)
        self.waited_on[copy.key] = self._release.pop(copy.slot, None)
        copy.event = copy.key

    def _complete(self, copy: Copy) -> bool:
        return copy.key in self.finished

    def _sync(self, copy: Copy) -> None:
        self.synced.append(copy.key)
        self.finished.add(copy.key)

    def _drain(self) -> None:
        self.finished.update(self.order)

    def released(self, slots) -> None:
        for slot in slots:
            self._release[slot] = f"release {slot}"


def copy(key: str, priority: Priority, slot: int = 0) -> Copy:
    return Copy(key, slot, 100, priority, 0.0)


def test_demand_fetches_pass_prefetches_that_wait_on_the_host():
    link = FakeDevice(16.0, 0.0, torch.device("cpu"), prefetch_depth=2)
    pre = [copy(f"p{i}", Priority.NORMAL) for i in range(3)] + [copy("h", Priority.HIGH)]
    for c in pre:
        link.submit(c)
    assert link.order == ["p0", "p1"]  # two on the device, two held
    demand = copy("d", Priority.DEMAND)
    link.submit(demand)
    assert link.order == ["p0", "p1", "d"]  # not behind the held prefetches
    assert not link.done(pre[2])
    link.finished.add("p0")
    assert link.done(pre[0]) and link.order[-1] == "h"  # the freed place: highest priority first
    link.wait([pre[2]])  # held: waits for a prefetch ahead of it, then for itself
    assert link.order == ["p0", "p1", "d", "h", "p2"] and link.synced[-1] == "p2"
    assert all(c.done_at is not None for c in (pre[0], pre[2]))


def test_a_copy_waits_for_the_last_reader_of_its_slot_only():
    link = FakeDevice(16.0, 0.0, torch.device("cpu"))
    link.released([3, 5])
    link.submit(copy("a", Priority.DEMAND, slot=5))
    link.submit(copy("b", Priority.DEMAND, slot=4))
    link.submit(copy("c", Priority.DEMAND, slot=5))
    assert link.waited_on == {"a": "release 5", "b": None, "c": None}


def test_abort_cancels_the_held_prefetches_and_close_finishes_them():
    link = FakeDevice(16.0, 0.0, torch.device("cpu"), prefetch_depth=1)
    a, b = copy("a", Priority.NORMAL), copy("b", Priority.NORMAL)
    link.submit(a)
    link.submit(b)
    link.abort()
    assert link.order == ["a"] and isinstance(b.error, CopyCancelled) and b.done_at is not None
    other = FakeDevice(16.0, 0.0, torch.device("cpu"), prefetch_depth=1)
    c, d = copy("c", Priority.NORMAL), copy("d", Priority.NORMAL)
    other.submit(c)
    other.submit(d)
    other.close()
    assert other.order == ["c", "d"] and d.error is None and d.done_at is not None
