"""End to end: speq against every baseline, over budgets, links and held-out prompts, in rounds.

The matrix: device budgets tight / medium / generous (0.375 / 0.5 / 0.75 of all expert bytes,
beyond the non-expert weights and the KV cache; speq's INT4 draft experts come out of the same
budget)
x links matching an A100's compute over PCIe 3.0 / 4.0 / 5.0 (profiles a100-40g-pcie3/4/5:
8 / 16 / 32 GB/s) x prompts from the held-out split of the demo model's corpus
(bench/prompts/heldout.json). The model computes in float64 (outputs compare exactly), but the
budget counts every size in bfloat16 (CompileOptions.memory_dtype; --count-memory-as), as the
memory would split on a GPU: there the INT4 draft is about a quarter of the expert bytes, in
float64 only a sixteenth. In every (budget, link) setting these run, each compiled once:

    speq (governor)            policy="speq", k=None, the defaults: each expert held once, at
                               full precision while cached and as INT4 otherwise
                               (draft_memory="shared"); the governor calibrates on a held-out
                               calibration prompt that is not measured (CompiledModel.calibrate)
                               and picks k*, or no draft at all (then one token per pass with
                               the draft's memory as expert cache, ondemand's or fiddler's
                               policy, whichever the calibration measured faster); a miss is
                               computed on the host where the cost model says that is faster
    speq (no host compute)     the same with host_compute=False: every miss is copied
    speq (separate draft)      the same with draft_memory="separate": the draft's INT4 copy of
                               every expert beside the cache (a dropped draft comes back
                               mid-run when a run misses enough)
    speq (perfect prediction)  speq (separate draft), but the ELB (Expert Lookahead Buffer: the
                               experts the draft predicts verification will need) holds exactly
                               the experts each verification window routes to, rejected drafts
                               included, from a speculative recording pass that is not timed:
                               the best any expert predictor can do (a bound). It needs the
                               separate draft: a shared draft's tokens depend on which copies
                               have landed, so a run need not follow the recorded windows
    speq (resident, k=k*)      speq at the governed k*, every expert resident: the compute side
                               (resident decoding where the governor dropped the draft)
    ondemand                   LRU cache, fetch on miss, the same budget        (a baseline)
    nextgate                   ondemand + prefetch the next layer's gate pick    (a baseline)
    fiddler                    slots filled at load, misses computed on the host where faster
                               than a copy (Fiddler)                            (a baseline)
    hostcompute                every routed expert computed on the host, no slots (llama.cpp
                               --n-cpu-moe, KTransformers)                       (a baseline)
    oracle (Belady)            Belady's fetches from a recording pass that is not timed: the I/O
                               bound, no baseline
    ondemand (speq's cache)    ondemand with the budget minus the bytes of speq's INT4 slots
    resident (no budget)       every expert resident, one token per step

Rounds: round r runs, for every prompt, every contender once greedily (in the order above) and
then speq and every baseline once sampled (temperature 0.7, top-p 0.9, a fixed seed per
prompt, the same in every round); round r + 1 starts after. Per round a contender's TPOT (wall
ms per new token, decode only) is the geometric mean over the prompts, and every ratio is taken
within the round (each round's ratio from that round's runs); reported are the median over the
rounds and the spread (min-max). A speed-up whose spread includes 1.0 is "no difference". Where
speq's governor chose no draft and no run switched to it, speq and perfect prediction run a
baseline's policy (fiddler's; ondemand's without host compute): the speed-up, speq / perfect
and the goals are then "not applicable (no draft)" and never counted as met. Greedy runs are compared token for token with
the all-resident greedy output; sampled runs (speculative sampling is lossless in distribution,
not token for token) record TPOT and acceptance only. Greedy acceptance is inflated where the
demo model's greedy text repeats itself; the sampled acceptance is the one to read.

Timing is on the ``cpu`` backend: this machine's compute, and a host -> device link emulated by
a copy thread whose bandwidth is calibrated once per link profile (speq.compare.calibrate_link) so
that one expert copy costs as many decode-layer times here as a Phi-3.5-MoE expert costs on the
A100 over that link. The governor's calibration time is reported on its own ("calibration (s)";
it is outside TPOT).

Writes e2e_cpu.json, e2e_cpu.md and e2e_cpu.png under bench/results/ (--out names the JSON; the
others sit beside it) and prints the tables. bench/update_readme.py renders the JSON into
README.md and docs/RESULTS.md.

    python bench/bench_e2e.py [--budgets tight,medium,generous] [--links pcie3,pcie4,pcie5]
        [--domains kjv,python_docs] [--prompts-per-domain 1] [--calibration-prompt ID]
        [--tokens 32] [--rounds 3] [--model FOLDER] [--out bench/results/e2e_cpu.json] [--check]
        [--quick]

Wall time on this project's 2-core CPU machine: this protocol does 2.75x the runs of the previous
one (3 prompts, one greedy run each), so by default it measures 2 prompts instead of 3 (the Bible
and the Python docs; calibrated on fortunes-1). One tight/pcie3 setting (the slowest), one prompt,
one round took 95 s on an idle machine, which puts the default at about 35 minutes idle and 90-100
minutes under the load the previous runs met (they took 32-36 minutes). Time grows about linearly
with --tokens, --rounds and the prompts (--domains kjv,fortunes,python_docs: half as long again;
the calibration prompt is then perl_docs-0); the PCIe 3.0 settings are about half of it. --quick
(generous budget, pcie5, one prompt, 3 rounds, 4 tokens) takes about 35 s.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from bench_kernels import draft_pass_ratio
from common import (
    FORMAT,
    NO_DIFFERENCE,
    NOT_APPLICABLE,
    RESULTS,
    UNTIMED_RECORDING,
    bench_model,
    calibration_prompt,
    describe_code,
    environment,
    fmt_ratio,
    fmt_speedup,
    git_state,
    goal,
    includes_one,
    interleaved,
    load_prompts,
    markdown_table,
    median_index,
    spread,
    write_json,
)
from tqdm import tqdm

import speq
from speq.compare import budget_bytes, calibrate_link, contenders, link_options

BUDGETS = {"tight": 0.375, "medium": 0.5, "generous": 0.75}
LINKS = {"pcie3": "a100-40g-pcie3", "pcie4": "a100-40g-pcie4", "pcie5": "a100-40g-pcie5"}
MEMORY_DTYPES = {"bfloat16": torch.bfloat16, "float64": None}  # None: the compute dtype
REFERENCE = "phi-3.5-moe"  # the model whose expert : layer time ratio the link reproduces
DEFAULT_DOMAINS = ["kjv", "python_docs"]  # the previous protocol's three less fortunes
PREVIOUS_PROMPTS = 3
GOAL_SPEEDUP = 2.34  # over the best same-memory baseline, where resident speq is that far ahead
GOAL_PERFECT = 0.9  # TPOT_perfect / TPOT_speq
SAMPLING = {"temperature": 0.7, "top_p": 0.9}
SEED = 1000  # prompt i samples with seed SEED + i, in every round and under every contender
HEADLINE_LINK = "pcie4"

SPEQ = "speq (governor)"
SPEQ_NO_HOST = "speq (no host compute)"
SPEQ_SEPARATE = "speq (separate draft)"
PERFECT = "speq (perfect prediction)"
SPEQ_RESIDENT = "speq (resident, k=k*)"
ONDEMAND, NEXTGATE, BELADY = "ondemand", "nextgate", "oracle (Belady)"
FIDDLER, HOSTCOMPUTE = "fiddler", "hostcompute"
ONDEMAND_SAME, RESIDENT = "ondemand (speq's cache)", "resident (no budget)"
ORDER = (
    SPEQ,
    SPEQ_NO_HOST,
    SPEQ_SEPARATE,
    PERFECT,
    SPEQ_RESIDENT,
    ONDEMAND,
    NEXTGATE,
    FIDDLER,
    HOSTCOMPUTE,
    BELADY,
    ONDEMAND_SAME,
    RESIDENT,
)
# "best baseline" = the fastest of these in the same memory
BASELINES = (ONDEMAND, NEXTGATE, FIDDLER, HOSTCOMPUTE)
SAMPLED = (SPEQ, *BASELINES)  # also run sampled, after the greedy runs of each prompt
GOVERNED = (SPEQ, SPEQ_NO_HOST, SPEQ_SEPARATE, PERFECT)  # calibrated on the calibration prompt
SHORT = {  # column headers of the TPOT table
    SPEQ: "speq",
    SPEQ_NO_HOST: "speq, no host",
    SPEQ_SEPARATE: "speq, separate draft",
    PERFECT: "speq, perfect pred. (separate draft)",
    SPEQ_RESIDENT: "speq, resident",
    ONDEMAND: "ondemand",
    NEXTGATE: "nextgate",
    FIDDLER: "fiddler",
    HOSTCOMPUTE: "hostcompute",
    BELADY: "oracle (Belady)",
    ONDEMAND_SAME: "ondemand, speq's cache",
    RESIDENT: "resident",
}
AGGREGATE = (
    "per (setting, round, contender): geometric mean of the TPOT over the prompts; every ratio "
    "is taken within a round from that round's geometric means (the best baseline is the fastest "
    "of ondemand, nextgate, fiddler and hostcompute in that round); reported: the median over "
    "the rounds and the spread (min-max)"
)
RUN_ORDER = (
    "for each round, for each prompt: every contender once greedily (in ORDER), then speq and "
    "every baseline once sampled; round r + 1 starts after round r"
)
RUN_METRICS = (
    "hit_rate",
    "covered_rate",
    "token_hit_rate",
    "stalls_per_token",
    "stall_ms",
    "acceptance_rate",
    "tokens_per_cycle",
    "cycles",
    "k_per_cycle",
    "elb_recall",
    "elb_precision",
    "verify_hit_rate",
    "verify_covered_rate",
    "switched_to_draft_after",
    "calibration_s",
    "cache_slots",
    "full_precision_slots",
    "demotions",
)
MEAN_METRICS = (
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
    "full_precision_slots",
    "demotions",
)


@dataclass(frozen=True)
class Prompt:
    id: str
    domain: str
    text: str
    source: str
    ids: torch.Tensor  # [1, T]

    @classmethod
    def of(cls, p: dict, tokenizer) -> Prompt:
        return cls(
            p["id"],
            p["domain"],
            p["text"],
            p["source"],
            torch.tensor([tokenizer.encode(p["text"])]),
        )

    def record(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "domain": self.domain,
            "text": self.text,
            "source": self.source,
            "tokens": int(self.ids.shape[1]),
        }


def select_prompts(domains: list[str], per_domain: int) -> list[dict]:
    """The first ``per_domain`` held-out prompts of each domain in ``domains``."""
    data = load_prompts()
    known = sorted({p["domain"] for p in data})
    unknown = [d for d in domains if d not in known]
    if unknown:
        raise SystemExit(f"unknown domain(s) {unknown}; bench/prompts/heldout.json has {known}")
    return [p for d in domains for p in [p for p in data if p["domain"] == d][:per_domain]]


def geomean(xs) -> float:
    return statistics.geometric_mean(list(xs))


def compile_setting(model, budget: int, link: dict) -> dict[str, speq.CompiledModel]:
    """Every contender of one (budget, link) setting but speq (resident), compiled."""
    governed = speq.CompileOptions(policy="speq", device_memory=budget, **link)
    no_host = dataclasses.replace(governed, host_compute=False)
    separate = dataclasses.replace(governed, draft_memory="separate")
    perfect = dataclasses.replace(separate, predictor="oracle")  # needs the separate draft
    out = {SPEQ: speq.compile(model, governed), PERFECT: speq.compile(model, perfect)}
    out[SPEQ_NO_HOST] = speq.compile(model, no_host)
    out[SPEQ_SEPARATE] = speq.compile(model, separate)
    named = {"oracle": BELADY}  # compare.contenders' labels, renamed where this table says more
    for c in contenders(model, budget, link, ks=()):  # ondemand (speq's cache): minus the draft
        out[named.get(c.label, c.label)] = speq.compile(model, c.options)
    return out


def compile_resident_speq(model, governed: speq.CompiledModel, link: dict) -> speq.CompiledModel:
    """speq's compute side: speq at the governed k* with every expert resident; where the
    governor dropped the draft (one token per pass), resident decoding. Compiled after the
    governed speq's calibration, which settles both."""
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


def run_record(m, same: bool | None) -> dict[str, Any]:
    """What one run keeps: its TPOT, whether its tokens equal resident's (greedy; None for a
    sampled run), the calibration behind it and the cache and speculation metrics."""
    return {
        "tpot_ms": m.tpot_ms,
        "identical_to_resident": same,
        "mb_moved": m.bytes_moved / 1e6,
        **{key: m[key] for key in RUN_METRICS},
    }


def drafted(run: dict) -> bool:
    """Whether a run drafted at all (from its start, or after a mid-run switch)."""
    return bool(run.get("cycles")) or run.get("switched_to_draft_after") is not None


def _mean(vals) -> float | None:
    vals = [v for v in vals if v is not None]
    return statistics.fmean(vals) if vals else None


def run_setting(
    model,
    budget_name: str,
    fraction: float,
    link_name: str,
    cal,
    resident: speq.CompiledModel,
    prompts: list[Prompt],
    calib: Prompt,
    expected: dict[str, torch.Tensor],
    args: argparse.Namespace,
) -> tuple[list[dict], dict]:
    """Compile every contender once, calibrate the governed ones on ``calib``, run them all in
    interleaved rounds; return the contenders' rows and the setting's summary."""
    budget = budget_bytes(resident, fraction)
    where = f"{budget_name} budget ({fraction:g} of expert bytes), {link_name}"
    link = {**link_options(cal), "memory_dtype": resident.options.memory_dtype}
    t0 = time.perf_counter()
    cms = compile_setting(model, budget, link)
    at_compile = {label: cms[label].governed.describe() for label in GOVERNED}
    calibrate_wall = {}
    for label in GOVERNED:  # on held-out text that is not measured
        t1 = time.perf_counter()
        cms[label].calibrate(calib.ids)
        calibrate_wall[label] = time.perf_counter() - t1
    cms[SPEQ_RESIDENT] = compile_resident_speq(model, cms[SPEQ], link)
    tqdm.write(
        f"{where}: compiled and calibrated on {calib.id} in {time.perf_counter() - t0:.1f} s; the "
        f"governor chose {_choice(cms[SPEQ])} (perfect prediction: {_choice(cms[PERFECT])})",
        file=sys.stderr,
    )
    seeds = {p.id: SEED + i for i, p in enumerate(prompts)}
    by_id = {p.id: p for p in prompts}
    keys = [
        k
        for p in prompts
        for k in [*((p.id, "greedy", c) for c in ORDER), *((p.id, "sampled", c) for c in SAMPLED)]
    ]
    bar = tqdm(
        total=args.rounds * len(keys) * args.tokens,
        desc=f"{budget_name}/{link_name}",
        unit="tok",
        file=sys.stderr,
        leave=False,
    )

    def one(r: int, key: tuple[str, str, str]) -> dict:
        pid, mode, label = key
        bar.set_postfix_str(f"round {r + 1}, {pid}, {mode}, {label}")
        cm, p = cms[label], by_id[pid]
        tick = lambda _: bar.update(1)
        if mode == "greedy":
            out = cm.generate(p.ids, args.tokens, callback=tick)
            return run_record(cm.metrics, bool(torch.equal(out, expected[pid])))
        cm.generate(p.ids, args.tokens, do_sample=True, seed=seeds[pid], callback=tick, **SAMPLING)
        return run_record(cm.metrics, None)

    results = interleaved(args.rounds, keys, one)
    bar.close()

    # runs[mode][label][pid] = one record per round
    runs: dict[str, dict[str, dict[str, list[dict]]]] = {"greedy": {}, "sampled": {}}
    for per_round in results:
        for (pid, mode, label), rec in per_round.items():
            runs[mode].setdefault(label, {}).setdefault(pid, []).append(rec)
    rounds = [
        {
            mode: {
                label: geomean(runs[mode][label][p.id][r]["tpot_ms"] for p in prompts)
                for label in labels
            }
            for mode, labels in (("greedy", ORDER), ("sampled", SAMPLED))
        }
        for r in range(args.rounds)
    ]

    rows = []
    for label in ORDER:
        cm = cms[label]
        o = cm.options
        greedy = runs["greedy"][label]
        sampled = runs["sampled"].get(label)
        typical = {pid: rs[median_index([x["tpot_ms"] for x in rs])] for pid, rs in greedy.items()}
        all_greedy = [x for rs in greedy.values() for x in rs]
        all_sampled = [x for rs in (sampled or {}).values() for x in rs]
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
                "calibration_prompt": calib.id if label in GOVERNED else None,
                "calibrate_wall_s": calibrate_wall.get(label),
                "calibration_s": spread(
                    [x["calibration_s"] for x in all_greedy + all_sampled], key="runs"
                ),
                "tpot_ms": spread([rd["greedy"][label] for rd in rounds]),
                "tpot_ms_sampled": (
                    spread([rd["sampled"][label] for rd in rounds]) if sampled else None
                ),
                "identical_to_resident": all(x["identical_to_resident"] for x in all_greedy),
                "drafted_runs": {
                    "greedy": sum(map(drafted, all_greedy)),
                    "sampled": sum(map(drafted, all_sampled)) if sampled else None,
                    "of": len(all_greedy),
                },
                "acceptance": {
                    "greedy": spread([x["acceptance_rate"] for x in all_greedy], key="runs"),
                    "sampled": spread([x["acceptance_rate"] for x in all_sampled], key="runs"),
                },
                **{f"mean_{key}": _mean(x[key] for x in typical.values()) for key in MEAN_METRICS},
                "runs": {"greedy": greedy, "sampled": sampled},
            }
        )
    by = {r["contender"]: r for r in rows}
    summary = summarize_setting(
        rounds,
        speq_drafted=by[SPEQ]["drafted_runs"]["greedy"] > 0,
        perfect_drafted=by[PERFECT]["drafted_runs"]["greedy"] > 0,
        sampled_drafted=(by[SPEQ]["drafted_runs"]["sampled"] or 0) > 0,
    )
    switched = {
        f"{pid}, {mode} round {r + 1}": x["switched_to_draft_after"]
        for mode in ("greedy", "sampled")
        for pid, rs in runs[mode][SPEQ].items()
        for r, x in enumerate(rs)
        if x["switched_to_draft_after"] is not None
    }
    summary = {
        "budget": budget_name,
        "budget_fraction": fraction,
        "budget_bytes": budget,
        "link": link_name,
        "profile": cal.profile,
        "k_star": by[SPEQ]["k_star"],
        "uses_draft": by[SPEQ]["uses_draft"],
        "k_star_perfect": by[PERFECT]["k_star"],
        "perfect_uses_draft": by[PERFECT]["uses_draft"],
        "switched_to_draft_after": switched,
        "drafted_runs": by[SPEQ]["drafted_runs"],
        "prompts_run": len(prompts),
        "rounds_run": args.rounds,
        "calibration_prompt": calib.id,
        "calibration_s": {label: by[label]["calibration_s"] for label in GOVERNED},
        "acceptance": by[SPEQ]["acceptance"],
        "draft_memory": {  # one copy per expert (shared) against a separate draft
            label: {
                "cache_slots": by[label]["cache_slots"],
                "full_precision_slots": by[label]["mean_full_precision_slots"],
                "uses_draft": by[label]["uses_draft"],
                "k_star": by[label]["k_star"],
                "acceptance": by[label]["acceptance"]["greedy"],
                "demotions": by[label]["mean_demotions"],
            }
            for label in (SPEQ_SEPARATE, SPEQ)
        },
        "tpot_ms": {label: by[label]["tpot_ms"] for label in ORDER},
        "tpot_ms_sampled": {label: by[label]["tpot_ms_sampled"] for label in SAMPLED},
        **summary,
        "identical_to_resident": all(r["identical_to_resident"] for r in rows),
        "per_prompt": per_prompt_ratios(runs, prompts),
    }
    return rows, summary


def summarize_setting(
    rounds: list[dict[str, dict[str, float]]],
    *,
    speq_drafted: bool,
    perfect_drafted: bool,
    sampled_drafted: bool,
) -> dict[str, Any]:
    """From each round's TPOT per contender ({"greedy": {contender: ms}, "sampled": {...}}): the
    rounds, the ratios (each round's from that round's TPOTs; median and spread), what applies
    and the goals. ``speq_drafted``: whether any greedy speq run drafted (if none did, speq ran
    plain LRU like ondemand, and perfect prediction did too unless ``perfect_drafted``)."""

    def per_round(fn, mode: str = "greedy") -> dict | None:
        vals = [fn(rd[mode]) for rd in rounds if rd.get(mode)]
        return spread(vals)

    best = lambda t: min(t[b] for b in BASELINES)
    ratios = {
        "speedup_over_best_baseline": per_round(lambda t: best(t) / t[SPEQ]),
        "resident_speq_speedup_over_best_baseline": per_round(lambda t: best(t) / t[SPEQ_RESIDENT]),
        "speq_over_perfect": per_round(lambda t: t[PERFECT] / t[SPEQ]),
        "speq_over_resident_speq": per_round(lambda t: t[SPEQ_RESIDENT] / t[SPEQ]),
        "speedup_over_ondemand": per_round(lambda t: t[ONDEMAND] / t[SPEQ]),
        "speedup_over_ondemand_same_cache": per_round(lambda t: t[ONDEMAND_SAME] / t[SPEQ]),
        "speedup_over_belady": per_round(lambda t: t[BELADY] / t[SPEQ]),
        "speedup_over_no_host": per_round(lambda t: t[SPEQ_NO_HOST] / t[SPEQ]),
        "shared_speedup_over_separate": per_round(lambda t: t[SPEQ_SEPARATE] / t[SPEQ]),
    }
    sampled = {
        "speedup_over_best_baseline": per_round(lambda t: best(t) / t[SPEQ], "sampled"),
        "speedup_over_ondemand": per_round(lambda t: t[ONDEMAND] / t[SPEQ], "sampled"),
    }
    applies = {  # ratios between contenders that ran different policies
        "speedup_over_best_baseline": speq_drafted,
        "speedup_over_ondemand": speq_drafted,
        "speq_over_perfect": speq_drafted or perfect_drafted,
        "speedup_over_best_baseline_sampled": sampled_drafted,
    }
    median_tpot = {b: statistics.median(rd["greedy"][b] for rd in rounds) for b in BASELINES}
    resident = ratios["resident_speq_speedup_over_best_baseline"]
    reachable = resident is not None and resident["median"] >= GOAL_SPEEDUP

    def speed_goal(s: dict | None, did_draft: bool) -> dict:
        if did_draft and not reachable:
            return {
                "target": GOAL_SPEEDUP,
                "applies": False,
                "met": None,
                "verdict": f"out of reach (resident speq {resident['median']:.2f}x)",
            }
        return goal(s, GOAL_SPEEDUP, did_draft)

    return {
        "rounds": rounds,
        "best_baseline": min(BASELINES, key=median_tpot.__getitem__),
        "ratios": ratios,
        "ratios_sampled": sampled,
        "applies": applies,
        "policies_differ": speq_drafted,
        "goal_speedup": speed_goal(ratios["speedup_over_best_baseline"], speq_drafted),
        "goal_speedup_sampled": speed_goal(sampled["speedup_over_best_baseline"], sampled_drafted),
        "goal_perfect": goal(
            ratios["speq_over_perfect"], GOAL_PERFECT, applies["speq_over_perfect"]
        ),
    }


def per_prompt_ratios(runs: dict, prompts: list[Prompt]) -> dict[str, dict]:
    """Per prompt: speq's greedy and sampled speed-up over the best baseline, each round's from
    that round's runs (median and spread)."""
    out = {}
    for p in prompts:
        row = {}
        for mode in ("greedy", "sampled"):
            t = {c: [x["tpot_ms"] for x in runs[mode][c][p.id]] for c in (SPEQ, *BASELINES)}
            row[f"speedup_over_best_baseline_{mode}"] = spread(
                [min(t[b][r] for b in BASELINES) / s for r, s in enumerate(t[SPEQ])]
            )
        out[p.id] = row
    return out


def run(args: argparse.Namespace) -> dict:
    t_start = time.perf_counter()
    code = git_state()  # at the start: the code this process imports
    model, tokenizer, what = bench_model(args.model)  # float64: batch-invariant argmax
    cfg = model.config
    chosen = select_prompts(args.domains, args.prompts_per_domain)
    prompts = [Prompt.of(p, tokenizer) for p in chosen]
    calib = Prompt.of(calibration_prompt(chosen, args.calibration_prompt), tokenizer)
    memory_dtype = MEMORY_DTYPES[args.count_memory_as]
    resident = speq.compile(model, speq.CompileOptions(memory_dtype=memory_dtype))
    separate = speq.CompileOptions(policy="speq", k=1, draft_memory="separate")
    draft_bytes = speq.compile(model, separate).draft_bytes  # an INT4 copy of every expert
    expert_bytes = resident.memory.expert_bytes * len(resident.store.keys())
    expected = {p.id: resident.generate(p.ids, args.tokens) for p in prompts}
    cals = {}
    for name in tqdm(args.links, desc="calibrate links", file=sys.stderr, leave=False):
        cals[name] = calibrate_link(resident, calib.ids, reference=REFERENCE, profile=LINKS[name])
        tqdm.write(f"{name}: {cals[name].describe()}", file=sys.stderr)

    draft_pass = draft_pass_ratio(args.rounds)
    rows, summary = [], []
    settings = [(b, link) for b in args.budgets for link in args.links]
    for b, link in tqdm(settings, desc="settings", unit="setting", file=sys.stderr):
        r, s = run_setting(
            model, b, BUDGETS[b], link, cals[link], resident, prompts, calib, expected, args
        )
        rows += r
        summary.append(s)
        tqdm.write(describe(s), file=sys.stderr)
    return {
        "format": FORMAT,
        "setting": {
            "model": f"{what} ({cfg.num_layers} layers, {cfg.num_experts} experts "
            f"top-{cfg.top_k}, hidden {cfg.hidden_size}"
            f"{'; docs/MODEL_CARD.md' if args.model is None else ''})",
            "dtype": "float64",
            "backend": "cpu, emulated link, wall clock",
            "new_tokens": args.tokens,
            "rounds": args.rounds,
            "budgets": {b: BUDGETS[b] for b in args.budgets},
            "budget_convention": "fraction of all expert bytes, beyond non-expert weights + KV "
            "cache; the same total device memory for every contender but the resident ones",
            "memory_counted_as": args.count_memory_as,
            "expert_bytes_counted": expert_bytes,
            "draft_bytes": draft_bytes,
            "draft_share_of_expert_bytes": draft_bytes / expert_bytes,
            "draft_pass": draft_pass,
            "links": {
                name: {**cals[name].__dict__, "description": cals[name].describe()}
                for name in args.links
            },
            "link_calibrated_on": calib.id,
            "reference_model": REFERENCE,
            "prompts": [
                {
                    **p.record(),
                    "resident_output": tokenizer.decode(
                        expected[p.id][0, p.ids.shape[1] :].tolist()
                    ),
                }
                for p in prompts
            ],
            "fewer_prompts": (
                f"the previous protocol measured {PREVIOUS_PROMPTS} prompts with one greedy run "
                f"each; this run measures {len(prompts)}, to keep {args.rounds} rounds with "
                f"sampled runs within the time"
                if len(prompts) < PREVIOUS_PROMPTS
                else None
            ),
            "calibration_prompt": {
                **calib.record(),
                "how": "the governed contenders (speq, speq with perfect prediction) call "
                "CompiledModel.calibrate on it once after compiling; it is not a measured prompt",
            },
            "sampling": {
                **SAMPLING,
                "seeds": {p.id: SEED + i for i, p in enumerate(prompts)},
                "contenders": list(SAMPLED),
                "note": "the same seed for a prompt in every round and under every contender; "
                "sampled runs are not compared with resident (speculative sampling is lossless "
                "in distribution, not token for token), and speq's sampled text differs from the "
                "baselines' (which share theirs)",
            },
            "tpot": "decode wall-clock ms per new token; the prompt's prefill (and its expert "
            "fetches) and the governor's calibration are not counted",
            "bounds": UNTIMED_RECORDING,
            "aggregate": AGGREGATE,
            "run_order": RUN_ORDER,
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


# ---------------------------------------------------------------- report


def _k_cell(s: dict) -> str:
    if s["uses_draft"]:
        return f"k* = {s['k_star']}"
    d = s["drafted_runs"]
    if not d["greedy"] and not d["sampled"]:
        return "no draft"
    return f"no draft; drafted mid-run in {d['greedy']}/{d['of']} greedy, {d['sampled'] or 0}/{d['of']} sampled runs"


def _calibration_cell(s: dict) -> str:
    c = s["calibration_s"][SPEQ]
    if c is None:
        return "-"
    return f"{c['median']:.2f}" if c["min"] == c["max"] else fmt_ratio(c)


def _acceptance_cell(a: dict | None) -> str:
    """Acceptance over the runs: the median, with the range where the runs differ."""
    if a is None:
        return "-"
    return f"{a['median']:.2f}" if a["min"] == a["max"] else fmt_ratio(a)


def speedup_cell(s: dict, sampled: bool = False) -> str:
    """speq's speed-up over the best same-memory baseline, as the tables print it."""
    if sampled:
        return fmt_speedup(
            s["ratios_sampled"]["speedup_over_best_baseline"],
            s["applies"]["speedup_over_best_baseline_sampled"],
        )
    return fmt_speedup(
        s["ratios"]["speedup_over_best_baseline"], s["applies"]["speedup_over_best_baseline"]
    )


def describe(s: dict) -> str:
    """One line on a setting's outcome, every number with its unit."""
    t = s["tpot_ms"]
    best = s["best_baseline"]
    return (
        f"{s['budget']} budget, {s['link']}: speq {fmt_ratio(t[SPEQ], spec='.1f')} ms/token "
        f"({_k_cell(s)}; calibration {_calibration_cell(s)} s on {s['calibration_prompt']}); "
        f"{best} {fmt_ratio(t[best], spec='.1f')} ms/token; speed-up greedy "
        f"{speedup_cell(s)}, sampled {speedup_cell(s, True)}; speq / perfect "
        f"{fmt_ratio(s['ratios']['speq_over_perfect'], s['applies']['speq_over_perfect'])}; "
        f"acceptance greedy {_acceptance_cell(s['acceptance']['greedy'])}, sampled "
        f"{_acceptance_cell(s['acceptance']['sampled'])}; {GOAL_SPEEDUP}x goal "
        f"{s['goal_speedup']['verdict']}; {GOAL_PERFECT}-of-perfect goal "
        f"{s['goal_perfect']['verdict']}"
        + ("" if s["identical_to_resident"] else "; GREEDY TOKENS DIFFER FROM RESIDENT")
    )


def headline_link(report: dict) -> str:
    links = list(report["setting"]["links"])
    return HEADLINE_LINK if HEADLINE_LINK in links else links[0]


def headline_table(report: dict) -> str:
    """Markdown: speq against the best same-memory baseline at each budget over one link: the
    sampled runs (median TPOTs; the speed-up with its spread), and beside them the greedy runs'
    speed-up and acceptance (sampled texts differ between contenders; greedy ones do not)."""
    link = headline_link(report)
    headers = [
        "budget",
        "speq's choice",
        "speq ms/token",
        "best baseline ms/token",
        "speed-up, sampled",
        "speed-up, greedy",
        "vs speq without host compute",
        "vs Belady oracle",
        "acceptance, sampled / greedy",
    ]
    rows = []
    for s in report["summary"]:
        if s["link"] != link:
            continue
        best = min(BASELINES, key=lambda b: s["tpot_ms_sampled"][b]["median"])
        rows.append(
            [
                f"{s['budget']} ({s['budget_fraction']:g})",
                _k_cell(s),
                f"{s['tpot_ms_sampled'][SPEQ]['median']:.1f}",
                f"{best} {s['tpot_ms_sampled'][best]['median']:.1f}",
                speedup_cell(s, sampled=True),
                speedup_cell(s),
                fmt_speedup(s["ratios"]["speedup_over_no_host"]),
                fmt_speedup(s["ratios"]["speedup_over_belady"]),
                " / ".join(
                    "-" if a is None else f"{a['median']:.2f}"
                    for a in (s["acceptance"]["sampled"], s["acceptance"]["greedy"])
                ),
            ]
        )
    return markdown_table(rows, headers)


def summary_table(report: dict) -> str:
    """Markdown, greedy runs: one line per setting, the speed-up, the bound ratios, the goals,
    greedy acceptance beside them."""
    headers = [
        "budget",
        "link",
        "speq's choice",
        "calibration (s)",
        "speq TPOT (ms)",
        "best baseline, TPOT (ms)",
        "speq speed-up",
        "acceptance (greedy)",
        "resident speq's speed-up",
        "speq / perfect",
        "speq / resident",
        f"{GOAL_SPEEDUP}x goal",
        f"{GOAL_PERFECT} goal",
        "same tokens",
    ]
    rows = []
    for s in report["summary"]:
        best, r, a = s["best_baseline"], s["ratios"], s["applies"]
        rows.append(
            [
                f"{s['budget']} ({s['budget_fraction']:g})",
                f"{s['link']}",
                _k_cell(s),
                _calibration_cell(s),
                fmt_ratio(s["tpot_ms"][SPEQ], spec=".1f"),
                f"{best}, {fmt_ratio(s['tpot_ms'][best], spec='.1f')}",
                speedup_cell(s),
                _acceptance_cell(s["acceptance"]["greedy"]),
                fmt_speedup(r["resident_speq_speedup_over_best_baseline"]),
                fmt_ratio(r["speq_over_perfect"], a["speq_over_perfect"]),
                fmt_ratio(r["speq_over_resident_speq"]),
                s["goal_speedup"]["verdict"],
                s["goal_perfect"]["verdict"],
                "yes" if s["identical_to_resident"] else "NO",
            ]
        )
    return markdown_table(rows, headers)


def sampled_table(report: dict) -> str:
    """Markdown, sampled runs: speq, the best baseline, the speed-up and both acceptances."""
    headers = [
        "budget",
        "link",
        "speq's choice",
        *(f"{SHORT[c]} TPOT, sampled (ms)" for c in SAMPLED),
        "speq speed-up, sampled",
        "acceptance, sampled",
        "acceptance, greedy",
    ]
    rows = [
        [
            f"{s['budget']} ({s['budget_fraction']:g})",
            f"{s['link']}",
            _k_cell(s),
            *(fmt_ratio(s["tpot_ms_sampled"][c], spec=".1f") for c in SAMPLED),
            speedup_cell(s, sampled=True),
            _acceptance_cell(s["acceptance"]["sampled"]),
            _acceptance_cell(s["acceptance"]["greedy"]),
        ]
        for s in report["summary"]
    ]
    return markdown_table(rows, headers)


def tpot_table(report: dict) -> str:
    """Markdown: every contender's greedy TPOT (ms; median, min-max over rounds) per setting."""
    headers = [
        "budget",
        "link",
        *(f"{SHORT[c]} (ms)" for c in ORDER),
        "speq's acceptance (greedy)",
    ]
    rows = [
        [
            f"{s['budget']}",
            f"{s['link']}",
            *(fmt_ratio(s["tpot_ms"][c], spec=".1f") for c in ORDER),
            _acceptance_cell(s["acceptance"]["greedy"]),
        ]
        for s in report["summary"]
    ]
    return markdown_table(rows, headers)


DEFINITIONS = (
    "Terms: TPOT is wall-clock ms per new token while decoding (the prefill and the governor's "
    "calibration are not in it). Hit rate counts (layer, expert) needs, one per expert a pass "
    "uses at a layer, found resident and loaded; covered rate also counts those already being "
    "copied (no demand fetch); token hit rate counts routings (token, layer, top-k choice) whose "
    "expert needed no copy the compute waited for, so it equals the hit rate for one token per "
    "pass and credits one copy at speculative verification with every token of the window routed "
    "to that expert; stalls / token: the copies the compute waited for, per new token; stall: "
    "the time the compute waited for copies; MB moved: bytes over the link while decoding. "
    "Acceptance: accepted drafted tokens / drafted tokens. Tokens / cycle: tokens committed per "
    "draft-verify cycle. ELB (Expert Lookahead Buffer): the experts the draft's routing predicts "
    "verification will need, copied while the draft runs; ELB recall: the experts verification "
    "used that were predicted; ELB precision: the predicted experts verification used."
)


def detail_table(report: dict) -> str:
    """Markdown: every contender of every setting with its cache and speculation metrics (greedy
    runs: means over the prompts of each prompt's median-TPOT run)."""

    def f(x, spec=".2f"):
        return "-" if x is None else format(x, spec)

    headers = [
        "budget",
        "link",
        "contender",
        "k",
        "expert slots",
        "TPOT (ms)",
        "calibration (s)",
        "hit rate",
        "covered rate",
        "token hit rate",
        "stalls / token",
        "MB moved / run",
        "stall (ms / run)",
        "acceptance (greedy)",
        "acceptance (sampled)",
        "tokens / cycle",
        "ELB recall",
        "ELB precision",
        "same tokens",
    ]
    rows = []
    for r in report["rows"]:
        k = r["k"] if r["k"] is not None else (f"k*={r['k_star']}" if r["k_star"] else "-")
        cal = r["calibration_s"]
        rows.append(
            [
                f"{r['budget']}",
                f"{r['link']}",
                f"{r['contender']}",
                f"{k}",
                f"{r['cache_slots']}",
                fmt_ratio(r["tpot_ms"], spec=".1f"),
                "-" if cal is None else f"{cal['median']:.2f}",
                f(r["mean_hit_rate"]),
                f(r["mean_covered_rate"]),
                f(r["mean_token_hit_rate"]),
                f(r["mean_stalls_per_token"]),
                f(r["mean_mb_moved"], ".1f"),
                f(r["mean_stall_ms"], ".0f"),
                _acceptance_cell(r["acceptance"]["greedy"]),
                _acceptance_cell(r["acceptance"]["sampled"]),
                f(r["mean_tokens_per_cycle"]),
                f(r["mean_elb_recall"]),
                f(r["mean_elb_precision"]),
                "yes" if r["identical_to_resident"] else "NO",
            ]
        )
    return markdown_table(rows, headers)


def how_measured(report: dict) -> str:
    """How the numbers were taken, and the terms the tables use."""
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
    measured = ", ".join(p["id"] for p in s["prompts"])
    c = s["calibration_prompt"]
    fewer = f" ({s['fewer_prompts']})" if s.get("fewer_prompts") else ""
    tokens = f"{ns[0]}" if ns[0] == ns[-1] else f"{ns[0]}-{ns[-1]}"
    seeds = ", ".join(f"{pid} {seed}" for pid, seed in s["sampling"]["seeds"].items())
    return (
        f"Measured with `python bench/bench_e2e.py` on {describe_code(s['code'])}, a "
        f"{s['environment']['cpu_count']}-core CPU, no GPU: cpu backend, {s['model']} in "
        f"{s['dtype']}, {s['new_tokens']} new tokens after each of {len(s['prompts'])} held-out "
        f"prompt(s) ({measured}; {tokens} tokens){fewer}, in {s['rounds']} rounds: each "
        f"round runs, prompt by prompt, every contender once greedily and then speq, ondemand and "
        f"nextgate once sampled (temperature {s['sampling']['temperature']}, top-p "
        f"{s['sampling']['top_p']}, seeds {seeds}, the same in every round). A contender's TPOT "
        f"in a round is the geometric mean over the prompts; every ratio is computed within a "
        f"round, and tables give the median over the rounds with the spread (min-max) in "
        f"brackets. A speed-up is the best same-memory baseline's TPOT (the fastest of ondemand, "
        f"nextgate, fiddler and hostcompute in that round) over speq's; one whose spread "
        f'includes 1.0 reads "{NO_DIFFERENCE}". '
        f"The governor was calibrated on the held-out prompt {c['id']} ({c['tokens']} tokens, "
        f'not measured; "calibration (s)" is its wall time, outside TPOT) and chose k* (the '
        f"tokens drafted per cycle at the start; it re-solves k every cycle) or no draft (one "
        f"token per pass, the draft's memory as expert cache; with a separate draft, a run that "
        f"copies more than the calibration foresaw may bring the draft back mid-run). Where no "
        f"speq run drafted, speq and perfect prediction ran a baseline's policy (fiddler's): "
        f'their ratios and the goals read "{NOT_APPLICABLE}" and are not counted as met. '
        f"speq / perfect = TPOT with perfect expert prediction over speq's; speq / resident = TPOT of speq at the same k "
        f"with every expert resident (without a draft: resident decoding) over speq's; resident "
        f"speq's speed-up = the best baseline's TPOT over that of speq with every expert resident "
        f"(how far ahead the compute side is); "
        f"{UNTIMED_RECORDING}. Goals: speq at {GOAL_SPEEDUP}x the best baseline (where resident "
        f"speq is that far ahead, so that it is reachable) and within {GOAL_PERFECT} of perfect "
        f'prediction, "met" only when every round meets it. The host -> device link is emulated '
        f"and calibrated so one expert copy costs as many decode-layer times as a "
        f"{s['reference_model']} expert on an A100 over PCIe 3.0 / 4.0 / 5.0 (8 / 16 / 32 GB/s): "
        f"{links}. Budgets are fractions of all expert bytes beyond the non-expert weights and KV "
        f"cache, every size counted {counted}; speq's INT4 copies of the experts it does not "
        f"cache ({s['draft_share_of_expert_bytes']:.0%} of an expert's bytes each; a separate "
        f"draft: of every expert) come out of the same budget. "
        f"{draft_pass_sentence(s.get('draft_pass'))}"
        f"Greedy runs' tokens are compared with the all-resident greedy output (\"same "
        f'tokens"); sampled runs record TPOT and acceptance only. Acceptance (accepted drafted '
        f"tokens / drafted tokens) is given for both: greedy acceptance is inflated where the demo "
        f"model's greedy text repeats itself. With the same seed, speq's speculative sampling draws "
        f"a different text than the baselines' (the same distribution), so sampled ratios compare "
        f"runs over different texts."
    )


def draft_pass_sentence(d: dict | None) -> str:
    """The draft's one-token pass against the target's, as bench_kernels measures it."""
    if d is None:
        return ""
    r = d["draft_over_target"]

    def cell(name: str) -> str:
        x = r[name]
        return f"{x['median']:.2f}x ({x['min']:.2f}-{x['max']:.2f})"

    return (
        f"The demo model's one-token draft pass costs {cell('draft_cpu_int4')} of its target pass here (torch's CPU INT4 "
        f"matmul), {cell('draft_dequantize')} when its INT4 experts are dequantized at every "
        f"call instead (as before that kernel; every expert resident, {len(r['draft_cpu_int4']['rounds'])} "
        f"interleaved rounds, bench_kernels' draft_pass_ratio). "
    )


def shared_table(report: dict) -> str:
    """Markdown, greedy runs: speq holding each expert once (``draft_memory="shared"``, the
    default) beside speq with a separate draft, per setting: slots at full precision, the
    draft's use and acceptance, TPOT, shared's speed-up and its distance to the Belady oracle."""
    headers = [
        "budget",
        "link",
        "full-precision slots, separate / shared",
        "draft (separate / shared)",
        "acceptance, separate / shared",
        "TPOT separate (ms)",
        "TPOT shared (ms)",
        "shared speed-up",
        "shared vs Belady",
    ]
    rows = []
    for s in report["summary"]:
        if "draft_memory" not in s:
            continue
        d, r = s["draft_memory"], s["ratios"]
        sep, sh = d[SPEQ_SEPARATE], d[SPEQ]

        def draft(x: dict) -> str:
            return f"k*={x['k_star']}" if x["uses_draft"] else "none"

        rows.append(
            [
                f"{s['budget']} ({s['budget_fraction']:g})",
                s["link"],
                f"{sep['cache_slots']} / {sh['cache_slots']}",
                f"{draft(sep)} / {draft(sh)}",
                f"{_acceptance_cell(sep['acceptance'])} / {_acceptance_cell(sh['acceptance'])}",
                fmt_ratio(s["tpot_ms"][SPEQ_SEPARATE], spec=".1f"),
                fmt_ratio(s["tpot_ms"][SPEQ], spec=".1f"),
                fmt_speedup(r["shared_speedup_over_separate"]),
                fmt_speedup(r["speedup_over_belady"]),
            ]
        )
    return markdown_table(rows, headers)


def markdown(report: dict, detail: bool = True) -> str:
    parts = [
        how_measured(report),
        "Greedy runs:",
        summary_table(report),
        "Sampled runs:",
        sampled_table(report),
        'One copy per expert (draft_memory="shared") beside a separate draft, greedy runs:',
        shared_table(report),
        "TPOT of every contender, greedy (ms per token):",
        tpot_table(report),
    ]
    if detail:
        parts += [
            "Every contender, greedy (means over the prompts of each prompt's median-TPOT run):",
            DEFINITIONS,
            detail_table(report),
        ]
    return "\n\n".join(parts) + "\n"


def _bar_label(s: dict) -> str:
    r = s["ratios"]["speedup_over_best_baseline"]
    if not s["applies"]["speedup_over_best_baseline"]:
        return "n/a"
    return "=" if includes_one(r) else f"{r['median']:.2f}x"


def plot(report: dict, path: Path) -> None:
    """Greedy TPOT per contender grouped by budget, one panel per link (log scale; the bar is
    the median over the rounds, the whisker the spread); above speq's bar its speed-up over the
    best baseline ("=": no difference; "n/a": no draft)."""
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
            xs, ys, lo, hi = [], [], [], []
            for j, b in enumerate(budgets):
                s = next(s for s in summary if s["link"] == link and s["budget"] == b)
                t = s["tpot_ms"][c]
                xs.append(j + (i - (len(ORDER) - 1) / 2) * width)
                ys.append(t["median"])
                lo.append(t["median"] - t["min"])
                hi.append(t["max"] - t["median"])
                if c == SPEQ:
                    ax.annotate(
                        _bar_label(s),
                        (xs[-1], t["max"]),
                        textcoords="offset points",
                        xytext=(0, 3),
                        ha="center",
                        fontsize=7,
                    )
            ax.bar(xs, ys, width, label=SHORT[c], color=colors[i % len(colors)])
            ax.errorbar(xs, ys, yerr=[lo, hi], fmt="none", ecolor="black", elinewidth=0.6)
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
    ncol = 8 if len(links) > 1 else 4
    fig.legend(handles, labels, loc="lower center", ncol=ncol, fontsize=8, frameon=False)
    s = report["setting"]
    fig.suptitle(
        f"speq vs baselines, demo MoE, cpu backend, greedy ({s['new_tokens']} tokens, "
        f"{len(s['prompts'])} held-out prompt(s), median and spread of {s['rounds']} rounds)\nabove "
        f"speq's bar: its speed-up over the best baseline (=: no difference, n/a: no draft)",
        fontsize=9,
    )
    fig.tight_layout(rect=(0, 0.06 if len(links) > 1 else 0.1, 1, 1))
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


def _positive(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"{text}: expected a positive integer")
    return n


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--budgets", type=_names(BUDGETS), default=list(BUDGETS))
    p.add_argument("--links", type=_names(LINKS), default=list(LINKS))
    p.add_argument(
        "--domains",
        type=lambda s: [x.strip() for x in s.split(",") if x.strip()],
        default=DEFAULT_DOMAINS,
        help="held-out prompt domains: kjv, fortunes, python_docs, perl_docs",
    )
    p.add_argument("--prompts-per-domain", type=_positive, default=1, help="1 or 2")
    p.add_argument(
        "--calibration-prompt",
        default=None,
        help="id of the held-out prompt the governor calibrates on (default: the first of "
        "bench/prompts/heldout.json from a domain that is not measured); never a measured one",
    )
    p.add_argument(
        "--count-memory-as",
        choices=list(MEMORY_DTYPES),
        default="bfloat16",
        help="the dtype the device budget counts weights, KV cache and experts in (compute is "
        "float64 either way); bfloat16 splits the memory as on a GPU, where the INT4 draft is "
        "about a quarter of the expert bytes",
    )
    p.add_argument("--tokens", type=_positive, default=32, help="new tokens per run")
    model_help = "a checkpoint folder (speq's format or a Hugging Face one) with a tokenizer.json "
    model_help += "to run instead of the shipped demo model"
    p.add_argument("--model", default=None, help=model_help)
    p.add_argument(
        "--rounds",
        type=_positive,
        default=3,
        help="rounds; each runs every contender once per prompt (greedy, and sampled for speq, "
        "ondemand and nextgate)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: by default the generous budget, pcie5, one prompt, 3 rounds, 4 tokens, "
        "written to the temp folder (other flags still apply)",
    )
    p.add_argument("--out", default=None, help="the JSON path (default bench/results/e2e_cpu.json)")
    p.add_argument(
        "--check",
        action="store_true",
        help="exit 1 if any greedy run's tokens differ from resident",
    )
    if p.parse_known_args(argv)[0].quick:
        p.set_defaults(budgets=["generous"], links=["pcie5"], domains=["kjv"], rounds=3, tokens=4)
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
    print(f"Headline ({headline_link(report)}, sampled runs; acceptance sampled (greedy)):")
    print(headline_table(report))
    print()
    print("Greedy runs:")
    print(summary_table(report))
    print()
    print("Sampled runs:")
    print(sampled_table(report))
    print()
    print('One copy per expert (draft_memory="shared") beside a separate draft, greedy runs:')
    print(shared_table(report))
    print()
    print(tpot_table(report))
    print(f"\nwrote {path}, {md}, {png} ({report['setting']['wall_s']:.0f} s wall)")
    same = all(s["identical_to_resident"] for s in report["summary"])
    if not same:
        print("SOME GREEDY RUNS' TOKENS DIFFER FROM THE RESIDENT OUTPUT (see 'same tokens')")
    return 1 if args.check and not same else 0


if __name__ == "__main__":
    sys.exit(main())
