"""Does the trace-driven simulator predict real execution? Writes bench/results/sim_validate_cpu.json
and prints a table.

On the shipped demo model (float64 compute, every size counted in bfloat16), for every policy at
two budgets (tight and medium: 0.375 and 0.5 of all expert bytes), each round:

1. runs the policy on the ``cpu`` backend (real compute, copies over the emulated link at the
   rate that reproduces Phi-3.5-MoE's expert-copy : layer-compute ratio on an A100 over PCIe 4.0)
   and records its routing trace (speq.simulate.record_trace): every pass's routing, the
   acceptance of every verified draft, and the node times measured on this machine;
2. simulates the same configuration on the ``trace`` backend from that trace, with the measured
   node times as its hardware profile and the same link on a virtual clock (a governed run with
   the run's own calibration, so the governor decides from what it measured).

It reports the simulated TPOT against the measured one (the error, median and spread over the
rounds; the goal is within 15%), and whether the hit rate, the covered rate (hits and late
prefetches) and the bytes moved are equal, with the largest gap. Policies whose copy decisions
do not depend on when copies complete (resident, ondemand, oracle) move exactly the same
experts; nextgate issues a prefetch only when a slot is free of copies in flight, and speq (its
shared draft memory keeps one spare INT4 slot, so one copy whose victim it demotes is in flight
at a time) may hold a prefetch back while a copy is in flight: their decisions can follow the
link's timing, which a simulation reproduces only on average. Whether a
prefetched expert is loaded in time (a hit) or still copying (late) is decided by microseconds
on the real link, so the hit rate of prefetching policies may differ by a few points where the
covered rate does not. About 8 minutes here.

    python bench/bench_sim_validate.py [--rounds 3] [--tokens 48] [--prompt kjv-0]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    FORMAT,
    RESULTS,
    bench_model,
    environment,
    git_state,
    interleaved,
    load_prompts,
    markdown_table,
    spread,
    write_json,
)

import speq
from speq.compare import budget_bytes, calibrate_link, link_options
from speq.simulate import record_trace, simulated_model

BUDGETS = {"tight": 0.375, "medium": 0.5}
CONTENDERS = {  # label: (policy, k)
    "resident": ("resident", None),
    "ondemand": ("ondemand", None),
    "nextgate": ("nextgate", None),
    "oracle": ("oracle", None),
    "speq k=3": ("speq", 3),
    "speq (governor)": ("speq", None),
}
GOAL_ERROR = 0.15  # |simulated / measured TPOT - 1|


def measure(model, options: speq.CompileOptions, prompt: torch.Tensor, n: int) -> dict[str, Any]:
    """One real run and its simulation from the trace it recorded."""
    cm = speq.compile(model, options)
    trace = record_trace(cm, prompt, n)
    real = cm.metrics
    sim_options = dataclasses.replace(options, dtype=model.embed.dtype)
    sm = simulated_model(model.config, trace, sim_options, True, cm.calibration)
    sm.generate(torch.zeros(trace.prompt_len, dtype=torch.int64), n)
    sim = sm.metrics
    return dict(
        real_tpot_ms=real.tpot_ms,
        sim_tpot_ms=sim.tpot_ms,
        error=sim.tpot_ms / real.tpot_ms - 1,
        hit_rate=(real.hit_rate, sim.hit_rate),
        covered_rate=(real.covered_rate, sim.covered_rate),
        bytes_moved=(real.bytes_moved, sim.bytes_moved),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=48, help="new tokens per run")
    parser.add_argument("--prompt", default="kjv-0", help="a held-out prompt id")
    parser.add_argument("--model", default=None, help="a checkpoint folder (default: the demo)")
    parser.add_argument("--policies", nargs="+", choices=list(CONTENDERS), default=list(CONTENDERS))
    parser.add_argument("--budgets", nargs="+", choices=list(BUDGETS), default=list(BUDGETS))
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    model, tok, described = bench_model(args.model)
    (p,) = load_prompts([args.prompt])
    prompt = torch.tensor(tok.encode(p["text"]))
    resident = speq.compile(model, speq.CompileOptions(memory_dtype=torch.bfloat16))
    cal = calibrate_link(resident, prompt)
    link = {**link_options(cal), "memory_dtype": torch.bfloat16}
    settings = [(b, c) for b in args.budgets for c in args.policies]
    rows: dict[tuple[str, str], list[dict]] = {s: [] for s in settings}
    bar = tqdm(total=args.rounds * len(settings), desc="record + simulate", unit="run")

    def run(_r: int, setting: tuple[str, str]) -> dict:
        budget, label = setting
        policy, k = CONTENDERS[label]
        fraction = None if policy == "resident" else budget_bytes(resident, BUDGETS[budget])
        options = speq.CompileOptions(policy=policy, k=k, device_memory=fraction, **link)
        out = measure(model, options, prompt, args.tokens)
        bar.update()
        return out

    for rnd in interleaved(args.rounds, settings, run):
        for s, r in rnd.items():
            rows[s].append(r)
    bar.close()

    results = []
    for (budget, label), runs in rows.items():
        results.append(
            dict(
                budget=budget,
                budget_fraction=BUDGETS[budget],
                contender=label,
                real_tpot_ms=spread([r["real_tpot_ms"] for r in runs]),
                sim_tpot_ms=spread([r["sim_tpot_ms"] for r in runs]),
                error=spread([r["error"] for r in runs]),
                within_goal=all(abs(r["error"]) <= GOAL_ERROR for r in runs),
                same_hit_rate=all(r["hit_rate"][0] == r["hit_rate"][1] for r in runs),
                same_covered_rate=all(r["covered_rate"][0] == r["covered_rate"][1] for r in runs),
                same_bytes=all(r["bytes_moved"][0] == r["bytes_moved"][1] for r in runs),
                runs=runs,
            )
        )
    report = dict(
        format=FORMAT,
        benchmark="bench_sim_validate",
        code=git_state(),
        environment=environment(),
        model=described,
        prompt=args.prompt,
        new_tokens=args.tokens,
        rounds=args.rounds,
        link=dict(gbps=cal.link_gbps, latency_us=cal.link_latency_us, profile=cal.profile),
        goal_error=GOAL_ERROR,
        rows=results,
    )
    path = write_json(args.out / "sim_validate_cpu.json", report)
    print(results_table(report))
    print(f"wrote {path}")
    return 0


def results_table(report: dict) -> str:
    def pct(s: dict) -> str:
        return f"{100 * s['median']:+.1f}% ({100 * s['min']:+.1f} to {100 * s['max']:+.1f})"

    def ms(s: dict) -> str:
        return f"{s['median']:.2f}"

    yes = {True: "yes", False: "no"}

    def gap(r: dict, key: str, unit: float = 0.01, name: str = " pp") -> str:
        """The largest difference over the rounds, simulated - measured."""
        d = max((b - a for a, b in (run[key] for run in r["runs"])), key=abs)
        return f"{d / unit:+.1f}{name}" if d else "0"

    rows = [
        [
            f"{r['budget']} ({r['budget_fraction']:g})",
            r["contender"],
            ms(r["real_tpot_ms"]),
            ms(r["sim_tpot_ms"]),
            pct(r["error"]),
            f"{yes[r['same_hit_rate']]} ({gap(r, 'hit_rate')})",
            f"{yes[r['same_covered_rate']]} ({gap(r, 'covered_rate')})",
            f"{yes[r['same_bytes']]} ({gap(r, 'bytes_moved', 1e6, ' MB')})",
        ]
        for r in report["rows"]
    ]
    headers = [
        "budget (of expert bytes)",
        "policy",
        "measured TPOT (ms)",
        "simulated TPOT (ms)",
        "error, median (min to max)",
        "same hit rate (largest gap)",
        "same covered rate (largest gap)",
        "same bytes moved (largest gap)",
    ]
    return (
        f"Simulated vs measured, {report['model']}, {report['new_tokens']} new tokens after "
        f"{report['prompt']}, cpu backend, {report['rounds']} interleaved rounds; goal: within "
        f"{100 * report['goal_error']:.0f}%\n\n" + markdown_table(rows, headers)
    )


if __name__ == "__main__":
    sys.exit(main())
