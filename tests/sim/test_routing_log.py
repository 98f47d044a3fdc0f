"""External routing logs (speq.sim.traces): reading JSONL in any line order, what is refused
(with FILE:LINE), the trailing tokens a layer lacks, speq recorded traces, and the conversion
to a `RoutingTrace`."""

from __future__ import annotations

import json
import random

import pytest

from speq.sim.routing_trace import RoutingTrace
from speq.sim.traces import (
    RoutedSequence,
    from_routing_trace,
    parse_routing_lines,
    read_routing_log,
    to_routing_trace,
)

# (dataset, problem_id) -> tokens[t][layer] = experts
LOG = {
    ("gsm8k", 0): [[[1, 0], [2, 3]], [[1, 2], [3, 2]], [[0, 3], [2, 1]]],
    ("gsm8k", 1): [[[3, 1], [0, 2]]],
}


def rows(log=LOG) -> list[dict]:
    return [
        dict(dataset=d, problem_id=p, layer=i, token_idx=t, experts=e, gating_probs=[0.6, 0.4])
        for (d, p), tokens in log.items()
        for t, layers in enumerate(tokens)
        for i, e in enumerate(layers)
    ]


def lines(objs) -> list[str]:
    return [json.dumps(o) for o in objs]


def test_reads_sequences_in_any_line_order(tmp_path):
    shuffled = rows()
    random.Random(0).shuffle(shuffled)
    path = tmp_path / "log.jsonl"
    path.write_text("\n".join(lines(shuffled)) + "\n\n")  # a blank line is skipped
    log = read_routing_log(path)
    assert log == parse_routing_lines(lines(rows()), str(path))  # the file's order is irrelevant
    first = next(s for s in log.sequences if s.problem_id == 0)
    tokens = (((1, 0), (2, 3)), ((1, 2), (3, 2)), ((0, 3), (2, 1)))
    assert first == RoutedSequence("gsm8k", 0, tokens)
    assert {(s.dataset, s.problem_id) for s in log.sequences} == set(LOG)
    assert (log.num_layers, log.num_tokens, log.num_experts, log.top_k) == (2, 4, 4, 2)
    assert log.dropped_rows == 0 and log.source == str(path)


def test_sequences_keep_the_order_of_their_first_line():
    log = parse_routing_lines(lines(rows()[6:] + rows()[:6]))
    assert [s.problem_id for s in log.sequences] == [1, 0]


def test_a_layers_record_may_end_early():
    """The real logs lack a layer in their last tokens: the tokens every layer has are kept."""
    objs = rows()
    del objs[5]  # sequence 0, token 2 (its last), layer 1
    log = parse_routing_lines(lines(objs))
    assert [s.num_tokens for s in log.sequences] == [2, 1]
    assert log.dropped_rows == 1 and log.sequences[0].dropped_rows == 1


def _set(i, value):
    return lambda objs: objs.__setitem__(i, value)


def _update(i, **fields):
    return lambda objs: objs[i].update(fields)


# (case, change to the rows of LOG, the error); LOG's rows: sequence 0 on lines 1-6 (token 0
# layers 0 and 1, token 1, token 2), sequence 1 on lines 7-8
BAD = [
    ("not JSON", _set(2, "{nope"), r"log:3: Expecting property name"),
    ("not an object", _set(0, [1, 2]), r"log:1: expected a JSON object, got list"),
    ("missing key", lambda o: o[1].pop("experts"), r"log:2: missing key\(s\) experts"),
    ("negative layer", _update(0, layer=-1), r"log:1: layer must be an integer >= 0, got -1"),
    ("float token", _update(0, token_idx=1.0), r"log:1: token_idx must be an integer"),
    ("no experts", _update(0, experts=[]), r"log:1: experts must be a non-empty list"),
    ("expert twice", _update(0, experts=[2, 2]), r"log:1: experts lists an expert twice"),
    ("bool expert", _update(0, experts=[True, 2]), r"log:1: an expert id must be an integer"),
    ("problem_id", _update(0, problem_id=None), r"log:1: problem_id must be an integer or"),
    ("dataset", _update(0, dataset=3), r"log:1: dataset must be a string"),
    (
        "duplicate row",
        lambda o: o.append(dict(o[1])),
        r"log:9: gsm8k problem 0 token_idx 0 layer 1 again \(first at line 2\)",
    ),
    (
        "token gap",
        lambda o: o.__delitem__(slice(2, 4)),
        r"log: gsm8k problem 0 layer 0 has no token_idx 1 but has later ones",
    ),
    (
        "layer gap",
        lambda o: o.__delitem__(slice(0, 6, 2)),
        r"log: gsm8k problem 0 has no row for layer 0",
    ),
]


@pytest.mark.parametrize(("change", "message"), [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_refused_with_file_and_line(change, message):
    objs = [dict(o) for o in rows()]
    change(objs)
    with pytest.raises(ValueError, match=f"^{message}"):
        parse_routing_lines([o if isinstance(o, str) else json.dumps(o) for o in objs], "log")


def test_refused_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_routing_log(tmp_path / "absent.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match=r"empty.jsonl: no routing rows"):
        read_routing_log(tmp_path / "empty.jsonl")
    other = rows({("gsm8k", 5): [[[0, 1]]]})  # one layer where the others have two
    (tmp_path / "mixed.jsonl").write_text("\n".join(lines(rows() + other)))
    with pytest.raises(ValueError, match=r"mixed.jsonl: the sequences route different numbers"):
        read_routing_log(tmp_path / "mixed.jsonl")
    (tmp_path / "trace.json").write_text(json.dumps({"format": "speq-routing-trace/9"}))
    with pytest.raises(ValueError, match=r"trace.json: not a valid speq-routing-trace/1 file"):
        read_routing_log(tmp_path / "trace.json")


def test_a_speq_trace_is_one_sequence_and_round_trips(tmp_path):
    seq = parse_routing_lines(lines(rows())).sequences[0]
    trace = to_routing_trace(seq, num_experts=4, prompt_len=2)
    assert (trace.num_experts, trace.top_k, trace.moe_layers, trace.prompt_len) == (4, 2, 2, 2)
    assert trace.target == {0: [[1, 0], [2, 3]], 1: [[1, 2], [3, 2]], 2: [[0, 3], [2, 1]]}
    assert (trace.positions, trace.decode_tokens) == (3, 2)
    assert not trace.draft and not trace.accept and not trace.passes
    trace.save(tmp_path / "run.json")
    log = read_routing_log(tmp_path / "run.json")
    assert log.sequences == (RoutedSequence("run", 0, seq.tokens),)


def test_to_routing_trace_refuses():
    seq = parse_routing_lines(lines(rows())).sequences[0]
    with pytest.raises(ValueError, match=r"expert id 3 is not below num_experts \(3\)"):
        to_routing_trace(seq, num_experts=3)
    with pytest.raises(ValueError, match=r"prompt_len must be in \[1, 3\]"):
        to_routing_trace(seq, 4, prompt_len=4)
    ragged = RoutedSequence("x", 0, (((0, 1),), ((2,),)))
    with pytest.raises(ValueError, match=r"routes \[1, 2\] experts per \(token, layer\)"):
        to_routing_trace(ragged, 4)
    short = RoutingTrace(4, 2, 2, target={0: [[0, 1]]})
    with pytest.raises(ValueError, match="position 0 routes 1 layers, the trace 2"):
        from_routing_trace(short)
