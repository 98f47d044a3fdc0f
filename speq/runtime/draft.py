"""`DraftWeights`: the draft's quantized experts, on the device while speculation uses them and in
host memory while the governor gives their bytes to the expert cache. Under shared draft memory
(``CompileOptions.draft_memory="shared"``) the device holds them in the INT4 slots of each run
(speq.runtime.draft_slots), filled from the host copy kept here."""

from __future__ import annotations

import dataclasses

import torch

from speq.ir.ops import Op
from speq.ir.program import DRAFT_PREFIX, Program
from speq.runtime.draft_slots import Int4Slots, SharedWeight
from speq.runtime.link import Copy, Priority
from speq.runtime.offload import OffloadRuntime
from speq.runtime.store import ExpertStore


class DraftWeights:
    """The weight-only quantized copies of the routed experts that the draft graph's quantized
    PARAM nodes (those with ``bits``) name, made from the host store."""

    def __init__(
        self, program: Program, store: ExpertStore, device: torch.device, shared: bool = False
    ) -> None:
        """``shared``: the INT4 experts share the experts' device memory (``params`` then name
        `SharedWeight` markers, and ``host`` holds the weights)."""
        from speq.kernels import quantize_experts  # lazily: see speq.kernels._triton
        from speq.kernels.quant import to_cpu_int4

        self.device, self.shared = device, shared
        self.params: dict[str, object] = {}  # the weights where the draft graph reads them
        self.nbytes = 0  # of every quantized expert (codes and scales)
        self.on_device = False
        self.bits = self.group_size = self.expert_int4_bytes = 0
        self.host: dict[int, dict[str, object]] = {}  # layer -> {"w13", "w2"}: shared memory's
        if "draft" not in program:
            return
        for node in program["draft"].find(Op.PARAM):
            if "bits" in node.attrs:
                name = node.attrs["name"]
                target = name.removeprefix(DRAFT_PREFIX)
                self.bits, self.group_size = node.attrs["bits"], node.attrs["group_size"]
                q = quantize_experts(store.expert_param(target), self.bits, self.group_size)
                self.nbytes += q.nbytes  # as a GPU holds it (the CPU layout is the same codes)
                if device.type == "cpu":  # torch's CPU INT4 matmul where it takes the shape
                    q = to_cpu_int4(q) or q
                if shared:
                    layer = store.layer_of(target)
                    which = "w13" if target == store.spec.expert_param(layer, "w13") else "w2"
                    self.host.setdefault(layer, {})[which] = q
                    self.params[name] = SharedWeight(layer)
                else:
                    self.params[name] = q.to(device)
        self.expert_int4_bytes = self.nbytes // max(len(store.keys()), 1)
        self.on_device = True

    def slots(self, num_slots: int, device: torch.device | None) -> Int4Slots:
        """The INT4 slots of one run under shared memory (``device`` None: bookkeeping)."""
        master = {layer: (w["w13"], w["w2"]) for layer, w in self.host.items()}
        return Int4Slots(master, num_slots, self.bits, self.group_size, device)

    @property
    def device_bytes(self) -> int:
        """Bytes the draft holds on the device now, apart from shared memory (whose INT4 slots
        the memory plan counts)."""
        return self.nbytes if self.on_device and not self.shared else 0

    def drop(self) -> None:
        """Keep the weights in host memory only (their device memory becomes cache slots)."""
        if self.on_device and self.shared:
            self.on_device = False  # the weights are in host memory already
        elif self.on_device:
            self.params = {
                k: _host(v, pin=self.device.type == "cuda") for k, v in self.params.items()
            }
            self.on_device = False

    def restore(self) -> None:
        """Bring the weights back to the device, untimed (between runs)."""
        if not self.on_device and self.shared:
            self.on_device = True
        elif not self.on_device and self.params:
            self.params = {k: v.to(self.device) for k, v in self.params.items()}
            self.on_device = True

    def upload(self, rt: OffloadRuntime, copies_weights: bool) -> None:
        """Mid-run: bring the weights back over ``rt``'s link while the compute waits (a real
        copy when the backend copies weights; else only its time and bytes, and the host
        tensors serve the compute)."""
        if self.shared:
            raise RuntimeError("a run with shared draft memory does not switch to the draft")
        host = self.params
        src: tuple[torch.Tensor, ...] = ()
        dst: tuple[torch.Tensor, ...] = ()
        device = dict(host)
        if copies_weights:
            device = {
                k: dataclasses.replace(
                    q,
                    data=torch.empty_like(q.data, device=self.device),
                    scales=torch.empty_like(q.scales, device=self.device),
                )
                for k, q in host.items()
            }
            src = tuple(t for q in host.values() for t in (q.data, q.scales))
            dst = tuple(t for q in device.values() for t in (q.data, q.scales))
        rt.upload(Copy("draft", -1, self.nbytes, Priority.DEMAND, rt.link.now(), src, dst))
        self.params = device
        self.on_device = True


def _host(q, pin: bool):
    """A quantized weight in host memory; ``pin``: page-locked, so that the mid-run upload
    (`DraftWeights.upload`) is an asynchronous copy at the link's full rate."""
    if q.device.type == "meta":  # the trace backend's weights have no data to move
        return q
    q = q.to("cpu")
    if pin:
        q = dataclasses.replace(q, data=q.data.pin_memory(), scales=q.scales.pin_memory())
    return q
