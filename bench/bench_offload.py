"""Offloading policies side by side on the cpu backend, on one prompt and one device budget.

The emulated link is calibrated so that one expert copy costs as many decode-layer times on this
CPU as one Phi-3.5-MoE expert costs on an A100 over PCIe 4.0 (see speq.runtime.calibrate). Every
policy generates the same tokens (checked); TPOT is wall-clock ms per output token after the
first, the median of the repeats. Writes bench/results/offload_cpu.json and prints a table.

    python bench/bench_offload.py [--tokens 32] [--repeats 3] [--slots-fraction 0.25]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
from pathlib import Path

import torch
from tabulate import tabulate
from tqdm import tqdm

import speq
from speq.models.demo import random_demo_model
from speq.runtime.calibrate import calibrate_link
from speq.runtime.policies import POLICIES

RESULTS = Path(__file__).parent / "results"


def run(args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    model = random_demo_model(0)
    cfg = model.config
    prompt = torch.randint(
        0, cfg.vocab_size, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(1)
    )
    resident = speq.compile(model)
    cal = calibrate_link(resident, prompt, reference=args.reference)
    print(cal.describe(), file=sys.stderr)
    mem = resident.memory
    total = len(cfg.moe_layers) * cfg.num_experts
    slots = max(cfg.top_k, round(args.slots_fraction * total))
    budget = mem.non_expert_bytes + mem.kv_bytes + slots * mem.expert_bytes
    expected = resident.generate(prompt, args.tokens)
    rows = []
    bar = tqdm(
        total=len(POLICIES) * args.repeats, desc="bench_offload", unit="run", file=sys.stderr
    )
    for policy in POLICIES:
        opts = speq.CompileOptions(
            policy=policy,
            backend="cpu",
            device_memory=None if policy == "resident" else budget,
            link_gbps=cal.link_gbps,
            link_latency_us=cal.link_latency_us,
        )
        cm = speq.compile(model, opts)
        runs = []
        for _ in range(args.repeats):
            out = cm.generate(prompt, args.tokens)
            if not torch.equal(out, expected):
                raise AssertionError(f"{policy} generated different tokens than resident")
            runs.append(cm.metrics)
            bar.update(1)
        m = runs[len(runs) // 2]
        rows.append(
            {
                "policy": policy,
                "tpot_ms": statistics.median(r.tpot_ms for r in runs),
                "tpot_ms_runs": [r.tpot_ms for r in runs],
                "hit_rate": m.hit_rate,
                "experts_moved": m.experts_moved,
                "mb_moved": m.bytes_moved / 1e6,
                "stall_ms": statistics.median(r.stall_ms for r in runs),
                "prefetches_issued": m.prefetches_issued,
                "prefetches_used": m.prefetches_used,
                "cache_slots": m.cache_slots,
            }
        )
    bar.close()
    base = next(r["tpot_ms"] for r in rows if r["policy"] == "ondemand")
    for r in rows:
        r["speedup_vs_ondemand"] = base / r["tpot_ms"]
    return {
        "setting": {
            "backend": "cpu (emulated link, wall clock)",
            "model": f"random demo model: {cfg.num_layers} layers, {cfg.num_experts} experts top-{cfg.top_k}, hidden {cfg.hidden_size}",
            "prompt_tokens": args.prompt_tokens,
            "new_tokens": args.tokens,
            "repeats": args.repeats,
            "cache_slots": slots,
            "total_experts": total,
            "device_memory_bytes": budget,
            "link": cal.__dict__,
            "link_description": cal.describe(),
            "machine": f"{platform.machine()} {torch.get_num_threads()} threads, torch {torch.__version__}",
        },
        "results": rows,
    }


def table(report: dict) -> str:
    cols = [
        ("policy", "policy"),
        ("tpot_ms", "TPOT (ms)"),
        ("speedup_vs_ondemand", "speed-up vs ondemand (x)"),
        ("hit_rate", "hit rate"),
        ("experts_moved", "experts moved"),
        ("mb_moved", "MB moved"),
        ("stall_ms", "stall (ms)"),
    ]
    rows = [[r[k] for k, _ in cols] for r in report["results"]]
    return tabulate(rows, headers=[h for _, h in cols], floatfmt=".3g", tablefmt="github")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--tokens", type=int, default=32, help="new tokens per run")
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--slots-fraction", type=float, default=0.25, help="expert cache slots / all experts"
    )
    p.add_argument(
        "--reference",
        default="phi-3.5-moe",
        help="preset whose compute:transfer ratio the link matches",
    )
    p.add_argument("--out", type=Path, default=RESULTS / "offload_cpu.json")
    args = p.parse_args(argv)
    report = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    s = report["setting"]
    print(
        f"{s['model']}; {s['cache_slots']} of {s['total_experts']} experts fit; {s['link_description']}"
    )
    print(
        f"{s['new_tokens']} new tokens after a {s['prompt_tokens']}-token prompt, median of {s['repeats']} runs, {s['backend']}"
    )
    print(table(report))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
