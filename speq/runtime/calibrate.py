"""Choosing an emulated link whose compute : transfer ratio matches a real device.

On a real GPU, fetching one expert over PCIe takes many times longer than computing one decode
layer with everything resident (Phi-3.5-MoE on an A100 over PCIe 4.0, by the cost model: about
22x). The CPU computes far slower than a GPU, so an honest emulation slows the link down by the
same factor as the compute: the CPU's measured layer time over the GPU's modelled one. Then one
expert copy costs the same number of layer-times on the CPU as on the real device.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from speq.frontend.spec import ModelSpec
from speq.sim.cost import link_seconds, step_seconds
from speq.sim.presets import expert_bytes, get_preset
from speq.sim.profiles import get_profile


@dataclass(frozen=True)
class LinkCalibration:
    """An emulated link (``link_gbps``, ``link_latency_us``) on which one expert copy of this
    model takes ``ratio`` decode-layer times of this machine, as one expert of ``reference``
    does on ``profile``."""

    reference: str
    profile: str
    ratio: float  # expert copy time / resident decode time of one layer, on the reference
    time_scale: float  # CPU layer time / reference layer time
    cpu_layer_ms: float
    expert_bytes: int
    link_gbps: float
    link_latency_us: float

    def describe(self) -> str:
        return (
            f"emulated link {self.link_gbps:.4g} GB/s, {self.link_latency_us:.4g} us latency: one "
            f"expert copy takes {self.ratio:.1f} decode-layer times, as for {self.reference} on "
            f"{self.profile} (cost model); CPU decode layer {self.cpu_layer_ms:.3f} ms (measured)"
        )


def reference_times(reference: str, profile: str) -> tuple[float, float]:
    """(resident decode time of one layer, one expert copy time) in seconds, from the cost model."""
    from speq.frontend.capture import capture

    cfg, prof = get_preset(reference), get_profile(profile)
    layer = (
        step_seconds(capture(ModelSpec(cfg, torch.bfloat16)), cfg, 1, 512, prof) / cfg.num_layers
    )
    return layer, link_seconds(expert_bytes(cfg), prof)


def calibrate_link(
    compiled,
    prompt: torch.Tensor,
    tokens: int = 16,
    repeats: int = 3,
    reference: str = "phi-3.5-moe",
    profile: str = "a100-40g-pcie4",
) -> LinkCalibration:
    """Time ``compiled`` (a resident `CompiledModel`) decoding here; return the matching link."""
    gpu_layer, copy = reference_times(reference, profile)
    samples = []
    for _ in range(repeats):
        compiled.generate(prompt, tokens)
        samples.append(compiled.metrics.tpot_ms)
    cpu_layer = statistics.median(samples) * 1e-3 / compiled.config.num_layers
    scale = cpu_layer / gpu_layer
    latency = get_profile(profile).link_latency_us * 1e-6 * scale
    nbytes = compiled.store.expert_bytes
    gbps = nbytes / (copy * scale - latency) / 1e9
    return LinkCalibration(
        reference, profile, copy / gpu_layer, scale, cpu_layer * 1e3, nbytes, gbps, latency * 1e6
    )


def time_passes(
    compiled, prompt: torch.Tensor, tokens: Sequence[int] = (1, 2, 3, 5, 9, 17), repeats: int = 3
):
    """Median seconds of one draft pass and of target passes over each of ``tokens`` new tokens,
    compute only: experts are read where they are, no copies (wall clock, or the sim backend's
    virtual clock)."""
    import time

    from speq.runtime.speculative import SpecPolicy, Speq

    session = compiled._session(Speq(SpecPolicy(k=1)), virtual=True)
    cache = compiled.kv_cache()
    p = int(prompt.shape[-1])
    ids = prompt.reshape(-1)
    compiled._step("step", ids, cache, 0, session)
    clock = session.link.now if compiled.options.backend == "sim" else time.perf_counter

    def timed(graph: str, t: int) -> float:
        samples = []
        for _ in range(repeats):
            x = ids[:t] if t <= p else ids.repeat(t // p + 1)[:t]
            t0 = clock()
            compiled._step(graph, x, cache, p, session)
            samples.append(clock() - t0)
            cache.truncate(p)
        return statistics.median(samples)

    draft = timed("draft", 1) if "draft" in compiled.program else 0.0
    verify = {t: timed("step", t) for t in tokens}
    session.finish("calibrate", 0, 0)
    return draft, verify
