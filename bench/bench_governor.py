"""The governor against a sweep of fixed k, on the cpu backend with a calibrated emulated link.

For each k in 1..16 (the governor's range), speq decodes the same prompt under the same device
budget (counted as the bf16 model would use it) and TPOT is measured (wall clock); the governor
(CompileOptions(k=None)) calibrates, predicts TPOT for every k with the Amortization Roofline cost
model, picks k* (and whether the draft earns its memory at all), and its own run is measured too.
Its first generate recalibrates on the prompt: short virtual-clock probes (32 tokens) estimate the
acceptance per position, the routing locality and the cache reuse. Reported: measured and
predicted TPOT per k, the prediction error, the chosen k* and how far its measured TPOT is from
the best swept one. The probes' estimates differ from what a full run sees; the runtime governor
replaces them with moving averages as it decodes. So the model is also evaluated on each run's
own measured inputs: that error is the cost model's own. Writes bench/results/governor_cpu.json.

    python bench/bench_governor.py [--tokens 96] [--budget 0.5] [--model demo|random]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from common import RESULTS, environment, table, write_json
from tqdm import tqdm

import speq
from speq.compare import calibrate_link
from speq.cost import K_MAX, CacheModel, estimate
from speq.models.demo import demo_model, random_demo_model


def load(name: str):
    if name == "demo":
        model, tok = demo_model(dtype=torch.float64)
        prompt = torch.tensor([tok.encode("And it came to pass, when the king of Israel heard")])
        return model, prompt, "the shipped demo MoE, float64"
    model = random_demo_model(0).to(torch.float64)
    prompt = torch.randint(
        0, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(1)
    )
    return model, prompt, "the random demo-shape MoE, float64"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--tokens", type=int, default=96)
    p.add_argument("--budget", type=float, default=0.5, help="fraction of all expert bytes")
    p.add_argument("--model", choices=["demo", "random"], default="demo")
    p.add_argument("--out", default=str(RESULTS / "governor_cpu.json"))
    args = p.parse_args(argv)

    model, prompt, what = load(args.model)
    counted = dict(memory_dtype=torch.bfloat16)  # the budget as the bf16 model would use it
    resident = speq.compile(model, speq.CompileOptions(**counted))
    cal = calibrate_link(resident, prompt)
    mem = resident.memory
    experts = mem.expert_bytes * len(resident.store.keys())
    budget = mem.non_expert_bytes + mem.kv_bytes + int(args.budget * experts)
    link = dict(
        backend="cpu",
        device_memory=budget,
        link_gbps=cal.link_gbps,
        link_latency_us=cal.link_latency_us,
        **counted,
    )
    expected = resident.generate(prompt, args.tokens)

    governed = speq.compile(model, speq.CompileOptions(policy="speq", **link))
    at_compile = governed.governed.describe()  # from the fixed random probe prompt
    governed_out = governed.generate(prompt, args.tokens)  # recalibrates on this prompt first
    gm = governed.metrics
    policy = governed.governed
    predicted = {e.k: e.tpot_ms for e in policy.estimates}
    rows = []
    for k in tqdm(range(1, K_MAX + 1), desc="sweep k", file=sys.stderr):
        cm = speq.compile(model, speq.CompileOptions(policy="speq", k=k, **link))
        out = cm.generate(prompt, args.tokens)
        m = cm.metrics
        # the same model fed with what this run measured (acceptance per position, routing
        # locality, cache reuse): its error is the cost model's own, apart from the
        # calibration's estimates of its inputs
        cycles = max(m["cycles"], 1)
        needs = m["verify_needs"] / cycles
        window = 1 + sum(m["k_per_cycle"]) / cycles
        cache = CacheModel.observed(
            model.config, policy.cache.slots, needs, needs * m["verify_new_rate"], window
        )
        fed = estimate(
            k,
            model.config,
            policy.hardware,
            m["acceptance_by_position"],
            cache,
            policy.spec.phase2_start,
        ).tpot_ms
        rows.append(
            {
                "k": k,
                "measured_tpot_ms": m.tpot_ms,
                "predicted_tpot_ms": predicted[k],
                "error": predicted[k] / m.tpot_ms - 1,
                "model_tpot_ms": fed,
                "model_error": fed / m.tpot_ms - 1,
                "acceptance": m["acceptance_rate"],
                "hit_rate": m.hit_rate,
                "new_rate": m["verify_new_rate"],
                "predicted_new_rate": policy.cache.new_experts(model.config, k)
                / policy.cache.window(model.config, k),
                "identical_to_resident": bool(torch.equal(out, expected)),
            }
        )
    best = min(rows, key=lambda r: r["measured_tpot_ms"])
    report = {
        "setting": {
            "model": what,
            "backend": "cpu, emulated link, wall clock",
            "link_description": cal.describe(),
            "device_budget_bytes": budget,
            "budget_fraction_of_expert_bytes": args.budget,
            "new_tokens": args.tokens,
            "governor": policy.describe(),
            "governor_at_compile": at_compile,
            "budget_counted_as": "bfloat16 (CompileOptions.memory_dtype)",
            "environment": environment(),
        },
        "sweep": rows,
        "governed": {
            "initial_k": policy.spec.k,
            "uses_draft": policy.use_draft,
            "k_per_cycle": gm.extra.get("k_per_cycle", []),
            "measured_tpot_ms": gm.tpot_ms,
            "identical_to_resident": bool(torch.equal(governed_out, expected)),
        },
        "best_swept": {"k": best["k"], "tpot_ms": best["measured_tpot_ms"]},
        "governed_over_best": gm.tpot_ms / best["measured_tpot_ms"],
        "max_abs_prediction_error": max(abs(r["error"]) for r in rows),
        "max_abs_model_error": max(abs(r["model_error"]) for r in rows),
    }
    path = write_json(Path(args.out), report)
    print(f"{what}; {cal.describe()}")
    print(f"governor: {policy.describe()}")
    print(
        table(
            rows,
            {
                "k": "k",
                "measured_tpot_ms": "measured TPOT (ms)",
                "predicted_tpot_ms": "predicted TPOT (ms)",
                "error": "prediction error",
                "model_tpot_ms": "model on measured inputs (ms)",
                "model_error": "model error",
                "acceptance": "acceptance",
                "hit_rate": "hit rate",
                "new_rate": "copied in cycle / needed",
                "predicted_new_rate": "predicted",
                "identical_to_resident": "same tokens",
            },
        )
    )
    print(
        f"governed run (k starts at {policy.spec.k}, re-chosen per cycle): {gm.tpot_ms:.1f} ms/token, "
        f"{report['governed_over_best']:.2f}x the best swept TPOT ({best['measured_tpot_ms']:.1f} ms at k={best['k']})"
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
