"""Running speq beside every baseline on the same model, prompt, budget and emulated link.

Used by ``speq demo`` and the benchmarks (bench/bench_e2e.py). The link is calibrated to a real
device's compute : transfer ratio (speq.runtime.calibrate); every policy gets the same total
device memory, and every run's tokens are compared with the all-resident greedy output.

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
from speq.runtime.calibrate import LinkCalibration, calibrate_link
from speq.runtime.metrics import Metrics

Progress = Callable[[str], Callable[[int], None]]


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


def governed_label(cm: speq.CompiledModel) -> str:
    """How a governed speq row is named: the k* it chose, or that it dropped the draft."""
    g = cm.governed
    return f"speq (governor, k*={g.spec.k})" if g.use_draft else "speq (governor: no draft)"


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
    """speq at each k, and the baselines, all under ``budget_bytes`` of device memory; plus
    ``ondemand`` with speq's own (smaller) expert cache, and everything resident.
    ``draft_bytes`` (speq's resident draft) is measured by a compile when not given."""
    out = [
        Contender(
            "speq (governor)" if k is None else f"speq k={k}",
            speq.CompileOptions(policy="speq", k=k, device_memory=budget_bytes, **link),
        )
        for k in ks
    ]
    for policy in ("ondemand", "nextgate", "oracle"):
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
        label = c.label if cm.governed is None else governed_label(cm)
        result.rows.append({"label": label, "policy": c.options.policy, "k": c.options.k, **row})
    speq_tpot = min(r["tpot_ms"] for r in result.rows if r["policy"] == "speq")
    for r in result.rows:
        r["speq_speedup"] = r["tpot_ms"] / speq_tpot
    return result
