"""Running speq beside every baseline on the same model, prompt, budget and emulated link.

Used by ``speq demo`` and the benchmarks. The link is calibrated to a real device's
compute : transfer ratio (speq.runtime.calibrate); every policy gets the same total device
memory, and every run's tokens are compared with the all-resident greedy output.
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

import speq
from speq.runtime.calibrate import LinkCalibration, calibrate_link


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


def contenders(
    model, budget_bytes: int, link: dict, ks: tuple[int | None, ...] = (None,)
) -> list[Contender]:
    """speq at each k, and the baselines, all under ``budget_bytes`` of device memory; plus
    ``ondemand`` with speq's own (smaller) expert cache, and everything resident."""
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
    draft = speq.compile(model, dataclasses.replace(out[0].options, k=1)).draft_bytes
    same_cache = speq.CompileOptions(policy="ondemand", device_memory=budget_bytes - draft, **link)
    out.append(Contender("ondemand (speq's cache)", same_cache))
    out.append(Contender("resident (no budget)", speq.CompileOptions(policy="resident", **link)))
    return out


def compare(
    model,
    prompt: torch.Tensor,
    new_tokens: int,
    budget_fraction: float,
    *,
    ks: tuple[int | None, ...] = (None,),
    repeats: int = 1,
    reference: str = "phi-3.5-moe",
    progress: Callable[[str], Callable[[int], None]] | None = None,
) -> Comparison:
    """Generate ``new_tokens`` after ``prompt`` under each contender; ``budget_fraction`` of all
    expert bytes (beyond the non-expert weights and the KV cache) is the device budget."""
    resident = speq.compile(model)
    cal = calibrate_link(resident, prompt, reference=reference)
    link = dict(backend="cpu", link_gbps=cal.link_gbps, link_latency_us=cal.link_latency_us)
    mem = resident.memory
    budget = (
        mem.non_expert_bytes
        + mem.kv_bytes
        + int(budget_fraction * resident.store.total_expert_bytes)
    )
    expected = resident.generate(prompt, new_tokens)
    result = Comparison(cal, budget, expected)
    for c in contenders(model, budget, link, ks):
        cm = speq.compile(model, c.options)
        runs = []
        for _ in range(repeats):
            tick = progress(c.label) if progress else None
            out = cm.generate(prompt, new_tokens, callback=tick)
            runs.append((cm.metrics, torch.equal(out, expected)))
        m = runs[len(runs) // 2][0]
        result.rows.append(
            {
                "label": c.label
                if cm.governed is None
                else f"speq (governor, k*={cm.governed.spec.k})",
                "policy": c.options.policy,
                "k": c.options.k,
                "tpot_ms": statistics.median(r.tpot_ms for r, _ in runs),
                "tpot_ms_runs": [r.tpot_ms for r, _ in runs],
                "identical_to_resident": all(same for _, same in runs),
                "hit_rate": m.hit_rate,
                "cache_slots": m.cache_slots,
                "mb_moved": m.bytes_moved / 1e6,
                "stall_ms": statistics.median(r.stall_ms for r, _ in runs),
                "acceptance_rate": m.extra.get("acceptance_rate"),
                "elb_recall": m.extra.get("elb_recall"),
                "tokens_per_cycle": m.extra.get("tokens_per_cycle"),
            }
        )
    speq_tpot = min(r["tpot_ms"] for r in result.rows if r["policy"] == "speq")
    for r in result.rows:
        r["speq_speedup"] = r["tpot_ms"] / speq_tpot
    return result
