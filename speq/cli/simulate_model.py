"""``speq simulate --model NAME --hardware NAME --budget SIZE``: speq and every baseline on a
simulated GPU (speq.simulate.compare), as a table or one JSON object."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from speq.runtime.budget import parse_budget
from speq.sim.measure import measure_profile
from speq.sim.presets import expert_bytes
from speq.sim.profiles import get_profile
from speq.simulate import CONTENDERS, compare, model_config, one_cycle, routing_for


def compare_model(args: argparse.Namespace) -> int:
    error = args.simulate_parser.error
    if args.hardware is None or args.budget is None:
        error("--model needs --hardware NAME and --budget SIZE")
    try:
        cfg = model_config(args.model)
        profile = measure_profile() if args.hardware == "measured" else get_profile(args.hardware)
        budget = parse_budget(args.budget, "--budget").nbytes
        acceptance = args.acceptance and tuple(args.acceptance)
        paths = () if args.trace is None else (args.trace,)
        trace, n, source = routing_for(
            cfg, args.tokens, paths, args.seed, args.agreement, acceptance, args.model
        )
    except (ValueError, FileNotFoundError) as e:
        error(str(e))
    keep = args.timeline or args.plot
    path = Path(tempfile.mkdtemp()) / "run.json" if keep else None

    def progress(name: str) -> None:
        print(f"simulating {name} ...", file=sys.stderr, flush=True)

    results = compare(
        cfg, trace, profile, budget, n, timeline=path and str(path), progress=progress
    )
    if keep:
        cycle = one_cycle(json.loads(path.read_text())["traceEvents"])
        if args.timeline:
            args.timeline.write_text(json.dumps({"traceEvents": cycle, "displayTimeUnit": "ms"}))
        if args.plot:
            _plot(cycle, args.plot)
    setting = dict(
        model=args.model,
        hardware=profile.name,
        budget_bytes=budget,
        expert_bytes=expert_bytes(cfg),
        new_tokens=n,
        trace=source,
        dtype="bfloat16",
    )
    if args.json:
        print(json.dumps(dict(setting=setting, contenders=results)))
    else:
        print(table(setting, results))
    return 0


def table(setting: dict, results: dict) -> str:
    gb = setting["budget_bytes"] / 1e9
    lines = [
        f"{setting['model']} on {setting['hardware']}, {gb:g} GB of device memory, bf16, "
        f"{setting['new_tokens']} new tokens; routing: {setting['trace']} (simulated)",
        "",
        f"{'contender':<24} {'TPOT (ms)':>10} {'hit rate':>9} {'GB/token':>9} "
        f"{'host/token':>10}  note",
    ]
    for name, r in results.items():
        if r["tpot_ms"] is None:
            lines.append(f"{name:<24} {'-':>10} {'-':>9} {'-':>9} {'-':>10}  {r['error']}")
            continue
        host = r.get("host_expert_runs_per_token")
        host_cell = "-" if host is None else f"{host:.1f}"
        note = CONTENDERS[name][1]
        if name == "speq":
            note = f"k* = {r['k']}" if r["k"] is not None else "governor dropped the draft"
            if not r["draft_fits"]:
                note = "no room for the draft: runs without it"
            if r.get("switched_to_draft_after") is not None:
                note += f", took it back after {r['switched_to_draft_after']} tokens"
        lines.append(
            f"{name:<24} {r['tpot_ms']:>10.1f} {r['hit_rate']:>9.1%} "
            f"{r['bytes_per_token'] / 1e9:>9.2f} {host_cell:>10}  {note}"
        )
    return "\n".join(lines)


def _plot(events: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("--plot needs matplotlib (pip install matplotlib)") from None
    lanes = ["pass", "compute", "copy", "host"]
    t0 = min(e["ts"] for e in events)
    fig, ax = plt.subplots(figsize=(12, 3))
    for i, lane in enumerate(lanes):
        spans = [e for e in events if e["tid"] == lane]
        colors = ["tab:red" if e["name"].startswith("stall") else f"C{i}" for e in spans]
        bars = [((e["ts"] - t0) / 1e3, e["dur"] / 1e3) for e in spans]
        ax.broken_barh(bars, (i - 0.4, 0.8), facecolors=colors)
    ax.set_yticks(range(len(lanes)), lanes)
    ax.set_xlabel("ms (virtual clock) from the cycle's start; red: stalls")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
