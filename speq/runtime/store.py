"""`ExpertStore`: the routed experts' weights in host memory, and the weights that stay resident."""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from speq.models.spec import ModelSpec
from speq.models.weights import ExpertStack, expert_copy_pairs, stacked


@dataclass(frozen=True)
class ExpertKey:
    layer: int
    expert: int

    def __str__(self) -> str:
        return f"L{self.layer}.E{self.expert}"


class ExpertStore:
    """Host-side expert weights: per MoE layer ``w13 [E, 2I, H]`` and ``w2 [E, H, I]``.

    Takes the stacked tensors out of a model's weights without copying them. With ``pin`` (the
    cuda backend) they are page-locked, so host → device copies are asynchronous: in place where
    the memory allows it (`pin_in_place`), so the store does not double the host memory. A layer may be an
    `ExpertStack` (a per-expert checkpoint, memory-mapped): ``w13[layer][e]`` then reads one
    expert, and only `stacked` (the sim backend's compute) builds a layer's whole tensor (the
    draft quantizes one expert at a time). Everything else (``resident``) always lives on
    the device.
    """

    def __init__(
        self, spec: ModelSpec, params: Mapping[str, torch.Tensor], pin: bool = False
    ) -> None:
        self.spec = spec
        cfg = spec.config
        self.layers = cfg.moe_layers
        # expert weight name -> (layer, "w13" | "w2"): O(1) lookups in the run loop
        self._names = {spec.expert_param(i, w): (i, w) for i in self.layers for w in ("w13", "w2")}
        missing = sorted(set(self._names) - set(params))
        if missing:
            raise ValueError(f"expert weights missing from the model: {missing}")
        self.w13: dict[int, torch.Tensor | ExpertStack] = {}
        self.w2: dict[int, torch.Tensor | ExpertStack] = {}
        registered: list[torch.Tensor] = []
        for i in self.layers:
            w13, w2 = params[spec.expert_param(i, "w13")], params[spec.expert_param(i, "w2")]
            self.w13[i] = pin_in_place(stacked(w13), registered) if pin else w13
            self.w2[i] = pin_in_place(stacked(w2), registered) if pin else w2
        if registered:  # unregistered when the store goes (the finalizer keeps them until then)
            weakref.finalize(self, _unregister, registered)
        self.resident = {k: v for k, v in params.items() if k not in self._names}
        self._stacked: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def stacked(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A layer's ``w13`` and ``w2`` as whole tensors (built once from an `ExpertStack`)."""
        if layer not in self._stacked:
            self._stacked[layer] = (stacked(self.w13[layer]), stacked(self.w2[layer]))
        return self._stacked[layer]

    def copy_pairs(
        self, key: ExpertKey, w13: torch.Tensor, w2: torch.Tensor
    ) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
        """The sources and destinations that copy expert ``key`` into the slot tensors ``w13 [2I,
        H]`` and ``w2 [H, I]``: one pair per stored part (a per-expert checkpoint's gate and up go
        straight into their halves of ``w13``, with no temporary)."""
        pairs = expert_copy_pairs(self.w13[key.layer], key.expert, w13)
        pairs += expert_copy_pairs(self.w2[key.layer], key.expert, w2)
        return tuple(s for s, _ in pairs), tuple(d for _, d in pairs)

    def fill_slot(self, key: ExpertKey, w13: torch.Tensor, w2: torch.Tensor) -> None:
        """Copy expert ``key`` into the slot tensors ``w13 [2I, H]`` and ``w2 [H, I]`` now
        (before a run; a run's copies go over the link)."""
        for src, dst in zip(*self.copy_pairs(key, w13, w2)):
            dst.copy_(src)

    def expert_param(self, name: str) -> torch.Tensor | ExpertStack:
        """The host weight of an expert weight name (``layers.{i}.mlp.w13`` / ``w2``) as stored:
        a ``[E, rows, cols]`` tensor or an `ExpertStack` (indexable by expert, not stacked)."""
        if name not in self._names:
            raise KeyError(f"{name} is not a routed expert weight")
        layer, which = self._names[name]
        return (self.w13 if which == "w13" else self.w2)[layer]

    def layer_of(self, name: str) -> int:
        """The MoE layer of an expert weight name."""
        if name not in self._names:
            raise KeyError(f"{name} is not a routed expert weight")
        return self._names[name][0]

    def is_expert_param(self, name: str) -> bool:
        return name in self._names

    @property
    def num_experts(self) -> int:
        return self.spec.config.num_experts

    @property
    def expert_bytes(self) -> int:
        """Bytes of one routed expert (gate, up and down projections)."""
        i = self.layers[0]
        return sum(t[0].numel() * t.element_size() for t in (self.w13[i], self.w2[i]))

    @property
    def expert_flops(self) -> int:
        """Flops of one routed expert on one token: 2 * (2I * H + H * I)."""
        w13 = self.w13[self.layers[0]]
        return 3 * w13.shape[1] * w13.shape[2]

    @property
    def total_expert_bytes(self) -> int:
        return self.expert_bytes * self.num_experts * len(self.layers)

    @property
    def resident_bytes(self) -> int:
        seen: set[int] = set()
        total = 0
        for t in self.resident.values():
            if t.is_meta or t.data_ptr() not in seen:  # tied weights count once (meta: no ties)
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
        return total

    def keys(self) -> list[ExpertKey]:
        return [ExpertKey(i, e) for i in self.layers for e in range(self.num_experts)]


@dataclass(frozen=True)
class ExpertPool:
    """Device slot tensors: slot s holds one expert's ``w13 [2I, H]`` and ``w2 [H, I]``."""

    w13: torch.Tensor  # [slots, 2I, H]
    w2: torch.Tensor  # [slots, H, I]

    def slot(self, s: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Slot ``s``'s ``w13`` and ``w2``."""
        return self.w13[s], self.w2[s]

    @classmethod
    def allocate(cls, store: ExpertStore, slots: int, device: torch.device | str) -> ExpertPool:
        i = store.layers[0]
        w13, w2 = store.w13[i], store.w2[i]
        return cls(
            torch.empty((slots, *w13.shape[1:]), dtype=w13.dtype, device=device),
            torch.empty((slots, *w2.shape[1:]), dtype=w2.dtype, device=device),
        )


def preload_all(store: ExpertStore, cache, pool) -> None:
    """Every expert resident in ``cache``, in a fixed slot order, copied into ``pool``'s slots
    (None: nothing to copy, as for a virtual session or a pool already filled)."""
    for slot, key in enumerate(store.keys()):
        entry = cache.insert(key)
        assert entry.slot == slot, "resident slots are assigned in order"
        if pool is not None:
            store.fill_slot(key, pool.w13[slot], pool.w2[slot])


def place_evenly(store: ExpertStore, cache, pool) -> None:
    """Fill every free slot of ``cache`` (a `speq.runtime.cache.ExpertCache`) before a run (not
    timed: part of loading the model) with an equal share of each layer's experts, lowest ids
    first, copying them into ``pool``'s slots (None: nothing to copy). Fiddler places the most
    popular experts, measured offline on a calibration set; no such profile exists here."""
    held = [0] * len(cache.group_slots)
    for k in cache.entries:
        held[cache.group_of[k.layer]] += 1
    for key in (ExpertKey(layer, e) for e in range(store.num_experts) for layer in store.layers):
        g = cache.group_of[key.layer]
        if held[g] >= cache.group_slots[g] or key in cache:
            continue
        held[g] += 1
        entry = cache.insert(key)
        if pool is not None:
            store.fill_slot(key, pool.w13[entry.slot], pool.w2[entry.slot])


def pin_in_place(t: torch.Tensor, registered: list[torch.Tensor]) -> torch.Tensor:
    """``t`` in page-locked host memory: registered with CUDA in place (``cudaHostRegister``;
    appended to ``registered``) when it is a contiguous tensor of its own memory, else (a view,
    or memory CUDA refuses, such as a read-only file mapping) a pinned copy."""
    if t.is_pinned():
        return t
    storage = t.untyped_storage()
    whole = t.is_contiguous() and t.storage_offset() == 0 and storage.nbytes() == t.nbytes
    if whole and t.nbytes > 0:
        cudart = torch.cuda.cudart()
        if int(cudart.cudaHostRegister(t.data_ptr(), t.nbytes, 0)) == 0:
            registered.append(t)
            return t
        torch.cuda.synchronize()  # clears the error the refused registration left
    return t.pin_memory()


def _unregister(tensors: list[torch.Tensor]) -> None:
    cudart = torch.cuda.cudart()
    for t in tensors:
        cudart.cudaHostUnregister(t.data_ptr())
