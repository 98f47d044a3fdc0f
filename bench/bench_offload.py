"""Offloading policies side by side on the cpu backend: one prompt, two device budgets.

The emulated link is calibrated so that one expert copy costs as many decode-layer times on this
CPU as one Phi-3.5-MoE expert costs on an A100 over PCIe 4.0 (speq.compare.calibrate_link). Each
budget is the same total device memory for every policy; speq spends part of it on its resident
INT4 draft, so it has fewer expert slots ("ondemand-same-cache" gets only speq's slots). Sizes
are counted in bf16, as the model would split the memory on a GPU (compute stays float64, so
outputs compare exactly; CompileOptions.memory_dtype). Every
run's tokens are checked against the resident greedy output. TPOT is wall-clock ms per output
token (the median of the repeats). Writes bench/results/offload_cpu.json and prints a table.

    python bench/bench_offload.py [--tokens 32] [--repeats 3] [--budgets 0.375,0.75] [--ks 1,2,4,8,16]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
from common import RESULTS, environment, table, write_json
from tqdm import tqdm

import speq
from speq.compare import calibrate_link
from speq.models.demo import demo_model, random_demo_model


def _row(name: str, budget: str, k, runs: list) -> dict:
    m = runs[len(runs) // 2]
    return {
        "budget": budget,
        "policy": name,
        "k": k,
        "tpot_ms": statistics.median(r.tpot_ms for r in runs),
        "tpot_ms_runs": [r.tpot_ms for r in runs],
        "hit_rate": m.hit_rate,
        "covered_rate": m.covered_rate,
        "verify_hit_rate": m.extra.get("verify_hit_rate"),
        "token_hit_rate": m.token_hit_rate,
        "stalls_per_token": m.stalls_per_token,
        "experts_moved": m.experts_moved,
        "mb_moved": m.bytes_moved / 1e6,
        "stall_ms": statistics.median(r.stall_ms for r in runs),
        "cache_slots": m.cache_slots,
        "acceptance_rate": m.extra.get("acceptance_rate"),
        "elb_recall": m.extra.get("elb_recall"),
        "elb_precision": m.extra.get("elb_precision"),
        "tokens_per_cycle": m.extra.get("tokens_per_cycle"),
    }


def load(name: str, prompt_tokens: int):
    """The shipped demo MoE (float64: batch-invariant argmax) with a prompt of real text, or
    the random model of the demo's shape with random prompt ids."""
    if name == "demo":
        model, tok = demo_model(dtype=torch.float64)
        ids = tok.encode(PROMPT)[:prompt_tokens]
        return model, torch.tensor([ids]), "the shipped demo MoE, float64"
    model = random_demo_model(0).to(torch.float64)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (1, prompt_tokens), generator=gen)
    return model, ids, "a random MoE of the demo's first shape, float64"


PROMPT = (
    "And it came to pass, when the king of Israel had read the letter, that he rent his clothes,"
    " and said, Am I God, to kill and to make alive"
)


def run(args: argparse.Namespace) -> dict:
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
        same_cache = speq.CompileOptions(policy="ondemand", device_memory=budget - draft, **link)
        configs.append((label, "ondemand-same-cache", None, same_cache))

    rows = []
    bar = tqdm(total=len(configs) * args.repeats, desc="bench_offload", unit="run", file=sys.stderr)
    for label, name, k, opts in configs:
        cm = speq.compile(model, opts)
        runs = []
        for _ in range(args.repeats):
            out = cm.generate(prompt, args.tokens)
            if not torch.equal(out, expected):
                raise AssertionError(f"{name} (k={k}) generated other tokens than resident")
            runs.append(cm.metrics)
            bar.update(1)
        rows.append(_row(name, label, k, runs))
    bar.close()
    for label in {r["budget"] for r in rows}:
        group = [r for r in rows if r["budget"] == label]
        base = next(r["tpot_ms"] for r in group if r["policy"] == "ondemand")
        for r in group:
            r["speedup_vs_ondemand"] = base / r["tpot_ms"]
    return {
        "setting": {
            "backend": "cpu, emulated link, wall clock",
            "model": f"{what} ({cfg.num_layers} layers, {cfg.num_experts} experts top-{cfg.top_k}, hidden {cfg.hidden_size})",
            "prompt_tokens": int(prompt.shape[1]),
            "new_tokens": args.tokens,
            "repeats": args.repeats,
            "link": cal.__dict__,
            "link_description": cal.describe(),
            "expert_bytes": mem.expert_bytes,
            "total_expert_bytes": total_expert_bytes,
            "environment": environment(),
        },
        "results": rows,
    }


COLUMNS = {
    "budget": "device budget",
    "policy": "policy",
    "k": "k",
    "cache_slots": "expert slots",
    "tpot_ms": "TPOT (ms)",
    "speedup_vs_ondemand": "vs ondemand (x)",
    "hit_rate": "hit rate",
    "token_hit_rate": "token hit rate",
    "stalls_per_token": "stalls / token",
    "mb_moved": "MB moved",
    "stall_ms": "stall (ms)",
    "acceptance_rate": "acceptance",
    "elb_recall": "ELB recall",
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--tokens", type=int, default=32, help="new tokens per run")
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--budgets",
        type=lambda s: [float(x) for x in s.split(",")],
        default=[0.375, 0.75],
        help="device budget beyond non-expert weights and KV cache, as fractions of all expert bytes",
    )
    p.add_argument("--ks", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 4, 8, 16])
    p.add_argument("--model", choices=["demo", "random"], default="demo")
    p.add_argument("--reference", default="phi-3.5-moe", help="preset whose ratio the link matches")
    p.add_argument("--out", default=str(RESULTS / "offload_cpu.json"))
    args = p.parse_args(argv)
    report = run(args)
    path = write_json(Path(args.out), report)
    s = report["setting"]
    print(f"{s['model']}; {s['link_description']}")
    print(
        f"{s['new_tokens']} new tokens after a {s['prompt_tokens']}-token prompt, median of "
        f"{s['repeats']} runs; {s['backend']}; every run's tokens equal resident greedy"
    )
    print(table(report["results"], COLUMNS))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
