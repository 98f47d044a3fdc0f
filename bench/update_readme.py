"""Regenerate the results tables in README.md from the benchmarks' JSON (between the
``<!-- results:start -->`` and ``<!-- results:end -->`` markers): first the end-to-end matrix
(bench_e2e.py), then the policies at two budgets (bench_offload.py) and the governor's k sweep
(bench_governor.py); and the `speq explain` excerpt (between the explain markers).

    python bench/update_readme.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from common import markdown_table

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
START, END = "<!-- results:start -->", "<!-- results:end -->"


def _fmt(x, spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)


def offload_table(report: dict) -> str:
    s = report["setting"]
    lines = [
        f"Decoding {s['new_tokens']} tokens after a {s['prompt_tokens']}-token prompt on this "
        f"project's CPU machine ({s['model']}), {s['backend']}: {s['link_description']}. "
        f"Median of {s['repeats']} runs; every run's tokens equal the all-resident greedy output. "
        "Hit rate: (layer, expert) needs found resident and loaded; token hit rate: the passes' "
        "routings (token, layer, top-k choice) whose expert needed no copy the compute waited "
        "for; stalls / token: those copies per new token. The two hit rates are equal for "
        "policies that decode one token per pass, while one copy at speq's verification serves "
        "every token of the window routed to that expert.",
        "",
    ]
    headers = [
        "device budget (beyond weights + KV)",
        "policy",
        "k",
        "expert slots",
        "TPOT (ms)",
        "vs ondemand",
        "hit rate",
        "token hit rate",
        "stalls / token",
        "MB moved",
        "acceptance",
    ]
    rows = [
        [
            f"{r['budget']}",
            f"{r['policy']}",
            f"{r['k'] or '-'}",
            f"{r['cache_slots']}",
            f"{r['tpot_ms']:.1f}",
            f"{r['speedup_vs_ondemand']:.2f}x",
            f"{r['hit_rate']:.2f}",
            f"{r['token_hit_rate']:.2f}",
            f"{r['stalls_per_token']:.2f}",
            f"{r['mb_moved']:.1f}",
            _fmt(r["acceptance_rate"]),
        ]
        for r in report["results"]
    ]
    lines.append(markdown_table(rows, headers))
    return "\n".join(lines)


def e2e_block(report: dict) -> str:
    """The end-to-end results: how they were measured, the goals, the per-setting table and every
    contender's TPOT (bench_e2e renders them; the full table is in bench/results/e2e_cpu.md)."""
    import bench_e2e

    summary = report["summary"]
    applies = [s for s in summary if s["goal_speedup"]["applies"]]
    met = [s for s in applies if s["goal_speedup"]["met"]]
    perfect = [s for s in summary if s["goal_perfect"]["met"]]
    goals = (
        f"Goals: speq within {bench_e2e.GOAL_PERFECT} of perfect prediction: met in "
        f"{len(perfect)} of {len(summary)} settings. {bench_e2e.GOAL_SPEEDUP}x or more over the "
        f"best same-memory baseline, wherever resident speq is at least that far ahead of it (so "
        f"that the goal is reachable): {len(applies)} of {len(summary)} settings qualify, and speq "
        f"reaches {bench_e2e.GOAL_SPEEDUP}x in {len(met)} of them."
    )
    drafted = [
        v
        for r in report["rows"]
        if r["contender"] == bench_e2e.SPEQ
        for v in r["prompts"].values()
        if v.get("acceptance_rate") is not None  # drafted from the start or after a switch
    ]
    caveat = ""
    if drafted:
        acc = [v["acceptance_rate"] for v in drafted]
        cycles = sorted({len(v["k_per_cycle"]) for v in drafted})
        caveat = (
            f" Where speq drafted, its acceptance rate per prompt was {min(acc):.2f}-{max(acc):.2f} "
            f"(the demo model's greedy text often repeats itself, which its INT4 draft predicts "
            f"well) and "
            f"each {report['setting']['new_tokens']}-token run took "
            f"{'-'.join(map(str, (cycles[0], cycles[-1]))) if len(cycles) > 1 else cycles[0]} "
            f"draft-verify cycle(s): these numbers come from short, easy generations."
        )
    return "\n\n".join(
        [
            bench_e2e.how_measured(report),
            goals + caveat,
            bench_e2e.summary_table(report),
            "TPOT of every contender (ms per token):",
            bench_e2e.tpot_table(report),
            "![TPOT per contender, budget and link](bench/results/e2e_cpu.png)",
            "Per contender hit, covered and token hit rates, stalls per token, acceptance, bytes moved and ELB recall: "
            "[bench/results/e2e_cpu.md](bench/results/e2e_cpu.md).",
        ]
    )


def governor_table(report: dict) -> str:
    s = report["setting"]
    lines = [
        f"The governor on {s['model']} ({s['backend']}, budget {s['budget_fraction_of_expert_bytes']:.0%} "
        f"of expert bytes): {s['governor']}",
        "",
    ]
    headers = ["k", "measured TPOT (ms)", "predicted TPOT (ms)", "prediction error"]
    rows = [
        [
            f"{r['k']}",
            f"{r['measured_tpot_ms']:.1f}",
            f"{r['predicted_tpot_ms']:.1f}",
            f"{r['error']:+.0%}",
        ]
        for r in report["sweep"]
    ]
    lines.append(markdown_table(rows, headers))
    g = report["governed"]
    lines.append("")
    lines.append(
        f"Governed run: {g['measured_tpot_ms']:.1f} ms/token, {report['governed_over_best']:.2f}x the best "
        f"swept TPOT ({report['best_swept']['tpot_ms']:.1f} ms at k={report['best_swept']['k']})."
    )
    return "\n".join(lines)


def explain_excerpt() -> str:
    """`speq explain` on the demo model: every pass header, the governor's decision, and layer 1
    of the lowered target and draft graphs (the full output is hundreds of lines)."""
    import contextlib
    import io

    from speq.cli import main as speq_main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        speq_main(["explain"])
    lines = buf.getvalue().splitlines()
    heads = [ln for ln in lines if ln.startswith("#")]
    last = max(i for i, ln in enumerate(lines) if ln.startswith("# after lower"))

    def layer1(name: str) -> list[str]:
        start = lines.index(f"graph {name} {{", last)
        end = lines.index("}", start)
        keep = ("%l1.", "prefetch(%l1.")
        return [ln for ln in lines[start:end] if ln.strip().startswith(keep)]

    out = ["$ speq explain", *heads, "...", "graph step {  # layer 1 of the lowered target step"]
    out += [*layer1("step"), "  ...", "}", "graph draft {  # layer 1 of the lowered draft step"]
    out += [*layer1("draft"), "  ...", "}"]
    return "```\n" + "\n".join(out) + "\n```"


def replace_between(text: str, start: str, end: str, body: str) -> str:
    a, b = text.index(start) + len(start), text.index(end)
    return text[:a] + "\n" + body + "\n" + text[b:]


def main() -> int:
    parts = []
    for name, fn in (
        ("e2e_cpu.json", e2e_block),
        ("offload_cpu.json", offload_table),
        ("governor_cpu.json", governor_table),
    ):
        path = RESULTS / name
        if path.is_file():
            parts.append(fn(json.loads(path.read_text())))
    readme = ROOT / "README.md"
    text = readme.read_text()
    body = "\n\n".join(parts) if parts else "No benchmark results yet."
    text = replace_between(text, START, END, body)
    text = replace_between(
        text, "<!-- explain:start -->", "<!-- explain:end -->", explain_excerpt()
    )
    readme.write_text(text)
    print(f"updated {readme} from {len(parts)} result file(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
