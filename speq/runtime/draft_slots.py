"""`Int4Slots`: the draft's INT4 experts under ``CompileOptions.draft_memory="shared"``.

Each expert is held on the device once, at the precision it is needed in: at full precision while
the expert cache holds it, in one of these INT4 slots otherwise. A run starts from a cache filled
at load (`speq.runtime.store.place_evenly`) and every other expert's INT4 codes copied from the
draft's host copy (not timed: part of loading the model). When the cache evicts a
full-precision expert it is *demoted*: quantized on the device, with the draft's function and
group size, into a free INT4 slot (round-to-nearest of the same weights: the codes the draft's
host copy holds); when an expert's full-precision copy lands, its INT4 slot is freed. An expert
whose copy is in flight keeps its INT4 slot until then, so every expert is readable at one
precision at every moment. There are as many slots as experts the cache does not hold, plus
`speq.runtime.budget.SPARE_INT4_SLOTS` (one) for the victim of a copy still in flight: an
eviction that finds none free waits for the oldest copy in flight (`OffloadRuntime._fetch`),
and a prefetch that would need one is not issued (a later hook issues it).

The draft's FUSED_MOE reads each routed expert at the precision resident (`draft_moe`): on the
CPU one grouped pass over the pairs that takes each expert's weights from the cache's pool if it
is loaded at full precision, else from its INT4 slot; on a GPU one fused launch per precision
(`fused_moe_by_precision`). The host makes that choice, so the compiler keeps this FUSED_MOE
out of replay regions (speq.passes.make_draft marks the experts ``shared``), and a copy into a
demoted expert's slot waits for the quantization that read it (`Link.released`). Without a
device pool (the sim backend, whose compute reads the host store) the slots are bookkeeping:
the full-precision experts are read from the host store, the INT4 ones from the draft's host
copy, which a demotion reproduces bit for bit.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from speq.kernels.activation import SWIGLU, Activation
from speq.kernels.fused_moe import MoEDims, fused_moe
from speq.kernels.moe_cpu import grouped_by_source
from speq.kernels.quant import CpuInt4Experts, QuantizedExperts, quantize_experts, to_cpu_int4
from speq.runtime.budget import int4_slots_needed
from speq.runtime.store import ExpertKey
from speq.sim.cost import NodeCost, node_seconds

if TYPE_CHECKING:
    from speq.runtime.engine import Engine
    from speq.runtime.offload import OffloadRuntime

Int4 = QuantizedExperts | CpuInt4Experts
ONE_PASS_DEVICES = ("cpu",)  # where the draft's MoE reads both precisions in one grouped pass


@dataclass(frozen=True)
class SharedWeight:
    """What a draft expert weight's PARAM yields under shared memory: the draft's FUSED_MOE
    reads ``layer``'s experts through the run's `Int4Slots` (`draft_moe`)."""

    layer: int


class Int4Slots:
    """The INT4 slots of one run (see the module docstring). ``master``: layer -> the draft's
    ``(w13, w2)`` INT4 experts ``[E, ...]`` in host memory; ``bits`` and ``group_size``: the
    draft's quantization; ``device``: where the slots live, None for bookkeeping only."""

    def __init__(
        self,
        master: Mapping[int, tuple[Int4, Int4]],
        num_slots: int,
        bits: int,
        group_size: int,
        device: torch.device | None,
    ) -> None:
        self.master, self.num_slots = master, num_slots
        self.bits, self.group_size = bits, group_size
        w13, w2 = next(iter(master.values()))
        self.num_experts = w13.shape[0]
        self.w13 = None if device is None else _empty_slots(w13, num_slots, device)
        self.w2 = None if device is None else _empty_slots(w2, num_slots, device)
        table_device = "cpu" if device is None else device
        self.tables = {
            layer: torch.full((self.num_experts,), -1, dtype=torch.int32, device=table_device)
            for layer in master
        }
        self.slot: dict[ExpertKey, int] = {}
        self._free: list[int] = []

    # ------------------------------------------------------------------ residency
    def reset(self, full: Collection[ExpertKey]) -> None:
        """The state a run starts from: every expert not in ``full`` (those the cache holds at
        full precision) in a slot of its own, its codes copied from the host copy."""
        self.slot.clear()
        self._free = list(reversed(range(self.num_slots)))
        for table in self.tables.values():
            table.fill_(-1)
        for layer in self.master:
            for e in range(self.num_experts):
                key = ExpertKey(layer, e)
                if key not in full:
                    slot = self._take(key)
                    if self.w13 is not None:
                        w13, w2 = self.master[layer]
                        _write(self.w13, slot, w13, e)
                        _write(self.w2, slot, w2, e)

    def has_room(self) -> bool:
        return bool(self._free)

    def _take(self, key: ExpertKey) -> int:
        if not self._free:
            raise RuntimeError(f"no free INT4 slot for {key}: all {self.num_slots} in use")
        slot = self._free.pop()
        self.slot[key] = slot
        self.tables[key.layer][key.expert] = slot
        return slot

    def demote(self, key: ExpertKey, w13: torch.Tensor | None, w2: torch.Tensor | None) -> None:
        """``key``'s full-precision weights ``w13 [2I, H]`` and ``w2 [H, I]`` (None: no pool,
        bookkeeping only), about to be overwritten, quantized into a free slot."""
        if key in self.slot:
            raise RuntimeError(f"{key} is demoted but already has an INT4 slot")
        slot = self._take(key)
        if self.w13 is not None and w13 is not None and w2 is not None:
            _write(self.w13, slot, self._quantize(w13, self.w13), 0)
            _write(self.w2, slot, self._quantize(w2, self.w2), 0)

    def _quantize(self, w: torch.Tensor, like: Int4) -> Int4:
        """``w`` as one slot in ``like``'s layout: the draft's quantization (speq.kernels.quant),
        then torch's CPU INT4 layout where the draft uses it."""
        q = quantize_experts(w.unsqueeze(0), self.bits, self.group_size)
        if isinstance(like, CpuInt4Experts):
            cpu = to_cpu_int4(q)
            assert cpu is not None, "the draft took the CPU INT4 layout for this shape"
            return cpu
        return q

    def release(self, key: ExpertKey) -> None:
        """``key`` is loaded at full precision: its INT4 slot is free."""
        slot = self.slot.pop(key, None)
        if slot is not None:
            self._free.append(slot)
            self.tables[key.layer][key.expert] = -1

    def attach(self, rt: OffloadRuntime, demote_s: float) -> None:
        """Serve ``rt``'s run: start from what its cache holds now, and demote each expert its
        cache evicts (``demote_s``: what one demotion costs on a modelled clock; the wall clock
        measures the quantization itself)."""
        rt.int4 = self
        self.reset(rt.cache.entries)

        def demote(entry) -> None:
            pool = rt.pool
            self.demote(entry.key, *((None, None) if pool is None else pool.slot(entry.slot)))
            rt.link.released([entry.slot])  # a copy into the slot waits for the quantization
            rt.counters.demotions += 1
            rt.link.advance(demote_s)

        rt.cache.on_evict = demote

    def check(self, loaded: Collection[ExpertKey]) -> None:
        """Every expert is readable at one precision: in an INT4 slot unless ``loaded`` (held
        at full precision, its copy landed); the tables match the slots."""
        for layer in self.master:
            for e in range(self.num_experts):
                key = ExpertKey(layer, e)
                assert key in self.slot or key in loaded, f"{key} is resident at no precision"
                assert int(self.tables[layer][e]) == self.slot.get(key, -1), key
        assert len(self.slot) + len(self._free) == self.num_slots


def _empty_slots(like: Int4, slots: int, device: torch.device) -> Int4:
    """``slots`` uninitialised slots in ``like``'s layout (no allocation in the decode loop)."""
    data = torch.empty((slots, *like.data.shape[1:]), dtype=like.data.dtype, device=device)
    scales = torch.empty((slots, *like.scales.shape[1:]), dtype=like.scales.dtype, device=device)
    return dataclasses.replace(like, data=data, scales=scales, shape=(slots, *like.shape[1:]))


def _write(slots: Int4, slot: int, src: Int4, index: int) -> None:
    slots.data[slot].copy_(src.data[index])
    slots.scales[slot].copy_(src.scales[index])


def draft_split(rt: OffloadRuntime, layer: int, ids: torch.Tensor) -> tuple[list[int], set[int]]:
    """The experts the draft routes ``ids`` to at ``layer``, and those of them loaded at full
    precision now; ``rt.draft_split`` keeps how many of each (the modelled node time)."""
    rt.settle()
    experts = sorted(set(ids.reshape(-1).tolist()))  # host sync: the draft's routing
    loaded = {
        e
        for e in experts
        if (entry := rt.cache.get(ExpertKey(layer, e))) is not None and not entry.loading
    }
    rt.draft_split = (len(loaded), len(experts) - len(loaded))
    return experts, loaded


def draft_moe(
    rt: OffloadRuntime,
    layer: int,
    x: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    b13: torch.Tensor | None = None,
    b2: torch.Tensor | None = None,
    activation: Activation = SWIGLU,
) -> torch.Tensor:
    """The draft's routed experts of ``layer`` under shared memory: the experts loaded at full
    precision from the cache's pool (the host store without one), the rest from their INT4
    slots (the draft's host copy without a pool). On the CPU one grouped pass over the pairs;
    elsewhere one fused launch per precision (`fused_moe_by_precision`). ``rt.draft_split``
    keeps how many of each it read (the sim backend's node time)."""
    int4 = rt.int4
    assert int4 is not None
    experts, loaded = draft_split(rt, layer, ids)
    if rt.pool is not None and x.device.type not in ONE_PASS_DEVICES:
        pools = ((rt.pool.w13, rt.pool.w2, rt.cache.slot_tables[layer]), (int4.w13, int4.w2))
        extras = dict(b13=b13, b2=b2, activation=activation)
        split = (loaded, set(experts) - loaded)
        return fused_moe_by_precision(x, ids, weights, split, *pools, int4.tables[layer], **extras)
    if rt.pool is None:
        identity = list(range(int4.num_experts))
        full = (*rt.store.stacked(layer), identity)
        quant = (*int4.master[layer], identity)
    else:
        full = (rt.pool.w13, rt.pool.w2, rt.cache.slot_tables[layer].tolist())
        quant = (int4.w13, int4.w2, int4.tables[layer].tolist())

    def source(e: int):
        w13, w2, slots = full if e in loaded else quant
        return w13, w2, slots[e]

    num_tokens, hidden = x.shape
    intermediate = full[0].shape[1] // 2
    # two pools, so no one slot count (MoEDims.num_slots: 0); source(e) gives each slot
    dims = MoEDims(num_tokens, hidden, intermediate, int4.num_experts, ids.shape[1], 0)
    return grouped_by_source(x, ids, weights, source, dims, (b13, b2), activation)


def fused_moe_by_precision(
    x: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    split: tuple[Collection[int], Collection[int]],
    full: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    quant: tuple[Int4, Int4],
    int4_slots: torch.Tensor,
    **extras,
) -> torch.Tensor:
    """The shared draft's MoE as two launches of the fused kernel (the GPU's way: its Triton
    kernel reads one pool per launch): ``split``, the routed experts held at full precision
    and the rest; the first read from ``full`` (``w13, w2, slot_of_expert``), the rest from
    ``quant`` at ``int4_slots``. Each launch's pairs of the other precision are routed to one of
    its own experts with weight 0: at decode sizes they fill rows of a block that expert's
    weights are read for anyway."""
    out = torch.zeros_like(x)
    for part, (w13, w2, slots) in zip(split, (full, (*quant, int4_slots))):
        if not part:
            continue
        chosen = torch.tensor(sorted(part), dtype=ids.dtype, device=ids.device)
        inside = torch.isin(ids, chosen)
        part_ids = torch.where(inside, ids, chosen[0]).to(torch.int32)
        out += fused_moe(x, w13, w2, part_ids, weights * inside, slots, **extras)
    return out


def share_draft_memory(engine: Engine, rt: OffloadRuntime, slots: int) -> None:
    """Attach INT4 slots to a drafting run of ``engine`` whose cache (``slots`` slots) was
    filled at load: the engine's own where the run copies into its pool, else bookkeeping
    whose demotions cost `demote_seconds` on the modelled clock."""
    if rt.pool is not None and engine.int4 is not None:
        engine.int4.attach(rt, 0.0)  # the wall clock times the quantization itself
        return
    needed = int4_slots_needed(len(engine.store.keys()), slots)
    engine.draft.slots(needed, None).attach(rt, demote_seconds(engine))


def demote_seconds(engine: Engine) -> float:
    """One demotion on the profile's device: read a full-precision expert, write its INT4 codes
    and scales (a few operations an element), at the roofline of `speq.sim.cost`."""
    full = engine.memory.expert_bytes
    elements = full // engine.deployment_dtype.itemsize
    cost = NodeCost(4.0 * elements, full + engine.draft.expert_int4_bytes)
    return node_seconds(cost, engine.profile)
