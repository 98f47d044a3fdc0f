import re
import subprocess
import sys

import pytest
import torch

from helpers import tiny_model
from speq.cli import main
from speq.cli.demo import COLUMNS, WIDTH, table


def test_demo_runs_every_policy_and_prints_the_table(capsys):
    assert main(["demo", "--max-new-tokens", "3", "--k", "2"]) == 0
    captured = capsys.readouterr()
    out = captured.out
    assert "TPOT (ms)" in out and "emulated link" in out
    for label in (
        "speq k=2",
        "ondemand",
        "nextgate",
        "fiddler",
        "hostcompute",
        "oracle",
        "resident",
    ):
        assert label in out
    assert "NO" not in out.split("TPOT (ms)")[1]  # every policy produced the resident tokens
    # how long it takes, first; each phase said before it runs; each contender's own figures
    assert re.search(r"takes\s+about\s+\d+\s+s", "\n".join(out.splitlines()[:5]))
    phases = ["calibrating the link on this CPU", "decoding the reference", "running speq k=2..."]
    phases += ["  speq k=2: ", "running ondemand...", "  ondemand: ", "running resident"]
    at = [out.index(phase) for phase in phases]
    assert at == sorted(at) and at[-1] < out.index("| policy")
    assert re.search(r"  speq k=2: [\d.]+ ms/token, hit [\d.]+, tok hit [\d.]+, accept", out)
    # the table and its legend fit 100 columns; no bar, no escape code off a terminal
    rows = [line for line in out.splitlines() if line.startswith("|")]
    assert len(rows) == 2 + 8 and all(len(line) <= 100 for line in rows)
    legend = out[out.index(rows[-1]) + len(rows[-1]) :].strip().splitlines()
    assert legend[0].startswith("policy: ") and all(len(line) <= 100 for line in legend)
    assert "\x1b[" not in out + captured.err and "\r" not in captured.err


def test_python_dash_m_speq_demo_through_pipes_writes_no_escape_codes():
    """Piped (not a terminal): no bar, no carriage return, no escape code in either stream; each
    contender's figures are a line on stdout instead of the end of its bar."""
    argv = [sys.executable, "-m", "speq", "demo", "--max-new-tokens", "1", "--k", "1"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    for stream in (done.stdout, done.stderr):
        assert "\x1b[" not in stream and "\r" not in stream
    assert done.stderr == ""
    assert re.search(r"^  ondemand: [\d.]+ ms/token, hit ", done.stdout, re.M)


def test_the_demo_table_fits_100_columns_with_its_widest_labels():
    def row(label, tpot, acceptance=None, same=True):
        rates = dict(hit_rate=0.05, token_hit_rate=0.44, acceptance_rate=acceptance)
        return dict(label=label, cache_slots=32, tpot_ms=tpot, speq_speedup=tpot / 175.2, **rates,
                    elb_recall=acceptance, identical_to_resident=same)  # fmt: skip

    rows = [row("speq (no draft)", 175.2), row("speq (k*=16)", 99.9, 1.0)]
    lines = table([*rows, row("ondemand (speq's cache)", 1283.1, same=False)]).splitlines()
    assert max(map(len, lines)) <= WIDTH
    assert [cell.strip() for cell in lines[0].split("|")[1:-1]] == [h for h, *_ in COLUMNS]
    assert lines[4].split("|")[1:-1] == [
        " ondemand (speq's cache) ", "    32 ", "    1283.1 ", "   7.32x ", " 0.05 ", "    0.44 ",
        "      - ", "       - ", " NO   ",
    ]  # fmt: skip
    legend = " ".join(lines[5:])
    assert all(f"{header}: " in legend for header, *_ in COLUMNS)


def test_generate_text_with_the_shipped_model(capsys):
    assert main(["generate", "--prompt", "In the beginning", "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert "shipped demo MoE" in out and "In the beginning" in out


def _metrics(out: str) -> dict[str, str]:
    """The ``name: value`` lines that `speq generate` prints after the text."""
    names = ("setting", "TPOT", "hit rate", "moved", "host", "acceptance", "expert cache slots")
    lines = [line.split(": ", 1) for line in out.splitlines() if ": " in line]
    return {name: value for name, value in lines if name in names}


def test_generate_offloads_under_a_policy_a_device_memory_and_a_link(capsys):
    """The shipped model in 12 MB (float32: 2 expert slots beside speq's separate draft), a fixed
    k, on the sim backend over a slow link: the text, then every metric with its unit and the
    setting."""
    argv = ["generate", "--policy", "speq", "--device-memory", "12MB", "--k", "2"]
    argv += ["--prompt", "And it came to pass", "--max-new-tokens", "3", "--host-compute", "off"]
    separate = ["--draft-memory", "separate"]
    assert main([*argv, "--backend", "sim", "--link-gbps", "0.03", *separate]) == 0
    out = capsys.readouterr().out
    assert "And it came to pass" in out
    m = _metrics(out)
    assert m["setting"].startswith("policy speq (k=2); backend sim (virtual clock); link 0.03 GB/s")
    assert m["setting"].endswith("device memory 12MB")
    assert re.fullmatch(r"[\d.]+ virtual ms/token \(decoding, prompt excluded\)", m["TPOT"])
    assert re.match(r"[01]\.\d\d of \(layer, expert\) needs resident when needed", m["hit rate"])
    assert re.match(
        r"[\d.]+ MB over the link while decoding \([1-9]\d* expert copies\)", m["moved"]
    )
    assert re.fullmatch(r"[01]\.\d\d of drafted tokens accepted", m["acceptance"])
    slots = (
        r"2 of 32 experts \(2 held at full precision at the end, 0 demoted to INT4 while decoding\)"
    )
    assert re.fullmatch(slots, m["expert cache slots"])
    assert m["host"].startswith("0 (layer, expert) needs computed on the host")
    # shared draft memory (the default): the cache starts full, each expert it evicts is demoted
    assert main([*argv, "--backend", "sim", "--link-gbps", "0.03"]) == 0
    m = _metrics(capsys.readouterr().out)
    shared = re.fullmatch(r"(\d+) of 32 experts \(\d+ held at full precision at the end, (\d+) "
                          r"demoted to INT4 while decoding\)", m["expert cache slots"])  # fmt: skip
    assert shared and int(shared.group(1)) >= 2 and int(shared.group(2)) > 0
    # the same run with host compute: this slow link's misses are computed on the host
    assert main([*argv[:-1], "auto", "--backend", "sim", "--link-gbps", "0.03"]) == 0
    m = _metrics(capsys.readouterr().out)
    host = re.fullmatch(r"(\d+) \(layer, expert\) needs computed on the host instead of the "
                        r"device, [\d.]+ virtual ms of host time", m["host"])  # fmt: skip
    assert host and int(host.group(1)) > 0


def test_generate_with_the_governor_and_a_budget(capsys):
    """No --k: the governor calibrates (said first; its time reported apart from TPOT); --budget
    sizes the device memory as speq demo does; a baseline has no acceptance."""
    base = ["generate", "--random", "--prompt-ids", "1 2 3", "--max-new-tokens", "2"]
    assert main([*base, "--policy", "speq", "--budget", "0.5", "--backend", "sim"]) == 0
    out = capsys.readouterr().out
    assert out.index("calibrating the governor on the sim backend") < out.index("tokens:")
    m = _metrics(out)
    assert re.match(r"policy speq \(governor: (k\*=\d+|no draft)\); backend sim", m["setting"])
    assert re.search(r"device memory [\d.]+ MB \(--budget 0\.5: non-expert weights \+ KV cache "
                     r"\+ 50% of the expert bytes\)$", m["setting"])  # fmt: skip
    assert re.search(r"^governor calibration: [\d.]+ s \(wall clock, not in TPOT\)$", out, re.M)
    assert main([*base, "--policy", "ondemand", "--budget", "0.5", "--link-gbps", "0.5"]) == 0
    m = _metrics(capsys.readouterr().out)
    assert "backend cpu (wall clock); link 0.5 GB/s (--link-gbps)" in m["setting"]
    assert re.fullmatch(r"[\d.]+ ms/token \(decoding, prompt excluded\)", m["TPOT"])
    assert m["acceptance"] == "- (not speculative: policy ondemand)"
    assert re.match(r"\d+ of 32 experts \(\d+ held at full precision", m["expert cache slots"])


def test_generate_from_a_checkpoint_with_token_ids(tmp_path, capsys):
    model = tiny_model(torch.float32)
    model.save_pretrained(tmp_path)
    args = [
        "generate",
        "--checkpoint",
        str(tmp_path),
        "--prompt-ids",
        "1 2 3",
        "--max-new-tokens",
        "4",
    ]
    assert main(args) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("tokens:"))
    assert len(line.split()) == 1 + 7


def test_text_prompt_without_a_tokenizer_is_refused(capsys):
    assert main(["generate", "--random", "--prompt", "hello", "--max-new-tokens", "2"]) == 2
    assert "no tokenizer" in capsys.readouterr().err


def test_generate_reports_errors_cleanly(tmp_path, capsys):
    assert main(["generate", "--checkpoint", str(tmp_path), "--prompt-ids", "1"]) == 2
    assert "config.json" in capsys.readouterr().err


def test_explain_prints_the_ir_after_every_pass(capsys):
    assert main(["explain", "--random"]) == 0
    out = capsys.readouterr().out
    assert "# after capture" in out and "# after fuse_moe" in out and "fused_moe(" in out


def test_tune_without_a_gpu_says_so(capsys):
    if torch.cuda.is_available():
        return
    assert main(["tune"]) == 0
    assert "CUDA" in capsys.readouterr().out


def test_tune_help_lists_its_flags(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["tune", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--model", "--E", "--top-k", "--dtype", "--bits", "--buckets", "--out"):
        assert flag in out
