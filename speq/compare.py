"""Running speq beside every baseline on the same model, prompt, budget and emulated link.

Used by ``speq demo`` and the benchmarks (bench/bench_e2e.py). The link is calibrated to a real
device's compute : transfer ratio (`calibrate_link`); every policy gets the same total device
memory, and every run's tokens are compared with the all-resident greedy output.

Choosing an emulated link whose compute : transfer ratio matches a real device: on a real GPU,
fetching one expert over PCIe takes many times longer than computing one decode layer with
everything resident (Phi-3.5-MoE on an A100 over PCIe 4.0, by the cost model: about 22x). The
CPU computes far slower than a GPU, so an honest emulation slows the link down by the same
factor as the compute: the CPU's measured layer time over the GPU's modelled one. Then one
expert copy costs the same number of layer-times on the CPU as on the real device.

The pieces, for a caller that runs many prompts or budgets: `budget_bytes` (a fraction of the
expert bytes, beyond the non-expert weights and the KV cache), `link_options` (the compile
options of a calibrated link), `contenders` (what to compile), `run_once` and `summarize` (one
compiled contender on one prompt, repeated, as a row; `measure` does both). `compare` strings
them together for one prompt.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

import speq
from speq.frontend.capture import capture
from speq.models.spec import ModelSpec
from speq.runtime.metrics import Metrics
from speq.sim.cost import link_seconds, step_seconds
from speq.sim.presets import expert_bytes, get_preset
from speq.sim.profiles import get_profile

Progress = Callable[[str], Callable[[int], None]]


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
    nbytes = compiled.memory.expert_bytes  # as one copy moves it: in the deployment dtype
    gbps = nbytes / (copy * scale - latency) / 1e9
    return LinkCalibration(
        reference, profile, copy / gpu_layer, scale, cpu_layer * 1e3, nbytes, gbps, latency * 1e6
    )


@dataclass(frozen=True)
class Contender:
    """One row of a comparison: a label and the options it compiles with."""

    label: str
    options: speq.CompileOptions


@dataclass
class Comparison:
    calibration: LinkCalibration
    budget_bytes: int
    expected: torch.Tensor
    rows: list[dict] = field(default_factory=list)


def budget_bytes(resident: speq.CompiledModel, fraction: float) -> int:
    """The device budget that leaves ``fraction`` of all expert bytes for experts (and the draft)
    once the non-expert weights and the KV cache are in; every size counted as ``resident``'s
    memory plan counts it (its ``CompileOptions.memory_dtype``)."""
    mem = resident.memory
    experts = mem.expert_bytes * len(resident.store.keys())
    return mem.non_expert_bytes + mem.kv_bytes + int(fraction * experts)


def governed_label(cm: speq.CompiledModel, label: str = "speq (governor)") -> str:
    """How a governed speq row is named: ``label`` with the k* it chose, or that it dropped the
    draft."""
    g = cm.governed
    what = f"k*={g.spec.k}" if g.use_draft else "no draft"
    return f"{label[:-1]}, {what})" if label.endswith(")") else f"{label} ({what})"


def link_options(cal: LinkCalibration) -> dict[str, Any]:
    """CompileOptions fields for the cpu backend over the calibrated emulated link."""
    return dict(
        backend="cpu",
        link_gbps=cal.link_gbps,
        link_latency_us=cal.link_latency_us,
        profile=cal.profile,
    )


def contenders(
    model,
    budget_bytes: int,
    link: dict,
    ks: tuple[int | None, ...] = (None,),
    *,
    draft_bytes: int | None = None,
) -> list[Contender]:
    """speq at each k (the governor's also without host compute), and the baselines (the
    host-compute ones included), all under ``budget_bytes`` of device memory; plus
    ``ondemand`` with speq's own (smaller) expert cache, and everything resident.
    ``draft_bytes`` (speq's resident draft) is measured by a compile when not given."""
    out = [
        Contender(
            "speq (governor)" if k is None else f"speq k={k}",
            speq.CompileOptions(policy="speq", k=k, device_memory=budget_bytes, **link),
        )
        for k in ks
    ]
    if None in ks:
        no_host = dict(policy="speq", device_memory=budget_bytes, host_compute=False, **link)
        out.append(Contender("speq (governor, no host compute)", speq.CompileOptions(**no_host)))
    for policy in ("ondemand", "nextgate", "fiddler", "hostcompute", "oracle"):
        opts = speq.CompileOptions(policy=policy, device_memory=budget_bytes, **link)
        out.append(Contender(policy, opts))
    if draft_bytes is None:
        opts = speq.CompileOptions(policy="speq", k=1, device_memory=budget_bytes, **link)
        draft_bytes = speq.compile(model, opts).draft_bytes
    same_cache = speq.CompileOptions(
        policy="ondemand", device_memory=budget_bytes - draft_bytes, **link
    )
    out.append(Contender("ondemand (speq's cache)", same_cache))
    out.append(Contender("resident (no budget)", speq.CompileOptions(policy="resident", **link)))
    return out


def run_once(
    cm: speq.CompiledModel,
    prompt: torch.Tensor,
    expected: torch.Tensor,
    progress: Callable[[int], None] | None = None,
) -> tuple[Metrics, bool]:
    """Generate ``expected``'s new tokens after ``prompt`` with ``cm``: (its metrics, whether its
    tokens equal ``expected``). ``progress(token)`` is called after each new token."""
    out = cm.generate(prompt, expected.shape[-1] - prompt.shape[-1], callback=progress)
    return cm.metrics, torch.equal(out, expected)


def summarize(runs: list[tuple[Metrics, bool]]) -> dict[str, Any]:
    """One row from repeated runs of one contender on one prompt: the median TPOT (wall-clock ms
    per output token) and every run's, whether every run's tokens equal the expected ones, and
    the other metrics of the run with the median TPOT (speq's extra metrics are None for the
    other policies)."""
    tpots = [m.tpot_ms for m, _ in runs]
    m = sorted(runs, key=lambda r: r[0].tpot_ms)[(len(runs) - 1) // 2][0]
    extra = m.extra
    return {
        "tpot_ms": statistics.median(tpots),
        "tpot_ms_runs": tpots,
        "identical_to_resident": all(same for _, same in runs),
        "hit_rate": m.hit_rate,
        "covered_rate": m.covered_rate,
        "token_hit_rate": m.token_hit_rate,
        "stalls_per_token": m.stalls_per_token,
        "cache_slots": m.cache_slots,
        "mb_moved": m.bytes_moved / 1e6,
        "experts_moved": m.experts_moved,
        "demand_fetches": m.demand_fetches,
        "prefetches_issued": m.prefetches_issued,
        "prefetches_wasted": m.prefetches_wasted,
        "stall_ms": statistics.median(r.stall_ms for r, _ in runs),
        "host_expert_runs": extra.get("host_expert_runs"),
        "host_compute_ms": extra.get("host_compute_ms"),
        "acceptance_rate": extra.get("acceptance_rate"),
        "elb_recall": extra.get("elb_recall"),
        "elb_precision": extra.get("elb_precision"),
        "tokens_per_cycle": extra.get("tokens_per_cycle"),
        "verify_hit_rate": extra.get("verify_hit_rate"),
        "verify_covered_rate": extra.get("verify_covered_rate"),
        "k_per_cycle": extra.get("k_per_cycle"),
        "switched_to_draft_after": extra.get("switched_to_draft_after"),
    }


def measure(
    cm: speq.CompiledModel,
    prompt: torch.Tensor,
    expected: torch.Tensor,
    repeats: int = 1,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """`summarize` of ``repeats`` back-to-back `run_once` calls."""
    return summarize([run_once(cm, prompt, expected, progress) for _ in range(repeats)])


def compare(
    model,
    prompt: torch.Tensor,
    new_tokens: int,
    budget_fraction: float,
    *,
    ks: tuple[int | None, ...] = (None,),
    repeats: int = 1,
    reference: str = "phi-3.5-moe",
    progress: Progress | None = None,
    memory_dtype: torch.dtype | None = torch.bfloat16,
) -> Comparison:
    """Generate ``new_tokens`` after ``prompt`` under each contender; ``budget_fraction`` of all
    expert bytes (beyond the non-expert weights and the KV cache) is the device budget, with
    sizes counted in ``memory_dtype`` (the deployment dtype; see CompileOptions.memory_dtype)."""
    resident = speq.compile(model, speq.CompileOptions(memory_dtype=memory_dtype))
    cal = calibrate_link(resident, prompt, reference=reference)
    link = {**link_options(cal), "memory_dtype": memory_dtype}
    budget = budget_bytes(resident, budget_fraction)
    expected = resident.generate(prompt, new_tokens)
    result = Comparison(cal, budget, expected)
    for c in contenders(model, budget, link, ks):
        cm = speq.compile(model, c.options)
        tick = progress(c.label) if progress else None
        row = measure(cm, prompt, expected, repeats, tick)
        label = c.label if cm.governed is None else governed_label(cm, c.label)
        result.rows.append({"label": label, "policy": c.options.policy, "k": c.options.k, **row})
    speq_tpot = min(r["tpot_ms"] for r in result.rows if r["policy"] == "speq")
    for r in result.rows:
        r["speq_speedup"] = r["tpot_ms"] / speq_tpot
    return result
