"""bench/bench_kernels.py (CPU path): a tiny run writes the current result format with the
commit, interleaved rounds and per-round spreads, its speed-up taken round by round, outputs that
agree, and bench/update_readme.py renders it (no timing is asserted); the file is rewritten after
every row, so a stopped run keeps the rows it finished."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import bench_kernels
import common
import update_readme


def test_a_tiny_cpu_run_records_rounds_spreads_and_the_commit(tmp_path):
    argv = ["--device", "cpu", "--models", "mixtral-8x7b", "--tokens", "1", "4"]
    argv += ["--divisor", "32", "--min-time-s", "0.005", "--rounds", "3", "--out", str(tmp_path)]
    assert bench_kernels.main(argv) == 0
    report = json.loads((tmp_path / "kernels_cpu.json").read_text())
    assert report["format"] == common.FORMAT and report["rounds"] == 3 and report["complete"]
    assert report["code"]["commit"]
    assert [r["T"] for r in report["rows"]] == [1, 4]
    for row in report["rows"]:
        assert row["max_abs_diff"] < 1e-4  # the grouped path computes the eager loop's output
        for key in ("hf_loop_us", "grouped_us", "speedup"):
            s = row[key]
            assert len(s["rounds"]) == 3 and s["min"] <= s["median"] <= s["max"]
        ratios = [a / b for a, b in zip(row["hf_loop_us"]["rounds"], row["grouped_us"]["rounds"])]
        assert row["speedup"]["rounds"] == ratios  # each round's ratio from that round's times
    d = report["draft_pass"]  # the demo model's draft pass over its target pass, both paths
    for name in ("draft_dequantize", "draft_cpu_int4"):
        assert len(d["draft_over_target"][name]["rounds"]) == 3 and d["ms"][name]["median"] > 0
    block = update_readme.kernels_block(report)
    assert "3 interleaved rounds" in block and "mixtral-8x7b/32" in block
    assert "torch's CPU INT4 matmul" in block
    assert update_readme.is_current(report)


def test_an_old_kernels_file_is_pending():
    note = update_readme.pending("kernels_cpu.json", {"setting": "x"})
    assert "python bench/bench_kernels.py" in note and "no rounds" in note


def test_the_rows_are_saved_as_each_one_finishes(tmp_path):
    argv = ["--device", "cpu", "--models", "mixtral-8x7b", "--tokens", "1", "2", "--divisor", "64"]
    args = bench_kernels.build_parser().parse_args([*argv, "--min-time-s", "0", "--rounds", "1"])
    saved = []
    result = bench_kernels.run_cpu(args, lambda r: saved.append([row["T"] for row in r["rows"]]))
    assert saved == [[1], [1, 2]] and [row["T"] for row in result["rows"]] == [1, 2]
