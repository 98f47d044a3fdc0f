"""bench/bench_paper.py --quick: one paper-scale setting simulated end to end, written in the
current result format with every contender, and rendered by bench/update_readme.py (no figure
is asserted beyond its sanity)."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import bench_paper
import common
import update_readme

from speq.simulate import CONTENDERS


def test_a_quick_run_simulates_one_setting_and_renders(tmp_path):
    assert bench_paper.main(["--quick", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "paper_sim.json").read_text())
    assert report["format"] == common.FORMAT and report["code"]["commit"]
    (row,) = report["rows"]
    c = row["contenders"]
    assert set(c) == set(CONTENDERS)
    assert c["resident"]["tpot_ms"] < c["mixtral-offloading-sm"]["tpot_ms"]
    assert c["transformers-layerwise"]["tpot_ms"] > c["mixtral-offloading-sm"]["tpot_ms"]
    text = update_readme.paper_block(report)
    assert "No GPU ran any of this" in text and "phi-3.5-moe" in text
