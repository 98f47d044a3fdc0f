"""bench/bench_overhead.py: a tiny run writes the current result format, its rounds' spreads, and
speq's tokens equal the eager loop's (no timing is asserted)."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import bench_overhead
import common
import update_readme


def test_a_tiny_run_records_overhead_and_calibration(tmp_path):
    argv = ["--layers", "2", "--tokens", "4", "--rounds", "2", "--out", str(tmp_path)]
    argv += ["--quantize-width", "128"]
    assert bench_overhead.main(argv) == 0
    report = json.loads((tmp_path / "overhead_cpu.json").read_text())
    assert report["format"] == common.FORMAT and report["code"]["commit"]
    (row,) = report["rows"]
    assert row["same_tokens"] and row["calibration_s"] > 0 and row["nodes"] > 0
    assert len(row["overhead_ms"]["rounds"]) == 2
    assert set(report["goals"]) == {
        "us_per_node", "ms_at_32_layers", "calibration_s_at_32_layers", "draft_quantize_peak_x"
    }  # fmt: skip
    assert report["quantize"]["draft_bytes"] > 0 and report["quantize"]["ratio"] >= 0
    assert "2 interleaved rounds" in update_readme.overhead_block(report)
