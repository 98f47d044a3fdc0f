"""The governor against a sweep of fixed k, on the cpu backend with a calibrated emulated link.

For each k in 1..16 (the governor's range), speq decodes the same prompt under the same device
budget (counted as the bf16 model would use it) and TPOT is measured (wall clock); the governor
(CompileOptions(k=None)) is calibrated on a held-out prompt that is not the measured one
(CompiledModel.calibrate; its wall time is reported as "calibration (s)", outside TPOT), predicts
TPOT for every k with the Amortization Roofline cost model, picks k* (and whether the draft earns
its memory at all), and its own run is measured too. Every contender is compiled first; then each
of --rounds rounds runs the governed speq and every fixed k once, in that order, before the next
round starts. Reported: measured TPOT per k (median over the rounds and spread, min-max),
predicted TPOT and the prediction error against the median, the chosen k*, and the governed run's
TPOT over the best fixed k's, each round's ratio from that round's runs (median and spread; "no
difference" when the spread includes 1.0). The calibration's estimates differ from what a full
run sees; the runtime governor replaces them with moving averages as it decodes. So the model is
also evaluated on the median run's own measured inputs: that error is the cost model's own.
Greedy decoding (acceptance is greedy acceptance, which the demo model's repetitive greedy text
flatters). Writes bench/results/governor_cpu.json.

    python bench/bench_governor.py [--tokens 96] [--budget 0.5] [--rounds 3] [--ks 1,...,16]
        [--calibration-prompt ID] [--model demo|random] [--quick]

Wall time on this project's 2-core CPU machine: about 10-20 minutes by default (3 rounds of 17
runs of 96 tokens; the previous protocol's single round took 5-6 minutes); --quick (k = 1, 4, 16,
8 tokens, 3 rounds, to the temp folder) under a minute.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from common import (
    FORMAT,
    NO_DIFFERENCE,
    RESULTS,
    calibration_prompt,
    environment,
    fmt_ratio,
    git_state,
    includes_one,
    interleaved,
    median_index,
    spread,
    table,
    write_json,
)
from tqdm import tqdm

import speq
from speq.compare import calibrate_link
from speq.cost import K_MAX, CacheModel, estimate
from speq.models.demo import demo_model, random_demo_model

GOVERNED = "governor"
PROMPT = "And it came to pass, when the king of Israel heard"
RUN_METRICS = (
    "acceptance_rate",
    "acceptance_by_position",
    "hit_rate",
    "cycles",
    "k_per_cycle",
    "verify_needs",
    "verify_new_rate",
    "calibration_s",
    "switched_to_draft_after",
)


def load(name: str, calibration: str | None):
    """(model, measured prompt, calibration prompt and its id, description)."""
    if name == "demo":
        model, tok = demo_model(dtype=torch.float64)
        prompt = torch.tensor([tok.encode(PROMPT)])
        calib = calibration_prompt([], calibration)
        return (
            model,
            prompt,
            torch.tensor([tok.encode(calib["text"])]),
            calib["id"],
            ("the shipped demo MoE, float64"),
        )
    model = random_demo_model(0).to(torch.float64)
    vocab = model.config.vocab_size
    prompt = torch.randint(0, vocab, (1, 16), generator=torch.Generator().manual_seed(1))
    calib = torch.randint(0, vocab, (1, 16), generator=torch.Generator().manual_seed(2))
    return model, prompt, calib, "random ids (seed 2)", "the random demo-shape MoE, float64"


def _record(m, same: bool) -> dict:
    return {"tpot_ms": m.tpot_ms, "identical_to_resident": same, **{k: m[k] for k in RUN_METRICS}}


def governed_over_best_cell(report: dict) -> str:
    """The governed run's TPOT over the best fixed k's: median (min-max) over the rounds; "no
    difference" when the spread includes 1.0."""
    r = report["governed_over_best"]
    text = fmt_ratio(r)
    return f"{text}: {NO_DIFFERENCE} from the best fixed k" if includes_one(r) else text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--tokens", type=int, default=96)
    p.add_argument("--budget", type=float, default=0.5, help="fraction of all expert bytes")
    p.add_argument("--rounds", type=int, default=3, help="rounds of every contender once")
    p.add_argument(
        "--ks",
        type=lambda s: [int(x) for x in s.split(",")],
        default=list(range(1, K_MAX + 1)),
        help=f"the fixed k swept (default 1..{K_MAX})",
    )
    p.add_argument(
        "--calibration-prompt",
        default=None,
        help="id of the held-out prompt (bench/prompts/heldout.json) the governor calibrates on "
        "(default: the first)",
    )
    p.add_argument("--model", choices=["demo", "random"], default="demo")
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: k = 1, 4, 16, 8 tokens, 3 rounds, written to the temp folder (other "
        "flags still apply)",
    )
    p.add_argument(
        "--out", default=None, help="the JSON path (default bench/results/governor_cpu.json)"
    )
    if p.parse_known_args(argv)[0].quick:
        p.set_defaults(ks=[1, 4, 16], tokens=8, rounds=3)
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    if args.out is None:
        folder = Path(tempfile.gettempdir()) if args.quick else RESULTS
        args.out = str(folder / ("governor_quick.json" if args.quick else "governor_cpu.json"))

    code = git_state()
    model, prompt, calib, calib_id, what = load(args.model, args.calibration_prompt)
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
    governed.calibrate(calib)  # held-out text, not the measured prompt
    policy = governed.governed
    predicted = {e.k: e.tpot_ms for e in policy.estimates}
    cms = {GOVERNED: governed}
    for k in tqdm(args.ks, desc="compile", file=sys.stderr, leave=False):
        cms[k] = speq.compile(model, speq.CompileOptions(policy="speq", k=k, **link))
    bar = tqdm(total=args.rounds * len(cms), desc="rounds", unit="run", file=sys.stderr)

    def one(r: int, key) -> dict:
        bar.set_postfix_str(f"round {r + 1}, " + (key if key == GOVERNED else f"k={key}"))
        out = cms[key].generate(prompt, args.tokens)
        bar.update(1)
        return _record(cms[key].metrics, bool(torch.equal(out, expected)))

    rounds = interleaved(args.rounds, list(cms), one)
    bar.close()
    runs = {key: [rd[key] for rd in rounds] for key in cms}

    rows = []
    for k in args.ks:
        tpots = [x["tpot_ms"] for x in runs[k]]
        m = runs[k][median_index(tpots)]
        # the same model fed with what the median run measured (acceptance per position, routing
        # locality, cache reuse): its error is the cost model's own, apart from the
        # calibration's estimates of its inputs
        cycles = max(m["cycles"] or 0, 1)
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
        measured = spread(tpots)
        rows.append(
            {
                "k": k,
                "measured_tpot_ms": measured["median"],
                "measured_tpot_ms_spread": measured,
                "predicted_tpot_ms": predicted[k],
                "error": predicted[k] / measured["median"] - 1,
                "model_tpot_ms": fed,
                "model_error": fed / m["tpot_ms"] - 1,
                "acceptance": m["acceptance_rate"],
                "hit_rate": m["hit_rate"],
                "new_rate": m["verify_new_rate"],
                "predicted_new_rate": policy.cache.new_experts(model.config, k)
                / policy.cache.window(model.config, k),
                "identical_to_resident": all(x["identical_to_resident"] for x in runs[k]),
                "runs": runs[k],
            }
        )
    best = min(rows, key=lambda r: r["measured_tpot_ms"])
    g_tpots = [x["tpot_ms"] for x in runs[GOVERNED]]
    g_median = runs[GOVERNED][median_index(g_tpots)]
    report = {
        "format": FORMAT,
        "setting": {
            "model": what,
            "backend": "cpu, emulated link, wall clock",
            "link_description": cal.describe(),
            "device_budget_bytes": budget,
            "budget_fraction_of_expert_bytes": args.budget,
            "prompt": PROMPT if args.model == "demo" else "random ids (seed 1)",
            "prompt_tokens": int(prompt.shape[1]),
            "new_tokens": args.tokens,
            "rounds": args.rounds,
            "run_order": "every round: the governed speq, then every fixed k in order; round "
            "r + 1 starts after round r",
            "calibration_prompt": calib_id,
            "governor": policy.describe(),
            "governor_at_compile": at_compile,
            "budget_counted_as": "bfloat16 (CompileOptions.memory_dtype)",
            "decoding": "greedy (acceptance is greedy acceptance)",
            "environment": environment(),
            "code": code,
        },
        "rounds": [{str(key): x["tpot_ms"] for key, x in rd.items()} for rd in rounds],
        "sweep": rows,
        "governed": {
            "initial_k": policy.spec.k,
            "uses_draft": policy.use_draft,
            "calibration_s": governed.metrics["calibration_s"],
            "calibration_prompt": calib_id,
            "k_per_cycle": g_median["k_per_cycle"] or [],
            "acceptance": g_median["acceptance_rate"],
            "switched_to_draft_after": g_median["switched_to_draft_after"],
            "measured_tpot_ms": spread(g_tpots)["median"],
            "measured_tpot_ms_spread": spread(g_tpots),
            "identical_to_resident": all(x["identical_to_resident"] for x in runs[GOVERNED]),
            "runs": runs[GOVERNED],
        },
        "best_swept": {"k": best["k"], "tpot_ms": best["measured_tpot_ms"]},
        "governed_over_best": spread(
            [rd[GOVERNED]["tpot_ms"] / min(rd[k]["tpot_ms"] for k in args.ks) for rd in rounds]
        ),
        "max_abs_prediction_error": max(abs(r["error"]) for r in rows),
        "max_abs_model_error": max(abs(r["model_error"]) for r in rows),
    }
    path = write_json(Path(args.out), report)
    print(f"{what}; {cal.describe()}")
    print(f"governor (calibrated on {calib_id}): {policy.describe()}")
    printed = [{**r, "measured": fmt_ratio(r["measured_tpot_ms_spread"], spec=".1f")} for r in rows]
    print(
        table(
            printed,
            {
                "k": "k",
                "measured": "measured TPOT (ms)",
                "predicted_tpot_ms": "predicted TPOT (ms)",
                "error": "prediction error",
                "model_tpot_ms": "model on measured inputs (ms)",
                "model_error": "model error",
                "acceptance": "acceptance (greedy)",
                "hit_rate": "hit rate",
                "new_rate": "copied in cycle / needed",
                "predicted_new_rate": "predicted",
                "identical_to_resident": "same tokens",
            },
        )
    )
    g = report["governed"]
    print(
        f"governed run (k starts at {policy.spec.k if policy.use_draft else 'no draft'}, "
        f"re-chosen per cycle; calibration {g['calibration_s']:.2f} s on {calib_id}): "
        f"{fmt_ratio(g['measured_tpot_ms_spread'], spec='.1f')} ms/token; over the best fixed "
        f"k's TPOT, round by round: {governed_over_best_cell(report)} (best by median: "
        f"{best['measured_tpot_ms']:.1f} ms at k={best['k']})"
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
