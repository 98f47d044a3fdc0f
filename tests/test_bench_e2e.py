"""bench/bench_e2e.py: the smoke run's JSON, tables and plot, and the goal arithmetic (no timing
is asserted: the numbers are the benchmark's, the structure and the lossless outputs are ours)."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import bench_e2e as e2e

SETTING_KEYS = {
    "model",
    "dtype",
    "new_tokens",
    "repeats",
    "budgets",
    "links",
    "prompts",
    "aggregate",
    "environment",
    "wall_s",
}
SUMMARY_KEYS = {
    "budget",
    "link",
    "k_star",
    "tpot_ms",
    "best_baseline",
    "speedup_over_best_baseline",
    "speq_over_perfect",
    "speq_over_resident_speq",
    "resident_speq_speedup_over_best_baseline",
    "goal_speedup",
    "goal_perfect",
    "identical_to_resident",
    "per_prompt",
}


@pytest.mark.slow
def test_quick_run_writes_every_contender_with_resident_tokens(tmp_path):
    out = tmp_path / "e2e.json"
    assert e2e.main(["--quick", "--tokens", "3", "--out", str(out), "--check"]) == 0
    report = json.loads(out.read_text())
    assert set(report["setting"]) >= SETTING_KEYS
    assert set(report["setting"]["links"]) == {"pcie5"}
    assert report["setting"]["links"]["pcie5"]["profile"] == "a100-40g-pcie5"
    (s,) = report["summary"]
    assert set(s) >= SUMMARY_KEYS
    assert tuple(r["contender"] for r in report["rows"]) == e2e.ORDER
    assert all(r["identical_to_resident"] for r in report["rows"]) and s["identical_to_resident"]
    by = {r["contender"]: r for r in report["rows"]}
    assert by[e2e.SPEQ]["k_star"] == s["k_star"] and s["uses_draft"] == by[e2e.SPEQ]["uses_draft"]
    if s["uses_draft"]:  # speq's compute side: the same k, every expert resident
        assert (by[e2e.SPEQ_RESIDENT]["policy"], by[e2e.SPEQ_RESIDENT]["k"]) == (
            "speq",
            s["k_star"],
        )
    else:  # the governor dropped the draft: one token per pass, so resident decoding
        assert s["k_star"] is None and by[e2e.SPEQ_RESIDENT]["policy"] == "resident"
    assert by[e2e.PERFECT]["predictor"] == "oracle" and by[e2e.SPEQ]["predictor"] == "draft"
    assert by[e2e.SPEQ_RESIDENT]["device_memory_bytes"] is None
    assert report["setting"]["memory_counted_as"] == "bfloat16"
    assert 0.2 < report["setting"]["draft_share_of_expert_bytes"] < 0.35  # INT4 + scales vs bf16
    assert by[e2e.ONDEMAND]["device_memory_bytes"] == by[e2e.SPEQ]["device_memory_bytes"]
    assert by[e2e.ONDEMAND_SAME]["cache_slots"] < by[e2e.ONDEMAND]["cache_slots"]
    t = s["tpot_ms"]
    assert s["speq_over_perfect"] == pytest.approx(t[e2e.PERFECT] / t[e2e.SPEQ])
    assert s["best_baseline"] in e2e.BASELINES
    md = out.with_suffix(".md").read_text()
    assert "speq / perfect" in md and "speq / resident" in md and "TPOT (ms)" in md
    assert out.with_suffix(".png").stat().st_size > 0


def _rows(tpot: dict[str, float]) -> list[dict]:
    prompts = {"p": {"tpot_ms": 0.0}}
    return [
        {
            "contender": c,
            "tpot_ms": tpot[c],
            "k_star": 4 if c in (e2e.SPEQ, e2e.PERFECT) else None,
            "uses_draft": c in (e2e.SPEQ, e2e.PERFECT),
            "identical_to_resident": True,
            "prompts": {pid: {**v, "tpot_ms": tpot[c]} for pid, v in prompts.items()},
        }
        for c in e2e.ORDER
    ]


# (speq, speq resident, perfect, ondemand, nextgate) TPOT in ms -> (best baseline, 2.34x goal
# applies, met, 0.9 goal met)
GOALS = [
    ((100, 30, 95, 300, 400), ("ondemand", True, True, True)),  # 3.0x, resident 10x
    ((200, 30, 150, 300, 250), ("nextgate", True, False, False)),  # 1.25x; 0.75 of perfect
    ((100, 120, 100, 250, 500), ("ondemand", False, None, True)),  # resident speq only 2.08x
    ((100, 100, 90, 234, 500), ("ondemand", True, True, True)),  # exactly 2.34x, exactly 0.9
]


@pytest.mark.parametrize("tpots,expected", GOALS)
def test_goals_follow_the_resident_speq_bound(tpots, expected):
    speq_, resident_speq, perfect, ondemand, nextgate = tpots
    tpot = dict.fromkeys(e2e.ORDER, 50.0)
    tpot |= {
        e2e.SPEQ: speq_,
        e2e.SPEQ_RESIDENT: resident_speq,
        e2e.PERFECT: perfect,
        e2e.ONDEMAND: ondemand,
        e2e.NEXTGATE: nextgate,
    }
    s = e2e.summarize_setting(_rows(tpot), "tight", 0.375, "pcie4", "a100-40g-pcie4", 1)
    best, applies, met, perfect_met = expected
    assert s["best_baseline"] == best
    assert s["goal_speedup"] == {"target": 2.34, "applies": applies, "met": met}
    assert s["goal_perfect"]["met"] is perfect_met
    assert s["per_prompt"]["p"]["best_baseline"] == best
