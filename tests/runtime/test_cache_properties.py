"""Property tests of the expert cache and the runtime that drives it (hypothesis)."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import tiny_model
from speq.frontend import from_reference
from speq.runtime.cache import ExpertCache, NoSlotError
from speq.runtime.link import Priority, VirtualLink
from speq.runtime.offload import OffloadPolicy, OffloadRuntime
from speq.runtime.store import ExpertKey, ExpertPool, ExpertStore

LAYERS, E = (0, 1, 2), 6

ops = st.lists(
    st.tuples(
        st.sampled_from(["insert", "pin", "unpin", "touch"]),
        st.sampled_from(LAYERS),
        st.integers(0, E - 1),
    ),
    max_size=80,
)


@settings(max_examples=150, deadline=None)
@given(
    ops=ops,
    slots=st.integers(3, 12),
    eviction=st.sampled_from(["lru", "lfu", "lookahead"]),
    allocation=st.sampled_from(["global", "per_layer"]),
)
def test_cache_invariants(ops, slots, eviction, allocation):
    cache = ExpertCache(
        slots,
        LAYERS,
        E,
        allocation=allocation,
        eviction=eviction,
        next_use=lambda k: (k.expert * 7 + k.layer) % 5,
    )
    pinned: dict[ExpertKey, int] = {}
    for op, layer, expert in ops:
        key = ExpertKey(layer, expert)
        entry = cache.get(key)
        if op == "insert" and entry is None:
            before = {k: e.slot for k, e in cache.entries.items()}
            try:
                cache.insert(key)
            except NoSlotError:
                # only when every slot of the group is pinned
                group = cache.group_of[layer]
                busy = [e for e in cache.entries.values() if cache.group_of[e.key.layer] == group]
                assert len(busy) == cache.group_slots[group] and all(e.pins for e in busy)
            gone = set(before) - set(cache.entries)
            assert not (gone & set(pinned)), "a pinned expert was evicted"
        elif op == "pin" and entry is not None:
            cache.pin(entry)
            pinned[key] = pinned.get(key, 0) + 1
        elif op == "unpin" and pinned.get(key):
            cache.unpin(entry)
            pinned[key] -= 1
            if not pinned[key]:
                del pinned[key]
        elif op == "touch" and entry is not None:
            cache.touch(entry)
        assert len(cache) <= slots
        for k in pinned:
            assert k in cache
        cache.check_invariants()


def _runtime(slots: int, seed: int) -> OffloadRuntime:
    spec, params = from_reference(
        tiny_model(torch.float32, num_layers=3, num_experts=E, top_k=2, seed=seed)
    )
    store = ExpertStore(spec, params)
    cache = ExpertCache(slots, store.layers, E)
    pool = ExpertPool.allocate(store, slots, "cpu")
    return OffloadRuntime(store, cache, VirtualLink(0.5, 5.0), pool, OffloadPolicy())


needs = st.lists(
    st.tuples(
        st.sampled_from(LAYERS),
        st.lists(st.integers(0, E - 1), min_size=1, max_size=6),  # routed ids of a few tokens
        st.lists(st.integers(0, E - 1), max_size=3),  # prefetch hints
        st.floats(0, 2e-4),  # compute time before the layer (s)
    ),
    min_size=1,
    max_size=25,
)


@settings(max_examples=60, deadline=None)
@given(needs=needs, slots=st.integers(2, 8))
def test_runtime_serves_every_need_with_loaded_slots(needs, slots):
    rt = _runtime(slots, 0)
    x = torch.randn(3, rt.store.w13[0].shape[2])
    for layer, ids, hints, compute in needs:
        rt.link.advance(compute)
        rt.prefetch((layer + 1) % 3, hints, Priority.NORMAL)
        ids_t = torch.tensor(ids[:3] + [ids[0]] * (3 - len(ids[:3])))[:, None].repeat(1, 2)
        res = rt.need(layer, ids_t)
        for entry in res.entries:
            # a slot is read only after its copy completed, and holds the right expert
            assert not entry.loading and entry.pins == 1
            assert torch.equal(rt.pool.w13[entry.slot], rt.store.w13[layer][entry.key.expert])
        out = rt.moe(x, ids_t, torch.full((3, 2), 0.5), res)
        assert out.shape == x.shape and torch.isfinite(out).all()
        assert all(e.pins == 0 for e in rt.cache.entries.values())
        rt.cache.check_invariants()
    c = rt.counters
    assert c.hits + c.late + c.demand_fetches == c.needs
