"""Offloading policies side by side on the cpu backend: one prompt, two device budgets, in rounds.

The emulated link is calibrated so that one expert copy costs as many decode-layer times on this
CPU as one Phi-3.5-MoE expert costs on an A100 over PCIe 4.0 (speq.compare.calibrate_link). Each
budget is the same total device memory for every policy; speq (here at fixed k = 1, 2, 4, 8, 16,
so no governor and no calibration) holds each expert once (draft_memory="shared", the default:
full precision while cached, INT4 otherwise) and spends part of the memory on the INT4 slots of
the experts not cached, so it has fewer expert slots ("ondemand-same-cache" gets only speq's
slots); "speq-separate" keeps an INT4 copy of every expert beside its cache
(draft_memory="separate"), so it has fewer still. Sizes are counted in bf16, as the
model would split the memory on a GPU (compute stays float64, so outputs compare exactly;
CompileOptions.memory_dtype). "oracle" (Belady's fetches) is a bound: it first runs a recording
pass (it needs the run's output before it can run), and that pass is not timed.

Every configuration is compiled first; then each of --rounds rounds runs every configuration
once, in the same order, before the next round starts. Reported per configuration: the median
TPOT (wall-clock ms per output token) over the rounds with its spread (min-max), the other
metrics of the run with the median TPOT, and the speed-up over ondemand (the same budget),
computed within each round (median and spread; "no difference" when the spread includes 1.0).
Every run's tokens are checked against the resident greedy output. Acceptance here is greedy
(the demo model's greedy text repeats itself, which flatters it; bench_e2e.py also samples).
Writes bench/results/offload_cpu.json and prints a table.

    python bench/bench_offload.py [--tokens 32] [--rounds 3] [--budgets 0.375,0.75]
        [--ks 1,2,4,8,16] [--quick]

Wall time on this project's 2-core CPU machine: about 5-10 minutes by default (3 rounds of 20
configurations at 32 tokens, the same number of runs as the previous protocol's 3 back-to-back
repeats); --quick (budget 0.375, k = 4, 4 tokens, 3 rounds, to the temp folder) about 30 s.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from common import (
    FORMAT,
    RESULTS,
    bench_model,
    environment,
    fmt_ratio,
    fmt_speedup,
    git_state,
    interleaved,
    median_index,
    spread,
    table,
    write_json,
)
from tqdm import tqdm

import speq
from speq.compare import calibrate_link
from speq.models.demo import random_demo_model

UNTIMED = (
    "oracle (Belady's fetches) is a bound, not a baseline: it first runs a recording pass (it "
    "needs the run's output before it can run), and that pass is not timed as part of its work"
)
RUN_METRICS = (
    "hit_rate",
    "covered_rate",
    "token_hit_rate",
    "stalls_per_token",
    "experts_moved",
    "stall_ms",
    "cache_slots",
    "full_precision_slots",
    "demotions",
    "calibration_s",
    "acceptance_rate",
    "elb_recall",
    "elb_precision",
    "tokens_per_cycle",
    "verify_hit_rate",
)


def _record(m, same: bool) -> dict:
    return {
        "tpot_ms": m.tpot_ms,
        "identical_to_resident": same,
        "mb_moved": m.bytes_moved / 1e6,
        **{key: m[key] for key in RUN_METRICS},
    }


def _row(name: str, budget: str, k, runs: list[dict]) -> dict:
    """One configuration: the median TPOT and spread over the rounds, and the other metrics of
    the run with the median TPOT."""
    tpots = [r["tpot_ms"] for r in runs]
    m = runs[median_index(tpots)]
    return {
        "budget": budget,
        "policy": name,
        "k": k,
        "tpot_ms": spread(tpots)["median"],
        "tpot_ms_spread": spread(tpots),
        "median_run": median_index(tpots),
        **{key: m[key] for key in ("mb_moved", *RUN_METRICS)},
        "identical_to_resident": all(r["identical_to_resident"] for r in runs),
        "runs": runs,
    }


def load(name: str, prompt_tokens: int):
    """The shipped demo MoE (float64: batch-invariant argmax) or a checkpoint folder (either
    format, with its tokenizer.json) with a prompt of real text, or the random model of the
    demo's shape with random prompt ids."""
    if name != "random":
        model, tok, what = bench_model(None if name == "demo" else name)
        ids = tok.encode(PROMPT)[:prompt_tokens]
        return model, torch.tensor([ids]), f"{what}, float64"
    model = random_demo_model(0).to(torch.float64)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (1, prompt_tokens), generator=gen)
    return model, ids, "a random MoE of the demo's first shape, float64"


PROMPT = (
    "And it came to pass, when the king of Israel had read the letter, that he rent his clothes,"
    " and said, Am I God, to kill and to make alive"
)


def run(args: argparse.Namespace) -> dict:
    code = git_state()
    model, prompt, what = load(args.model, args.prompt_tokens)
    cfg = model.config
    counted = dict(memory_dtype=torch.bfloat16)
    resident = speq.compile(model, speq.CompileOptions(**counted))
    cal = calibrate_link(resident, prompt, reference=args.reference)
    print(cal.describe(), file=sys.stderr)
    link = dict(
        backend="cpu", link_gbps=cal.link_gbps, link_latency_us=cal.link_latency_us, **counted
    )
    expected = resident.generate(prompt, args.tokens)
    mem = resident.memory
    fixed = mem.non_expert_bytes + mem.kv_bytes
    total_expert_bytes = mem.expert_bytes * len(resident.store.keys())

    configs: list[tuple[str, str, int | None, speq.CompileOptions]] = []
    for frac in args.budgets:
        budget = fixed + int(frac * total_expert_bytes)
        label = f"{frac:.3g} of expert bytes"
        configs.append((label, "resident", None, speq.CompileOptions(policy="resident", **link)))
        for policy in ("ondemand", "nextgate", "oracle"):
            opts = speq.CompileOptions(policy=policy, device_memory=budget, **link)
            configs.append((label, policy, None, opts))
        for k in args.ks:
            opts = speq.CompileOptions(policy="speq", k=k, device_memory=budget, **link)
            configs.append((label, "speq", k, opts))
        draft = speq.compile(model, configs[-1][3]).draft_bytes
        for k in args.ks:  # an INT4 copy of every expert beside the cache: fewer slots
            opts = speq.CompileOptions(
                policy="speq", k=k, device_memory=budget, draft_memory="separate", **link
            )
            configs.append((label, "speq-separate", k, opts))
        same_cache = speq.CompileOptions(policy="ondemand", device_memory=budget - draft, **link)
        configs.append((label, "ondemand-same-cache", None, same_cache))

    compiled = [
        speq.compile(model, c[3])
        for c in tqdm(configs, desc="compile", unit="config", file=sys.stderr, leave=False)
    ]
    bar = tqdm(total=len(configs) * args.rounds, desc="bench_offload", unit="run", file=sys.stderr)

    def one(r: int, i: int) -> dict:
        label, name, k, _ = configs[i]
        bar.set_postfix_str(f"round {r + 1}, {label}, {name}" + (f" k={k}" if k else ""))
        out = compiled[i].generate(prompt, args.tokens)
        if not torch.equal(out, expected):
            raise AssertionError(f"{name} (k={k}) generated other tokens than resident")
        bar.update(1)
        return _record(compiled[i].metrics, True)

    rounds = interleaved(args.rounds, range(len(configs)), one)
    bar.close()
    rows = [
        _row(name, label, k, [rd[i] for rd in rounds])
        for i, (label, name, k, _) in enumerate(configs)
    ]
    for label in dict.fromkeys(r["budget"] for r in rows):
        group = [r for r in rows if r["budget"] == label]
        base = next(r for r in group if r["policy"] == "ondemand")
        for r in group:  # each round's ratio from that round's runs
            r["speedup_vs_ondemand"] = spread(
                [b["tpot_ms"] / x["tpot_ms"] for b, x in zip(base["runs"], r["runs"])]
            )
    return {
        "format": FORMAT,
        "setting": {
            "backend": "cpu, emulated link, wall clock",
            "model": f"{what} ({cfg.num_layers} layers, {cfg.num_experts} experts top-{cfg.top_k}, hidden {cfg.hidden_size})",
            "prompt": PROMPT if args.model != "random" else "random ids",
            "prompt_tokens": int(prompt.shape[1]),
            "new_tokens": args.tokens,
            "rounds": args.rounds,
            "run_order": "every configuration once per round, in the table's order; round r + 1 "
            "starts after round r",
            "aggregate": "per configuration: the median TPOT over the rounds and its spread "
            "(min-max), the other metrics of the median-TPOT run; speed-up vs ondemand: each "
            "round's from that round's runs, median and spread",
            "calibration": "none: speq runs at fixed k here (no governor)",
            "bounds": UNTIMED,
            "decoding": "greedy (acceptance is greedy acceptance)",
            "link": cal.__dict__,
            "link_description": cal.describe(),
            "expert_bytes": mem.expert_bytes,
            "total_expert_bytes": total_expert_bytes,
            "environment": environment(),
            "code": code,
        },
        "rounds": [
            {
                f"{configs[i][0]} | {configs[i][1]}{'' if configs[i][2] is None else f' k={configs[i][2]}'}": x[
                    "tpot_ms"
                ]
                for i, x in rd.items()
            }
            for rd in rounds
        ],
        "results": rows,
    }


def vs_ondemand_cell(r: dict) -> str:
    """The speed-up over ondemand as the tables print it ("baseline" on ondemand's own row)."""
    if r["policy"] == "ondemand":
        return "1 (baseline)"
    return fmt_speedup(r["speedup_vs_ondemand"])


def printable(rows: list[dict]) -> list[dict]:
    return [
        {
            **r,
            "k": r["k"] or "-",
            "tpot": fmt_ratio(r["tpot_ms_spread"], spec=".1f"),
            "vs_ondemand": vs_ondemand_cell(r),
        }
        for r in rows
    ]


COLUMNS = {
    "budget": "device budget",
    "policy": "policy",
    "k": "k",
    "cache_slots": "expert slots (full precision)",
    "demotions": "demotions",
    "tpot": "TPOT (ms)",
    "vs_ondemand": "speed-up vs ondemand",
    "hit_rate": "hit rate",
    "token_hit_rate": "token hit rate",
    "stalls_per_token": "stalls / token",
    "mb_moved": "MB moved",
    "stall_ms": "stall (ms)",
    "acceptance_rate": "acceptance (greedy)",
    "elb_recall": "ELB recall",
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--tokens", type=int, default=32, help="new tokens per run")
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="rounds; each runs every configuration once, in the same order",
    )
    p.add_argument(
        "--budgets",
        type=lambda s: [float(x) for x in s.split(",")],
        default=[0.375, 0.75],
        help="device budget beyond non-expert weights and KV cache, as fractions of all expert bytes",
    )
    p.add_argument("--ks", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 4, 8, 16])
    model_help = "demo (the shipped model), random (its shape, random weights), or a checkpoint "
    model_help += "folder of either format (speq's or a Hugging Face one) with a tokenizer.json"
    p.add_argument("--model", default="demo", help=model_help)
    p.add_argument("--reference", default="phi-3.5-moe", help="preset whose ratio the link matches")
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: budget 0.375, k = 4, 4 tokens, 3 rounds, written to the temp folder "
        "(other flags still apply)",
    )
    p.add_argument(
        "--out", default=None, help="the JSON path (default bench/results/offload_cpu.json)"
    )
    if p.parse_known_args(argv)[0].quick:
        p.set_defaults(budgets=[0.375], ks=[4], tokens=4, rounds=3)
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    if args.out is None:
        folder = Path(tempfile.gettempdir()) if args.quick else RESULTS
        args.out = str(folder / ("offload_quick.json" if args.quick else "offload_cpu.json"))
    report = run(args)
    path = write_json(Path(args.out), report)
    s = report["setting"]
    print(f"{s['model']}; {s['link_description']}")
    print(
        f"{s['new_tokens']} new tokens after a {s['prompt_tokens']}-token prompt, {s['rounds']} "
        f"interleaved rounds: TPOT median (min-max), other metrics from the median-TPOT run; "
        f"{s['backend']}; every run's tokens equal resident greedy; {UNTIMED}"
    )
    print(table(printable(report["results"]), COLUMNS))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
