"""``speq simulate --trace FILE --cache-policy lru|belady --slots-per-layer N [--json]``: the
hit rates of a per-layer expert cache replayed over a routing log, and the refusals (one line,
exit status 2, no traceback)."""

from __future__ import annotations

import json

import pytest

from speq.cli import main
from speq.sim.traces import parse_routing_lines, to_routing_trace

# The sequence of tests/sim/test_cache_replay.py counted by hand: layer 0 has LRU 2 hits / 8 and
# Belady 3 / 8 with 2 slots, layer 1 6 / 8 for both.
SEQ = [[[0, 1], [5, 6]], [[2, 0], [5, 6]], [[0, 1], [6, 5]], [[2, 1], [5, 6]]]


def jsonl(seqs: dict) -> str:
    objs = [
        dict(dataset=d, problem_id=p, layer=i, token_idx=t, experts=e)
        for (d, p), tokens in seqs.items()
        for t, layers in enumerate(tokens)
        for i, e in enumerate(layers)
    ]
    return "\n".join(json.dumps(o) for o in reversed(objs)) + "\n"  # the order is irrelevant


@pytest.fixture
def log(tmp_path):
    path = tmp_path / "routing.jsonl"
    path.write_text(jsonl({("toy", 0): SEQ, ("toy", 1): SEQ}))
    return path


def simulate(capsys, *argv: str) -> dict:
    assert main(["simulate", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize(("policy", "hits"), [("lru", 2 + 6), ("belady", 3 + 6)])
def test_json_hit_rate(log, capsys, policy, hits):
    out = simulate(capsys, "--trace", str(log), "--cache-policy", policy, "--slots-per-layer", "2")
    # two sequences, each starting with empty caches: twice the one sequence's counts
    assert (out["hits"], out["lookups"], out["hit_rate"]) == (2 * hits, 32, hits / 16)
    assert (out["sequences"], out["layers"], out["tokens"]) == (2, 2, 8)
    assert (out["slots_per_layer"], out["cache_policy"], out["trace"]) == (2, policy, str(log))
    assert out["layer_hit_rates"] == [(hits - 6) / 8, 6 / 8]
    assert (out["num_experts"], out["top_k"], out["dropped_rows"]) == (7, 2, 0)


def test_the_table_says_the_setting(log, capsys):
    argv = ["simulate", "--trace", str(log), "--cache-policy", "belady", "--slots-per-layer", "2"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "hit rate 56.2% (18 hits / 32 lookups" in out
    assert "belady, 2 expert slots per layer" in out and "2 sequence(s), 8 tokens x 2 layers" in out
    assert "layers   0-1:  37.5  75.0" in out


def test_a_speq_recorded_trace_is_one_sequence(tmp_path, capsys):
    seq = parse_routing_lines(jsonl({("toy", 0): SEQ}).splitlines()).sequences[0]
    to_routing_trace(seq, num_experts=8).save(tmp_path / "trace.json")
    argv = ["--trace", str(tmp_path / "trace.json"), "--cache-policy", "lru"]
    out = simulate(capsys, *argv, "--slots-per-layer", "2")
    assert (out["sequences"], out["hits"], out["lookups"]) == (1, 8, 16)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--cache-policy", "fifo", "--slots-per-layer", "2"],
            r"--cache-policy 'fifo': expected one of 'lru', 'belady'",
        ),
        (
            ["--cache-policy", "lru", "--slots-per-layer", "0"],
            r"--slots-per-layer 0: expected an integer >= 1",
        ),
        (["--cache-policy", "lru"], r"--cache-policy needs --slots-per-layer N"),
        ([], r"give --trace FILE with --cache-policy"),
    ],
)
def test_refused_flags(log, capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        main(["simulate", "--trace", str(log), *argv])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("speq: error: ") and message in err and len(err.splitlines()) == 1


def test_refused_files(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(jsonl({("toy", 0): SEQ[:1]}) + "{not json\n")
    cases = [
        (tmp_path / "absent.jsonl", "absent.jsonl: No such file or directory"),
        (bad, f"{bad}:3: Expecting property name"),
        (tmp_path, "Is a directory"),
    ]
    for path, message in cases:
        argv = ["simulate", "--trace", str(path), "--cache-policy", "lru", "--slots-per-layer", "2"]
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("speq: error: ") and message in err and len(err.splitlines()) == 1


# ---------------------------------------------------------------- --model --hardware --budget
def test_model_mode_compares_speq_with_every_baseline(capsys, tmp_path):
    from speq.models.demo import DEMO_CHECKPOINT
    from speq.simulate import CONTENDERS

    args = ["simulate", "--model", str(DEMO_CHECKPOINT), "--hardware", "a100-40g-pcie4"]
    args += ["--budget", "12MB", "--tokens", "12", "--json", "--timeline", str(tmp_path / "t.json")]
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["contenders"]) == set(CONTENDERS)
    for name, r in out["contenders"].items():
        assert {"tpot_ms", "hit_rate", "bytes_per_token"} <= set(r), name
    speq, sm = out["contenders"]["speq"], out["contenders"]["mixtral-offloading-sm"]
    assert "k" in speq and sm["tpot_ms"] > out["contenders"]["resident"]["tpot_ms"] > 0
    assert out["contenders"]["transformers-layerwise"]["hit_rate"] < 1
    events = json.loads((tmp_path / "t.json").read_text())["traceEvents"]
    assert {e["tid"] for e in events} >= {"pass", "compute"}


def test_model_mode_reads_a_hugging_face_config_and_plots(capsys, tmp_path):
    """Only the config is read: a Mixtral config.json of the demo's shape, no weights."""
    from speq.models.demo import DEMO_CHECKPOINT
    from speq.models.hf.mixtral import hf_config
    from speq.simulate import model_config

    cfg = model_config(str(DEMO_CHECKPOINT))
    (tmp_path / "config.json").write_text(json.dumps(hf_config(cfg)))
    assert model_config(str(tmp_path)).num_experts == cfg.num_experts
    args = ["simulate", "--model", str(tmp_path / "config.json"), "--hardware", "h100-pcie5"]
    args += ["--budget", "12MB", "--tokens", "8", "--plot", str(tmp_path / "cycle.png")]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "mixtral-offloading-sm" in out and "TPOT (ms)" in out
    assert (tmp_path / "cycle.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(
    "args,match",
    [
        (["--model", "phi-3.5-moe", "--budget", "24GB"], "needs --hardware"),
        (["--model", "nope", "--hardware", "h200", "--budget", "24GB"], "not a preset"),
        (["--model", "phi-3.5-moe", "--hardware", "tpu", "--budget", "24GB"], "unknown hardware"),
        (["--model", "phi-3.5-moe", "--hardware", "h200", "--budget", "lots"], "--budget"),
    ],
)
def test_model_mode_refusals(capsys, args, match):
    with pytest.raises(SystemExit) as e:
        main(["simulate", *args])
    assert e.value.code == 2 and match in capsys.readouterr().err


def test_model_mode_refuses_a_trace_of_another_shape(capsys, log):
    with pytest.raises(SystemExit):
        main(["simulate", "--model", "phi-3.5-moe", "--hardware", "h200", "--budget", "90GB",
              "--trace", str(log)])  # fmt: skip
    assert "phi-3.5-moe has top-2 of 16" in capsys.readouterr().err


def test_generate_records_a_trace_that_simulate_reads(capsys, tmp_path):
    from speq.sim.routing_trace import RoutingTrace

    path = tmp_path / "run.json"
    args = ["generate", "--prompt-ids", "5 6 7 8", "--max-new-tokens", "10", "--policy", "speq"]
    args += ["--k", "2", "--budget", "0.375", "--backend", "sim", "--record-trace", str(path)]
    assert main(args) == 0
    capsys.readouterr()
    trace = RoutingTrace.load(path)
    assert trace.prompt_len == 4 and trace.draft and trace.accept and trace.passes
    out = simulate(capsys, "--trace", str(path), "--cache-policy", "lru", "--slots-per-layer", "2")
    assert out["sequences"] == 1 and out["tokens"] == trace.positions


def test_generate_refuses_to_record_a_sampled_run(capsys, tmp_path):
    args = ["generate", "--prompt-ids", "5 6", "--sample", "--record-trace", str(tmp_path / "t")]
    assert main(args) == 2 and "greedy" in capsys.readouterr().err
