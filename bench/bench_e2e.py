"""End to end: speq against every baseline, over budgets, links and held-out prompts.

The matrix: device budgets tight / medium / generous (0.375 / 0.5 / 0.75 of all expert bytes,
beyond the non-expert weights and the KV cache; speq's INT4 draft comes out of the same budget)
x links matching an A100's compute over PCIe 3.0 / 4.0 / 5.0 (profiles a100-40g-pcie3/4/5:
8 / 16 / 32 GB/s) x prompts from the held-out split of the demo model's corpus
(bench/prompts/heldout.json: the Bible, fortunes, Python docs, Perl docs). The model computes in
float64 (outputs compare exactly), but the budget counts every size in bfloat16
(CompileOptions.memory_dtype; --count-memory-as), as the memory would split on a GPU: there the
INT4 draft is about a quarter of the expert bytes, in float64 only a sixteenth. In every
(budget, link) setting these run, each compiled once and reused for every prompt and repeat:

    speq (governor)            policy="speq", k=None: the governor calibrates at compile and again
                               on its first prompt; it picks k*, or no draft at all (then one
                               token per pass with the draft's memory as expert cache, until a
                               run copies enough to bring the draft back mid-run)
    speq (perfect prediction)  the same, but the ELB holds the target's own routing of the output,
                               recorded in a first pass: the best any expert predictor can do
    speq (resident, k=k*)      speq at the governed k*, every expert resident: the compute side
                               (resident decoding where the governor dropped the draft); compiled
                               after speq's first run, when k* is settled
    ondemand                   LRU cache, fetch on miss, the same budget        (a baseline)
    nextgate                   ondemand + prefetch the next layer's gate pick    (a baseline)
    oracle (Belady)            Belady's fetches from a recording pass: the I/O bound, no baseline
    ondemand (speq's cache)    ondemand with the budget minus the draft's bytes
    resident (no budget)       every expert resident, one token per step

Timing is on the ``cpu`` backend: this machine's compute, and a host -> device link emulated by
a copy thread whose bandwidth is calibrated once per link profile (speq.compare.calibrate_link) so
that one expert copy costs as many decode-layer times here as a Phi-3.5-MoE expert costs on the
A100 over that link. TPOT is wall-clock ms per output token. Runs are interleaved (every repeat
runs every prompt under every contender), so load from other processes falls on all of them;
per (setting, contender, prompt) the median over repeats is kept. Per setting a contender's TPOT
is the geometric mean over prompts of those medians, so every ratio below is the geometric mean
of the per-prompt ratios. Every run's tokens are compared with the all-resident greedy output.

Derived per setting: speq's speed-up over the best same-memory baseline (the faster of ondemand
and nextgate), speq / perfect (TPOT_perfect / TPOT_speq: 1 means as fast as perfect prediction)
and speq / resident (TPOT_speq-resident / TPOT_speq: the share of the compute bound reached),
and the goals: speq within 0.9 of perfect prediction, and 2.34x or more over the best baseline
wherever resident speq itself is at least 2.34x ahead of it.

Writes e2e_cpu.json, e2e_cpu.md and e2e_cpu.png under bench/results/ (--out names the JSON; the
others sit beside it) and prints the tables. bench/update_readme.py puts the tables in README.md.

    python bench/bench_e2e.py [--budgets tight,medium,generous] [--links pcie3,pcie4,pcie5]
        [--domains kjv,fortunes,python_docs] [--prompts-per-domain 1] [--tokens 32]
        [--repeats 1] [--out bench/results/e2e_cpu.json] [--check] [--quick]

Wall time on this project's 2-core CPU machine: the defaults (3 prompts, one per domain: the
Bible, fortunes, the Python docs; one run each; 32 tokens) took 32 minutes (1914 s) for the run
in the README; compiling a setting takes 5-36 s, and the tight and medium budgets over PCIe 3.0
are the slowest (ondemand and nextgate wait for most experts, and every run's prefill fetches
experts too). Time grows about linearly with --tokens, --repeats and the prompts; adding
perl_docs to --domains adds a third. --quick (generous budget, pcie5, one prompt, one repeat, 4
tokens) takes about 20 s.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from common import RESULTS, environment, markdown_table, write_json
from tqdm import tqdm

import speq
from speq.compare import budget_bytes, calibrate_link, contenders, link_options, run_once, summarize
from speq.models.demo import demo_model

BUDGETS = {"tight": 0.375, "medium": 0.5, "generous": 0.75}
LINKS = {"pcie3": "a100-40g-pcie3", "pcie4": "a100-40g-pcie4", "pcie5": "a100-40g-pcie5"}
MEMORY_DTYPES = {"bfloat16": torch.bfloat16, "float64": None}  # None: the compute dtype
REFERENCE = "phi-3.5-moe"  # the model whose expert : layer time ratio the link reproduces
PROMPTS = Path(__file__).resolve().parent / "prompts" / "heldout.json"
GOAL_SPEEDUP = 2.34  # over the best same-memory baseline, where resident speq is that far ahead
GOAL_PERFECT = 0.9  # TPOT_perfect / TPOT_speq

SPEQ = "speq (governor)"
PERFECT = "speq (perfect prediction)"
SPEQ_RESIDENT = "speq (resident, k=k*)"
ONDEMAND, NEXTGATE, BELADY = "ondemand", "nextgate", "oracle (Belady)"
ONDEMAND_SAME, RESIDENT = "ondemand (speq's cache)", "resident (no budget)"
ORDER = (SPEQ, PERFECT, SPEQ_RESIDENT, ONDEMAND, NEXTGATE, BELADY, ONDEMAND_SAME, RESIDENT)
BASELINES = (ONDEMAND, NEXTGATE)  # "best baseline" = the faster of these in the same memory
SHORT = {  # column headers of the TPOT table
    SPEQ: "speq",
    PERFECT: "speq, perfect pred.",
    SPEQ_RESIDENT: "speq, resident",
    ONDEMAND: "ondemand",
    NEXTGATE: "nextgate",
    BELADY: "oracle (Belady)",
    ONDEMAND_SAME: "ondemand, speq's cache",
    RESIDENT: "resident",
}
AGGREGATE = (
    "per (setting, contender, prompt): median TPOT over the repeats; per (setting, contender): "
    "geometric mean of those over the prompts; ratios are ratios of the geometric means (= the "
    "geometric means of the per-prompt ratios)"
)


@dataclass(frozen=True)
class Prompt:
    id: str
    domain: str
    text: str
    source: str
    ids: torch.Tensor  # [1, T]


def load_prompts(tokenizer, domains: list[str], per_domain: int) -> list[Prompt]:
    """The first ``per_domain`` held-out prompts of each domain in ``domains``."""
    data = json.loads(PROMPTS.read_text())["prompts"]
    known = sorted({p["domain"] for p in data})
    unknown = [d for d in domains if d not in known]
    if unknown:
        raise SystemExit(f"unknown domain(s) {unknown}; bench/prompts/heldout.json has {known}")
    out = []
    for d in domains:
        for p in [p for p in data if p["domain"] == d][:per_domain]:
            ids = torch.tensor([tokenizer.encode(p["text"])])
            out.append(Prompt(p["id"], d, p["text"], p["source"], ids))
    return out


def geomean(xs) -> float:
    return statistics.geometric_mean(list(xs))


def compile_setting(model, budget: int, link: dict) -> dict[str, speq.CompiledModel]:
    """Every contender of one (budget, link) setting but speq (resident), compiled (the two
    governed speqs calibrate here on a random prompt, and again on their first prompt)."""
    governed = speq.CompileOptions(policy="speq", device_memory=budget, **link)
    perfect = dataclasses.replace(governed, predictor="oracle")
    out = {SPEQ: speq.compile(model, governed), PERFECT: speq.compile(model, perfect)}
    named = {"oracle": BELADY}  # compare.contenders' labels, renamed where this table says more
    for c in contenders(model, budget, link, ks=()):  # ondemand (speq's cache): minus the draft
        out[named.get(c.label, c.label)] = speq.compile(model, c.options)
    return out


def compile_resident_speq(model, governed: speq.CompiledModel, link: dict) -> speq.CompiledModel:
    """speq's compute side: speq at the governed k* with every expert resident; where the
    governor dropped the draft (one token per pass), resident decoding. Compiled after the
    governed speq's first generate, which recalibrates on the prompt and may change both."""
    g = governed.governed
    if g.use_draft:
        return speq.compile(model, speq.CompileOptions(policy="speq", k=g.spec.k, **link))
    return speq.compile(model, speq.CompileOptions(policy="resident", **link))


def _k_star(cm: speq.CompiledModel) -> int | None:
    g = cm.governed
    return g.spec.k if g is not None and g.use_draft else None


def _choice(cm: speq.CompiledModel) -> str:
    k = _k_star(cm)
    return (
        "no draft (one token per pass, the draft's memory as cache)" if k is None else f"k* = {k}"
    )


def _mean(rows: list[dict], key: str) -> float | None:
    vals = [r[key] for r in rows if r.get(key) is not None]
    return statistics.fmean(vals) if vals else None


def run_setting(
    model,
    budget_name: str,
    fraction: float,
    link_name: str,
    cal,
    resident: speq.CompiledModel,
    prompts: list[Prompt],
    expected: dict[str, torch.Tensor],
    args: argparse.Namespace,
) -> tuple[list[dict], dict]:
    """Compile every contender once, run them interleaved over prompts and repeats; return the
    contenders' rows and the setting's summary."""
    budget = budget_bytes(resident, fraction)
    where = f"{budget_name} budget ({fraction:g} of expert bytes), {link_name}"
    link = {**link_options(cal), "memory_dtype": resident.options.memory_dtype}
    t0 = time.perf_counter()
    cms = compile_setting(model, budget, link)
    at_compile = {label: cm.governed.describe() for label, cm in cms.items() if cm.governed}
    tqdm.write(
        f"{where}: compiled in {time.perf_counter() - t0:.1f} s; at compile the governor "
        f"chose {_choice(cms[SPEQ])} (perfect prediction: {_choice(cms[PERFECT])})",
        file=sys.stderr,
    )
    runs: dict[str, dict[str, list]] = {c: {p.id: [] for p in prompts} for c in ORDER}
    bar = tqdm(
        total=len(ORDER) * len(prompts) * args.repeats * args.tokens,
        desc=f"{budget_name}/{link_name}",
        unit="tok",
        file=sys.stderr,
        leave=False,
    )
    for _ in range(args.repeats):
        for p in prompts:
            for label in ORDER:
                if label not in cms:  # after speq's first run: its recalibrated choice
                    cms[label] = compile_resident_speq(model, cms[SPEQ], link)
                bar.set_postfix_str(f"{p.id}, {label}")
                runs[label][p.id].append(
                    run_once(cms[label], p.ids, expected[p.id], lambda _: bar.update(1))
                )
    bar.close()
    tqdm.write(
        f"{where}: on the first prompt the governor chose {_choice(cms[SPEQ])} (perfect "
        f"prediction: {_choice(cms[PERFECT])})",
        file=sys.stderr,
    )

    rows = []
    for label in ORDER:
        cm = cms[label]
        per_prompt = {pid: summarize(r) for pid, r in runs[label].items()}
        vals = list(per_prompt.values())
        o = cm.options
        rows.append(
            {
                "budget": budget_name,
                "budget_fraction": fraction,
                "link": link_name,
                "profile": cal.profile,
                "contender": label,
                "policy": o.policy,
                "predictor": o.predictor if o.policy == "speq" else None,
                "k": o.k,
                "uses_draft": cm.governed.use_draft if cm.governed else o.policy == "speq",
                "k_star": _k_star(cm),
                "device_memory_bytes": None if o.device_memory is None else int(o.device_memory),
                "cache_slots": cm.memory.slots,
                "draft_bytes": cm.draft_bytes,
                "governor": cm.governed.describe() if cm.governed else None,
                "governor_at_compile": at_compile.get(label),
                "tpot_ms": geomean(v["tpot_ms"] for v in vals),
                "identical_to_resident": all(v["identical_to_resident"] for v in vals),
                **{
                    f"mean_{key}": _mean(vals, key)
                    for key in (
                        "hit_rate",
                        "covered_rate",
                        "token_hit_rate",
                        "stalls_per_token",
                        "mb_moved",
                        "stall_ms",
                        "acceptance_rate",
                        "tokens_per_cycle",
                        "elb_recall",
                        "elb_precision",
                        "verify_hit_rate",
                        "verify_covered_rate",
                    )
                },
                "prompts": per_prompt,
            }
        )
    return rows, summarize_setting(rows, budget_name, fraction, link_name, cal.profile, budget)


def summarize_setting(
    rows: list[dict], budget_name: str, fraction: float, link: str, profile: str, budget: int
) -> dict:
    """The speed-ups, the bound ratios and the goals of one setting."""
    by = {r["contender"]: r for r in rows}
    tpot = {label: r["tpot_ms"] for label, r in by.items()}
    best = min(BASELINES, key=lambda b: tpot[b])
    s, res, perf = tpot[SPEQ], tpot[SPEQ_RESIDENT], tpot[PERFECT]
    resident_speedup = tpot[best] / res
    applies = resident_speedup >= GOAL_SPEEDUP
    per_prompt = {}
    for pid in by[SPEQ]["prompts"]:
        t = {label: r["prompts"][pid]["tpot_ms"] for label, r in by.items()}
        per_prompt[pid] = {
            "best_baseline": min(BASELINES, key=lambda b: t[b]),
            "speedup_over_best_baseline": min(t[b] for b in BASELINES) / t[SPEQ],
            "speq_over_perfect": t[PERFECT] / t[SPEQ],
            "speq_over_resident_speq": t[SPEQ_RESIDENT] / t[SPEQ],
        }
    return {
        "budget": budget_name,
        "budget_fraction": fraction,
        "budget_bytes": budget,
        "link": link,
        "profile": profile,
        "k_star": by[SPEQ]["k_star"],
        "uses_draft": by[SPEQ]["uses_draft"],
        "switched_to_draft_after": {
            pid: v["switched_to_draft_after"]
            for pid, v in by[SPEQ]["prompts"].items()
            if v.get("switched_to_draft_after") is not None
        },
        "prompts_run": len(by[SPEQ]["prompts"]),
        "k_star_perfect": by[PERFECT]["k_star"],
        "perfect_uses_draft": by[PERFECT]["uses_draft"],
        "tpot_ms": tpot,
        "best_baseline": best,
        "speedup_over_best_baseline": tpot[best] / s,
        "speedup_over_ondemand_same_cache": tpot[ONDEMAND_SAME] / s,
        "speedup_over_belady": tpot[BELADY] / s,
        "speq_over_perfect": perf / s,
        "speq_over_resident_speq": res / s,
        "resident_speq_speedup_over_best_baseline": resident_speedup,
        "goal_speedup": {
            "target": GOAL_SPEEDUP,
            "applies": applies,
            "met": (tpot[best] / s >= GOAL_SPEEDUP) if applies else None,
        },
        "goal_perfect": {"target": GOAL_PERFECT, "met": perf / s >= GOAL_PERFECT},
        "identical_to_resident": all(r["identical_to_resident"] for r in rows),
        "per_prompt": per_prompt,
    }


def run(args: argparse.Namespace) -> dict:
    t_start = time.perf_counter()
    code = _git_state()  # at the start: the code this process imports
    model, tokenizer = demo_model(dtype=torch.float64)  # float64: batch-invariant argmax
    cfg = model.config
    prompts = load_prompts(tokenizer, args.domains, args.prompts_per_domain)
    memory_dtype = MEMORY_DTYPES[args.count_memory_as]
    resident = speq.compile(model, speq.CompileOptions(memory_dtype=memory_dtype))
    draft_bytes = speq.compile(model, speq.CompileOptions(policy="speq", k=1)).draft_bytes
    expert_bytes = resident.memory.expert_bytes * len(resident.store.keys())
    expected = {p.id: resident.generate(p.ids, args.tokens) for p in prompts}
    cals = {}
    for name in tqdm(args.links, desc="calibrate links", file=sys.stderr, leave=False):
        cals[name] = calibrate_link(
            resident, prompts[0].ids, reference=REFERENCE, profile=LINKS[name]
        )
        tqdm.write(f"{name}: {cals[name].describe()}", file=sys.stderr)

    rows, summary = [], []
    settings = [(b, link) for b in args.budgets for link in args.links]
    for b, link in tqdm(settings, desc="settings", unit="setting", file=sys.stderr):
        r, s = run_setting(
            model, b, BUDGETS[b], link, cals[link], resident, prompts, expected, args
        )
        rows += r
        summary.append(s)
        tqdm.write(describe(s), file=sys.stderr)
    return {
        "setting": {
            "model": f"the shipped demo MoE ({cfg.num_layers} layers, {cfg.num_experts} experts "
            f"top-{cfg.top_k}, hidden {cfg.hidden_size}; docs/MODEL_CARD.md)",
            "dtype": "float64",
            "backend": "cpu, emulated link, wall clock",
            "new_tokens": args.tokens,
            "repeats": args.repeats,
            "budgets": {b: BUDGETS[b] for b in args.budgets},
            "budget_convention": "fraction of all expert bytes, beyond non-expert weights + KV "
            "cache; the same total device memory for every contender but the resident ones",
            "memory_counted_as": args.count_memory_as,
            "expert_bytes_counted": expert_bytes,
            "draft_bytes": draft_bytes,
            "draft_share_of_expert_bytes": draft_bytes / expert_bytes,
            "links": {
                name: {**cals[name].__dict__, "description": cals[name].describe()}
                for name in args.links
            },
            "reference_model": REFERENCE,
            "prompts": [
                {
                    "id": p.id,
                    "domain": p.domain,
                    "text": p.text,
                    "source": p.source,
                    "tokens": int(p.ids.shape[1]),
                    "resident_output": tokenizer.decode(
                        expected[p.id][0, p.ids.shape[1] :].tolist()
                    ),
                }
                for p in prompts
            ],
            "tpot": "decode wall-clock ms per new token; the prompt's prefill (and its expert "
            "fetches) is not counted",
            "aggregate": AGGREGATE,
            "run_order": "for each repeat, for each prompt, every contender once (interleaved)",
            "goals": {
                "speedup_over_best_baseline": GOAL_SPEEDUP,
                "speq_over_perfect": GOAL_PERFECT,
            },
            "environment": environment(),
            "code": code,
            "wall_s": time.perf_counter() - t_start,
        },
        "summary": summary,
        "rows": rows,
    }


def _git_state() -> dict[str, Any]:
    """The commit the run measured, and whether speq/ or bench/ had uncommitted changes."""
    root = Path(__file__).resolve().parent.parent

    def git(*cmd: str) -> str:
        try:
            return subprocess.run(
                ["git", *cmd], cwd=root, capture_output=True, text=True, check=True
            ).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return ""

    dirty = git("status", "--porcelain", "--", "speq", "bench/bench_e2e.py")
    return {"commit": git("rev-parse", "HEAD") or None, "uncommitted": dirty.splitlines()}


# ---------------------------------------------------------------- report


def describe(s: dict) -> str:
    """One line on a setting's outcome, every number with its unit."""
    g = s["goal_speedup"]
    goal = (
        f"2.34x goal {'met' if g['met'] else 'missed'}"
        if g["applies"]
        else f"2.34x goal n/a (resident speq is {s['resident_speq_speedup_over_best_baseline']:.2f}x)"
    )
    return (
        f"{s['budget']} budget, {s['link']}: speq {s['tpot_ms'][SPEQ]:.1f} ms/token "
        f"({_k_cell(s)}), {s['speedup_over_best_baseline']:.2f}x over {s['best_baseline']} "
        f"({s['tpot_ms'][s['best_baseline']]:.1f} ms/token); speq / perfect "
        f"{s['speq_over_perfect']:.2f}, speq / resident {s['speq_over_resident_speq']:.2f}; "
        f"{goal}; 0.9-of-perfect goal {'met' if s['goal_perfect']['met'] else 'missed'}"
        + ("" if s["identical_to_resident"] else "; TOKENS DIFFER FROM RESIDENT")
    )


def _k_cell(s: dict) -> str:
    if s["uses_draft"]:
        return f"k* = {s['k_star']}"
    switched = s.get("switched_to_draft_after") or {}
    if not switched:
        return "no draft"
    after = sorted(switched.values())
    when = f"{after[0]}" if after[0] == after[-1] else f"{after[0]}-{after[-1]}"
    return f"no draft; drafts after {when} tokens on {len(after)} of {s['prompts_run']} prompts"


def _goal_cells(s: dict) -> tuple[str, str]:
    g = s["goal_speedup"]
    speed = ("met" if g["met"] else "missed") if g["applies"] else "n/a"
    return speed, "met" if s["goal_perfect"]["met"] else "missed"


def summary_table(report: dict) -> str:
    """Markdown: one line per setting, the speed-up, the bound ratios and the goals."""
    headers = [
        "budget",
        "link",
        "speq's choice",
        "speq TPOT (ms)",
        "best baseline, TPOT (ms)",
        "speq speed-up",
        "resident speq's speed-up",
        "speq / perfect",
        "speq / resident",
        "2.34x goal",
        "0.9 goal",
        "same tokens",
    ]
    rows = []
    for s in report["summary"]:
        speed, perfect = _goal_cells(s)
        best = s["best_baseline"]
        rows.append(
            [
                f"{s['budget']} ({s['budget_fraction']:g})",
                f"{s['link']}",
                _k_cell(s),
                f"{s['tpot_ms'][SPEQ]:.1f}",
                f"{best}, {s['tpot_ms'][best]:.1f}",
                f"{s['speedup_over_best_baseline']:.2f}x",
                f"{s['resident_speq_speedup_over_best_baseline']:.2f}x",
                f"{s['speq_over_perfect']:.2f}",
                f"{s['speq_over_resident_speq']:.2f}",
                speed,
                perfect,
                "yes" if s["identical_to_resident"] else "NO",
            ]
        )
    return markdown_table(rows, headers)


def tpot_table(report: dict) -> str:
    """Markdown: every contender's TPOT (ms) per setting."""
    headers = ["budget", "link", *(f"{SHORT[c]} (ms)" for c in ORDER)]
    rows = [
        [f"{s['budget']}", f"{s['link']}", *(f"{s['tpot_ms'][c]:.1f}" for c in ORDER)]
        for s in report["summary"]
    ]
    return markdown_table(rows, headers)


def detail_table(report: dict) -> str:
    """Markdown: every contender of every setting with its cache and speculation metrics."""

    def f(x, spec=".2f"):
        return "-" if x is None else format(x, spec)

    headers = [
        "budget",
        "link",
        "contender",
        "k",
        "expert slots",
        "TPOT (ms)",
        "hit rate",
        "covered rate",
        "token hit rate",
        "stalls / token",
        "MB moved / run",
        "stall (ms / run)",
        "acceptance",
        "tokens / cycle",
        "ELB recall",
        "ELB precision",
        "same tokens",
    ]
    rows = []
    for r in report["rows"]:
        k = r["k"] if r["k"] is not None else (f"k*={r['k_star']}" if r["k_star"] else "-")
        rows.append(
            [
                f"{r['budget']}",
                f"{r['link']}",
                f"{r['contender']}",
                f"{k}",
                f"{r['cache_slots']}",
                f"{r['tpot_ms']:.1f}",
                f(r["mean_hit_rate"]),
                f(r["mean_covered_rate"]),
                f(r["mean_token_hit_rate"]),
                f(r["mean_stalls_per_token"]),
                f(r["mean_mb_moved"], ".1f"),
                f(r["mean_stall_ms"], ".0f"),
                f(r["mean_acceptance_rate"]),
                f(r["mean_tokens_per_cycle"]),
                f(r["mean_elb_recall"]),
                f(r["mean_elb_precision"]),
                "yes" if r["identical_to_resident"] else "NO",
            ]
        )
    return markdown_table(rows, headers)


def how_measured(report: dict) -> str:
    """One sentence on how the numbers were taken."""
    s = report["setting"]
    links = ", ".join(
        f"{name} {v['link_gbps'] * 1e3:.1f} MB/s ({v['ratio']:.1f} layer-times per expert copy)"
        for name, v in s["links"].items()
    )
    ns = sorted({p["tokens"] for p in s["prompts"]})
    counted = (
        "in bfloat16 as on a GPU while compute stays float64"
        if s["memory_counted_as"] == "bfloat16"
        else "in float64, the compute dtype"
    )
    domains = sorted({p["domain"] for p in s["prompts"]})
    return (
        f"Measured with `python bench/bench_e2e.py` on a 2-core CPU, no GPU: cpu backend, "
        f"{s['model']} in {s['dtype']}, {s['new_tokens']} new tokens after each of "
        f"{len(s['prompts'])} held-out prompts ({ns[0]}-{ns[-1]} tokens; {', '.join(domains)}), "
        + (
            f"median of {s['repeats']} interleaved runs per prompt"
            if s["repeats"] > 1
            else "one run per prompt (contenders interleaved)"
        )
        + ", geometric mean over the prompts; "
        f"the host -> device link is emulated and calibrated so one expert copy costs as many "
        f"decode-layer times as a {s['reference_model']} expert on an A100 over PCIe 3.0 / 4.0 / "
        f"5.0 (8 / 16 / 32 GB/s): {links}. Budgets are fractions of all expert bytes beyond the "
        f"non-expert weights and KV cache, every size counted {counted}; speq's INT4 draft "
        f"takes {s['draft_share_of_expert_bytes']:.0%} of the expert bytes out of the same "
        f"budget. speq's governor chooses k* or no draft (then one token per pass, the draft's "
        f"memory as expert cache; a run that copies more experts than the governor's calibration "
        f"foresaw brings the draft back mid-run when that is predicted to pay off). speq / perfect = TPOT with perfect expert prediction over "
        f"speq's; speq / resident = TPOT of speq at the same k with every expert resident (without "
        f"a draft: resident decoding) over speq's; speed-ups are over the faster of ondemand and "
        f"nextgate in the same memory. Every run's tokens are compared with the all-resident "
        f"greedy output (last column)."
    )


def markdown(report: dict, detail: bool = True) -> str:
    parts = [how_measured(report), summary_table(report), "TPOT per contender:", tpot_table(report)]
    if detail:
        parts += ["Every contender (means over the prompts):", detail_table(report)]
    return "\n\n".join(parts) + "\n"


def plot(report: dict, path: Path) -> None:
    """TPOT per contender grouped by budget, one panel per link (log scale); speq's speed-up
    over the best baseline written above its bar."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = report["summary"]
    links = list(dict.fromkeys(s["link"] for s in summary))
    budgets = list(dict.fromkeys(s["budget"] for s in summary))
    fig, axes = plt.subplots(
        1, len(links), figsize=(max(9.0, 4.4 * len(links)), 4.8), sharey=True, squeeze=False
    )
    colors = plt.get_cmap("tab10").colors
    width = 0.8 / len(ORDER)
    for ax, link in zip(axes[0], links):
        for i, c in enumerate(ORDER):
            xs, ys = [], []
            for j, b in enumerate(budgets):
                s = next(s for s in summary if s["link"] == link and s["budget"] == b)
                xs.append(j + (i - (len(ORDER) - 1) / 2) * width)
                ys.append(s["tpot_ms"][c])
                if c == SPEQ:
                    ax.annotate(
                        f"{s['speedup_over_best_baseline']:.2f}x",
                        (xs[-1], ys[-1]),
                        textcoords="offset points",
                        xytext=(0, 3),
                        ha="center",
                        fontsize=7,
                    )
            ax.bar(xs, ys, width, label=SHORT[c], color=colors[i % len(colors)])
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xticks(range(len(budgets)))
        ax.set_xticklabels([f"{b}\n{report['setting']['budgets'][b]:g}" for b in budgets])
        ax.set_xlabel("budget (fraction of all expert bytes)", fontsize=8)
        ax.set_title(f"A100 compute, {link} link (emulated)", fontsize=10)
        ax.grid(axis="y", alpha=0.3, which="both")
    axes[0][0].set_ylabel("TPOT (ms per token, log scale)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=8, fontsize=8, frameon=False)
    s = report["setting"]
    fig.suptitle(
        f"speq vs baselines, demo MoE on the cpu backend ({s['new_tokens']} tokens, "
        f"{len(s['prompts'])} held-out prompts, median of {s['repeats']} runs); "
        f"above speq's bar: its speed-up over the best same-memory baseline",
        fontsize=9,
    )
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------- command line


def _names(allowed: dict):
    def parse(text: str) -> list[str]:
        names = [x.strip() for x in text.split(",") if x.strip()]
        bad = [n for n in names if n not in allowed]
        if bad or not names:
            raise argparse.ArgumentTypeError(f"{bad or text!r}: expected some of {list(allowed)}")
        return names

    return parse


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--budgets", type=_names(BUDGETS), default=list(BUDGETS))
    p.add_argument("--links", type=_names(LINKS), default=list(LINKS))
    p.add_argument(
        "--domains",
        type=lambda s: [x.strip() for x in s.split(",") if x.strip()],
        default=["kjv", "fortunes", "python_docs"],
        help="held-out prompt domains: kjv, fortunes, python_docs, perl_docs",
    )
    p.add_argument("--prompts-per-domain", type=int, default=1, help="1 or 2")
    p.add_argument(
        "--count-memory-as",
        choices=list(MEMORY_DTYPES),
        default="bfloat16",
        help="the dtype the device budget counts weights, KV cache and experts in (compute is "
        "float64 either way); bfloat16 splits the memory as on a GPU, where the INT4 draft is "
        "about a quarter of the expert bytes",
    )
    p.add_argument("--tokens", type=int, default=32, help="new tokens per run")
    p.add_argument("--repeats", type=int, default=1, help="runs per (contender, prompt)")
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: by default the generous budget, pcie5, one prompt, one repeat, 4 tokens, "
        "written to the temp folder (other flags still apply)",
    )
    p.add_argument("--out", default=None, help="the JSON path (default bench/results/e2e_cpu.json)")
    p.add_argument(
        "--check", action="store_true", help="exit 1 if any run's tokens differ from resident"
    )
    if p.parse_known_args(argv)[0].quick:
        p.set_defaults(budgets=["generous"], links=["pcie5"], domains=["kjv"], repeats=1, tokens=4)
    args = p.parse_args(argv)
    if args.out is None:
        folder = Path(tempfile.gettempdir()) if args.quick else RESULTS
        args.out = str(folder / ("e2e_quick.json" if args.quick else "e2e_cpu.json"))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report = run(args)
    path = write_json(Path(args.out), report)
    md = path.with_suffix(".md")
    md.write_text(markdown(report))
    png = path.with_suffix(".png")
    plot(report, png)
    print(how_measured(report))
    print()
    print(summary_table(report))
    print()
    print(tpot_table(report))
    print(f"\nwrote {path}, {md}, {png} ({report['setting']['wall_s']:.0f} s wall)")
    same = all(s["identical_to_resident"] for s in report["summary"])
    if not same:
        print("SOME RUNS' TOKENS DIFFER FROM THE RESIDENT GREEDY OUTPUT (see 'same tokens')")
    return 1 if args.check and not same else 0


if __name__ == "__main__":
    sys.exit(main())
