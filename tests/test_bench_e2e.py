"""bench/bench_e2e.py: the smoke run's JSON (rounds, spreads, calibration, commit, sampled
acceptance), tables and plot; the ratio and goal arithmetic and the verdicts "no difference" and
"not applicable (no draft)" on hand-made numbers; and bench/update_readme.py rendering the new
format (no timing is asserted: the numbers are the benchmark's, the structure and the lossless
outputs are ours)."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import bench_e2e as e2e
import common
import update_readme

SETTING_KEYS = {
    "model",
    "dtype",
    "new_tokens",
    "rounds",
    "budgets",
    "links",
    "prompts",
    "calibration_prompt",
    "sampling",
    "bounds",
    "aggregate",
    "run_order",
    "environment",
    "code",
    "wall_s",
}
SUMMARY_KEYS = {
    "budget",
    "link",
    "k_star",
    "uses_draft",
    "rounds",
    "tpot_ms",
    "tpot_ms_sampled",
    "best_baseline",
    "ratios",
    "ratios_sampled",
    "applies",
    "policies_differ",
    "calibration_prompt",
    "calibration_s",
    "acceptance",
    "goal_speedup",
    "goal_speedup_sampled",
    "goal_perfect",
    "identical_to_resident",
    "per_prompt",
}
SPREAD_KEYS = {"median", "min", "max", "rounds"}


@pytest.mark.slow
def test_quick_run_records_rounds_spreads_calibration_and_sampled_acceptance(tmp_path):
    out = tmp_path / "e2e.json"
    assert e2e.main(["--quick", "--tokens", "3", "--out", str(out), "--check"]) == 0
    report = json.loads(out.read_text())
    assert report["format"] == common.FORMAT
    setting = report["setting"]
    assert set(setting) >= SETTING_KEYS
    assert setting["rounds"] == 3
    assert set(setting["links"]) == {"pcie5"}
    assert setting["links"]["pcie5"]["profile"] == "a100-40g-pcie5"
    code = setting["code"]
    assert code["commit"] and len(code["commit"]) <= 12 and isinstance(code["dirty"], bool)
    measured = {p["id"] for p in setting["prompts"]}
    calib = setting["calibration_prompt"]["id"]
    assert calib not in measured and setting["fewer_prompts"]
    assert setting["sampling"]["temperature"] == 0.7 and setting["sampling"]["top_p"] == 0.9
    assert set(setting["sampling"]["seeds"]) == measured
    ratio = setting["draft_pass"]["draft_over_target"]  # before and after the CPU INT4 kernel
    assert set(ratio) == {"draft_dequantize", "draft_cpu_int4"}
    assert all(len(r["rounds"]) == 3 and r["min"] > 0 for r in ratio.values())
    assert "draft pass costs" in e2e.markdown(report)

    (s,) = report["summary"]
    assert set(s) >= SUMMARY_KEYS
    assert s["calibration_prompt"] == calib
    assert len(s["rounds"]) == 3
    for rd in s["rounds"]:  # each round's TPOT of every contender, greedy and sampled
        assert set(rd["greedy"]) == set(e2e.ORDER) and set(rd["sampled"]) == set(e2e.SAMPLED)
    for c in e2e.ORDER:
        t = s["tpot_ms"][c]
        assert set(t) == SPREAD_KEYS and t["min"] <= t["median"] <= t["max"]
        assert t["rounds"] == pytest.approx([rd["greedy"][c] for rd in s["rounds"]])
    r = s["ratios"]["speedup_over_best_baseline"]
    best = [min(rd["greedy"][b] for b in e2e.BASELINES) for rd in s["rounds"]]
    assert r["rounds"] == pytest.approx(
        [b / rd["greedy"][e2e.SPEQ] for b, rd in zip(best, s["rounds"])]
    )
    assert set(s["ratios_sampled"]["speedup_over_best_baseline"]) == SPREAD_KEYS

    by = {row["contender"]: row for row in report["rows"]}
    assert tuple(by) == e2e.ORDER
    for label in e2e.GOVERNED:  # calibrated once, on the held-out prompt; outside TPOT
        cal = by[label]["calibration_s"]
        assert cal["min"] == cal["max"] > 0 and by[label]["calibration_prompt"] == calib
        runs = by[label]["runs"]["greedy"]
        assert all(x["calibration_s"] == cal["min"] for rs in runs.values() for x in rs)
    assert by[e2e.ONDEMAND]["calibration_s"] is None
    assert all(len(rs) == 3 for rs in by[e2e.SPEQ]["runs"]["sampled"].values())
    assert all(
        x["identical_to_resident"] is None
        for rs in by[e2e.SPEQ]["runs"]["sampled"].values()
        for x in rs
    )
    assert by[e2e.PERFECT]["runs"]["sampled"] is None  # greedy only: it needs the output first
    assert (
        all(row["identical_to_resident"] for row in report["rows"]) and s["identical_to_resident"]
    )

    assert by[e2e.SPEQ]["k_star"] == s["k_star"] and s["uses_draft"] == by[e2e.SPEQ]["uses_draft"]
    acc = s["acceptance"]
    if s["drafted_runs"]["greedy"]:  # acceptance of the greedy and of the sampled runs
        assert 0 <= acc["greedy"]["min"] <= acc["greedy"]["max"] <= 1
        assert acc["greedy"]["runs"] and acc["sampled"]["runs"]
    else:
        assert acc["greedy"] is None
    if s["uses_draft"]:  # speq's compute side: the same k, every expert resident
        assert (by[e2e.SPEQ_RESIDENT]["policy"], by[e2e.SPEQ_RESIDENT]["k"]) == (
            "speq",
            s["k_star"],
        )
    else:  # the governor dropped the draft: one token per pass, so resident decoding
        assert s["k_star"] is None and by[e2e.SPEQ_RESIDENT]["policy"] == "resident"
    assert by[e2e.PERFECT]["predictor"] == "oracle" and by[e2e.SPEQ]["predictor"] == "draft"
    assert by[e2e.SPEQ_RESIDENT]["device_memory_bytes"] is None
    assert setting["memory_counted_as"] == "bfloat16"
    assert 0.2 < setting["draft_share_of_expert_bytes"] < 0.35  # INT4 + scales vs bf16
    assert by[e2e.ONDEMAND]["device_memory_bytes"] == by[e2e.SPEQ]["device_memory_bytes"]
    assert by[e2e.ONDEMAND_SAME]["cache_slots"] < by[e2e.ONDEMAND]["cache_slots"]
    assert s["best_baseline"] in e2e.BASELINES

    md = out.with_suffix(".md").read_text()
    assert "speq / perfect" in md and "calibration (s)" in md and "acceptance, sampled" in md
    assert "not timed" in md and calib in md
    cell = e2e.speedup_cell(s)
    if s["policies_differ"]:
        assert cell != common.NOT_APPLICABLE
        if common.includes_one(r):
            assert cell.startswith(common.NO_DIFFERENCE)
    else:  # speq ran ondemand's policy: nothing to claim, no goal counted
        assert cell == common.NOT_APPLICABLE and common.NOT_APPLICABLE in md
        assert s["goal_speedup"]["met"] is None and s["goal_perfect"]["met"] is None
    assert cell in md
    assert out.with_suffix(".png").stat().st_size > 0

    # update_readme renders the new format: the README headline and docs/RESULTS.md
    block = update_readme.e2e_block(report)
    assert cell in block and "spread" in block
    assert e2e.speedup_cell(s, sampled=True) in update_readme.headline(report)


# ---------------------------------------------------------------- the small functions


def test_a_speedup_whose_spread_includes_one_is_no_difference():
    assert common.fmt_speedup(common.spread([0.97, 1.05, 1.01])).startswith("no difference")
    assert common.fmt_speedup(common.spread([1.0, 1.2, 1.3])).startswith("no difference")
    assert common.fmt_speedup(common.spread([1.2, 1.3, 1.25])) == "1.25x (1.20-1.30)"
    assert common.fmt_speedup(common.spread([0.8, 0.9, 0.85])) == "0.85x (0.80-0.90)"
    assert common.fmt_speedup(common.spread([1.2, 1.3]), applies=False) == common.NOT_APPLICABLE
    s = common.spread([1.0, 3.0, 2.0])
    assert (s["median"], s["min"], s["max"], s["rounds"]) == (2.0, 1.0, 3.0, [1.0, 3.0, 2.0])


def test_goals_are_met_only_in_every_round_and_never_without_a_draft():
    spread = common.spread
    assert common.goal(spread([2.4, 2.5, 2.6]), 2.34)["verdict"] == "met"
    assert common.goal(spread([2.0, 2.5, 2.6]), 2.34)["met"] is False  # rounds disagree
    assert common.goal(spread([0.95, 1.1, 1.0]), 2.34)["verdict"] == "missed (no difference)"
    assert common.goal(spread([1.5, 1.6, 1.7]), 2.34)["verdict"] == "missed"
    assert common.goal(spread([0.95, 1.02, 0.99]), 0.9)["verdict"] == "met"  # as fast as perfect
    na = common.goal(spread([1.0, 1.0, 1.0]), 0.9, applies=False)
    assert na == {"target": 0.9, "applies": False, "met": None, "verdict": common.NOT_APPLICABLE}


def test_interleaved_rounds_run_every_contender_once_per_round_in_order():
    calls = []
    out = common.interleaved(3, ["a", "b", "c"], lambda r, k: calls.append((r, k)) or r)
    assert calls == [(r, k) for r in range(3) for k in "abc"]
    assert out == [dict.fromkeys("abc", r) for r in range(3)]
    assert common.median_index([5.0, 1.0, 3.0]) == 2 and common.median_index([4.0, 2.0]) == 1


def _rounds(*greedy: tuple, sampled: tuple | None = None) -> list[dict]:
    """Rounds of (speq, speq resident, perfect, ondemand, nextgate) greedy TPOT in ms; the host
    compute baselines (fiddler, hostcompute) 1000 ms, the other contenders 50 ms; sampled (speq,
    ondemand, nextgate) as given or the greedy ones, the host compute baselines 1000 ms."""
    slow = {e2e.FIDDLER: 1000.0, e2e.HOSTCOMPUTE: 1000.0}
    out = []
    for i, (speq_, resident_speq, perfect, ondemand, nextgate) in enumerate(greedy):
        t = (
            dict.fromkeys(e2e.ORDER, 50.0)
            | slow
            | {
                e2e.SPEQ: speq_,
                e2e.SPEQ_RESIDENT: resident_speq,
                e2e.PERFECT: perfect,
                e2e.ONDEMAND: ondemand,
                e2e.NEXTGATE: nextgate,
            }
        )
        sp = sampled[i] if sampled else (speq_, ondemand, nextgate)
        out.append({"greedy": t, "sampled": dict(zip(e2e.SAMPLED, sp)) | slow})
    return out


def test_each_rounds_ratio_comes_from_that_rounds_runs():
    rounds = _rounds((100, 30, 95, 300, 400), (150, 30, 140, 300, 250), (100, 30, 90, 200, 400))
    s = e2e.summarize_setting(rounds, speq_drafted=True, perfect_drafted=True, sampled_drafted=True)
    # per round: best of (ondemand, nextgate) of that round over speq of that round
    assert s["ratios"]["speedup_over_best_baseline"]["rounds"] == pytest.approx(
        [3.0, 250 / 150, 2.0]
    )
    assert s["ratios"]["speedup_over_best_baseline"]["median"] == pytest.approx(2.0)
    assert s["best_baseline"] == "ondemand"  # by median TPOT (300 vs 400)
    assert s["goal_speedup"]["verdict"].startswith("unsettled")  # 3.0 met, 1.67 and 2.0 not
    assert s["goal_perfect"]["verdict"] == "met"  # 0.95, 0.93, 0.9


# (speq, speq resident, perfect, ondemand, nextgate) TPOT in ms, the same in three rounds ->
# (best baseline, 2.34x goal applies, met, 0.9 goal met)
GOALS = [
    ((100, 30, 95, 300, 400), ("ondemand", True, True, True)),  # 3.0x, resident 10x
    ((200, 30, 150, 300, 250), ("nextgate", True, False, False)),  # 1.25x; 0.75 of perfect
    ((100, 120, 100, 250, 500), ("ondemand", False, None, True)),  # resident speq only 2.08x
    ((100, 100, 90, 234, 500), ("ondemand", True, True, True)),  # exactly 2.34x, exactly 0.9
]


@pytest.mark.parametrize("tpots,expected", GOALS)
def test_goals_follow_the_resident_speq_bound(tpots, expected):
    s = e2e.summarize_setting(
        _rounds(tpots, tpots, tpots), speq_drafted=True, perfect_drafted=True, sampled_drafted=True
    )
    best, applies, met, perfect_met = expected
    assert s["best_baseline"] == best
    assert (s["goal_speedup"]["applies"], s["goal_speedup"]["met"]) == (applies, met)
    assert s["goal_perfect"]["met"] is perfect_met


def _summary(rounds: list[dict], **drafted) -> dict:
    """A setting's summary as the tables read it, around `summarize_setting`'s output."""
    s = e2e.summarize_setting(rounds, **drafted)
    tpot = {c: common.spread([rd["greedy"][c] for rd in rounds]) for c in e2e.ORDER}
    sampled = {c: common.spread([rd["sampled"][c] for rd in rounds]) for c in e2e.SAMPLED}
    no_draft = not drafted["speq_drafted"]
    return s | {
        "budget": "medium",
        "budget_fraction": 0.5,
        "link": "pcie4",
        "k_star": None if no_draft else 8,
        "uses_draft": not no_draft,
        "drafted_runs": {"greedy": 0 if no_draft else 3, "sampled": 0 if no_draft else 3, "of": 3},
        "calibration_s": {
            e2e.SPEQ: common.spread([1.5] * 3),
            e2e.PERFECT: common.spread([2.0] * 3),
        },
        "calibration_prompt": "fortunes-1",
        "acceptance": {"greedy": None, "sampled": None},
        "tpot_ms": tpot,
        "tpot_ms_sampled": sampled,
        "identical_to_resident": True,
    }


def test_identical_policies_print_not_applicable_and_count_no_goal():
    # no draft: speq, perfect prediction and ondemand all ran plain LRU; speq happens to be 5%
    # "faster" than ondemand in every round, which is noise between identical policies
    rounds = _rounds((95, 15, 96, 100, 120), (96, 15, 95, 101, 121), (95, 16, 97, 100, 119))
    s = _summary(rounds, speq_drafted=False, perfect_drafted=False, sampled_drafted=False)
    assert not s["policies_differ"]
    assert e2e.speedup_cell(s) == e2e.speedup_cell(s, sampled=True) == common.NOT_APPLICABLE
    for g in ("goal_speedup", "goal_speedup_sampled", "goal_perfect"):
        assert s[g]["verdict"] == common.NOT_APPLICABLE and s[g]["met"] is None
    report = {"summary": [s], "setting": {"links": {"pcie4": {}}}}
    table = e2e.summary_table(report)
    assert table.count(common.NOT_APPLICABLE) == 4  # speed-up, speq / perfect, both goals
    assert common.NOT_APPLICABLE in e2e.headline_table(report)
    assert "0 of 1" in update_readme.goal_lines(report)  # not counted as met


def test_a_drafted_speedup_within_noise_prints_no_difference():
    rounds = _rounds((100, 30, 99, 98, 150), (100, 30, 99, 104, 150), (100, 30, 99, 101, 150))
    s = _summary(rounds, speq_drafted=True, perfect_drafted=True, sampled_drafted=True)
    assert e2e.speedup_cell(s).startswith(common.NO_DIFFERENCE)
    assert s["goal_speedup"]["verdict"] == "missed (no difference)"
    assert common.NO_DIFFERENCE in e2e.headline_table(
        {"summary": [s], "setting": {"links": {"pcie4": {}}}}
    )


def test_update_readme_reports_old_results_as_pending():
    old = {"setting": {"code": {"commit": "72a2dcb51b4"}}, "summary": [], "rows": []}
    note = update_readme.pending("e2e_cpu.json", old)
    assert "pending a rerun" in note and "72a2dcb" in note
    assert update_readme.is_current({"format": common.FORMAT})
    assert not update_readme.is_current(old)
