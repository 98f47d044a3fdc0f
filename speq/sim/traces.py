"""External routing logs: which experts a real model's routers chose, token by token.

The format (JSONL) is one object per (token, layer) of a generated sequence::

    {"dataset": "gsm8k", "problem_id": 0, "layer": 0, "token_idx": 0, "experts": [6, 5], ...}

``experts`` are the layer's routed experts in the router's order. Other keys (``gating_probs``)
are read past. `read_routing_log` checks what a replay relies on, and refuses with
``FILE:LINE: why`` (or ``FILE: why`` for what no single line holds):

* every line (blank ones aside) is a JSON object with the keys above; ``layer`` and
  ``token_idx`` are integers >= 0, ``experts`` a non-empty list of distinct integers >= 0;
* a (dataset, problem_id, token_idx, layer) appears once;
* in each sequence, one (dataset, problem_id), every layer 0, 1, ..., L-1 has rows (the same L
  across the file), and each layer's tokens run 0, 1, 2, ... without a gap.

A layer's record may end early (the real Mixtral logs lack a layer or a few in their last one to
three tokens): a sequence keeps the tokens that every layer has, 0..T-1, and drops the rows of
later tokens (counted in ``dropped_rows``), so that each kept token has all L layers.

Lines may come in any order: tokens are sorted by ``token_idx``, and sequences are kept in the
order of their first line. `read_routing_log` also takes a speq recorded trace
(`speq.sim.routing_trace.RoutingTrace`, JSON) as one sequence of its target routing, positions in
order; `to_routing_trace` turns a sequence into such a trace for the ``trace`` backend.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from speq.sim.routing_trace import FORMAT, RoutingTrace

__all__ = [
    "RoutedSequence",
    "RoutingLog",
    "from_routing_trace",
    "parse_routing_lines",
    "read_routing_log",
    "read_trace",
    "to_routing_trace",
]

KEYS = ("dataset", "problem_id", "layer", "token_idx", "experts")

Experts = tuple[int, ...]


@dataclass(frozen=True)
class RoutedSequence:
    """One generated sequence's routing: ``tokens[t][layer]`` are the experts that ``layer``
    routed the token with ``token_idx == t`` to, in the router's order."""

    dataset: str
    problem_id: int | str
    tokens: tuple[tuple[Experts, ...], ...]
    dropped_rows: int = 0  # rows of tokens after the last one that every layer has

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    @property
    def num_layers(self) -> int:
        return len(self.tokens[0]) if self.tokens else 0


@dataclass(frozen=True)
class RoutingLog:
    """The sequences of one routing file (``source``: its path, for messages)."""

    source: str
    sequences: tuple[RoutedSequence, ...]

    @property
    def num_layers(self) -> int:
        return max((s.num_layers for s in self.sequences), default=0)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.sequences)

    @property
    def dropped_rows(self) -> int:
        return sum(s.dropped_rows for s in self.sequences)

    @property
    def num_experts(self) -> int:
        """The highest expert id routed to, plus one (a lower bound on the model's experts)."""
        ids = (e for s in self.sequences for t in s.tokens for r in t for e in r)
        return 1 + max(ids, default=-1)

    @property
    def top_k(self) -> int:
        """The most experts any (token, layer) was routed to."""
        return max((len(r) for s in self.sequences for t in s.tokens for r in t), default=0)


def _int(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{what} must be an integer >= 0, got {value!r}")
    return value


def _row(obj) -> tuple[tuple[str, int | str], int, int, Experts]:
    """(sequence key, token_idx, layer, experts) of one parsed line, or a ValueError why not."""
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    missing = [k for k in KEYS if k not in obj]
    if missing:
        raise ValueError(f"missing key(s) {', '.join(missing)} (each line needs {', '.join(KEYS)})")
    dataset, problem = obj["dataset"], obj["problem_id"]
    if not isinstance(dataset, str):
        raise ValueError(f"dataset must be a string, got {dataset!r}")
    if isinstance(problem, bool) or not isinstance(problem, int | str):
        raise ValueError(f"problem_id must be an integer or a string, got {problem!r}")
    experts = obj["experts"]
    if not isinstance(experts, list) or not experts:
        raise ValueError(f"experts must be a non-empty list of expert ids, got {experts!r}")
    ids = tuple(_int(e, "an expert id") for e in experts)
    if len(set(ids)) != len(ids):
        raise ValueError(f"experts lists an expert twice: {experts!r}")
    return (dataset, problem), _int(obj["token_idx"], "token_idx"), _int(obj["layer"], "layer"), ids


def _name(key: tuple[str, int | str]) -> str:
    return f"{key[0]} problem {key[1]!r}"


def parse_routing_lines(lines: Iterable[str], source: str = "<lines>") -> RoutingLog:
    """The `RoutingLog` of JSONL ``lines`` (see the module docstring for what is checked);
    ``source`` names them in errors."""
    rows: dict[tuple[str, int | str], dict[int, dict[int, Experts]]] = {}
    where: dict[tuple, int] = {}  # (sequence, token, layer) -> line, for duplicates
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            key, token, layer, experts = _row(json.loads(line))
        except ValueError as e:  # json.JSONDecodeError is one
            raise ValueError(f"{source}:{number}: {e}") from None
        at = (key, token, layer)
        if at in where:
            raise ValueError(
                f"{source}:{number}: {_name(key)} token_idx {token} layer {layer} again "
                f"(first at line {where[at]})"
            )
        where[at] = number
        rows.setdefault(key, {}).setdefault(token, {})[layer] = experts
    if not rows:
        raise ValueError(f"{source}: no routing rows (expected JSONL: one object per line)")
    log = RoutingLog(source, tuple(_sequence(source, key, tokens) for key, tokens in rows.items()))
    counts = {s.num_layers for s in log.sequences}
    if len(counts) > 1:
        raise ValueError(
            f"{source}: the sequences route different numbers of layers: {sorted(counts)}"
        )
    return log


def _sequence(source: str, key, tokens: dict[int, dict[int, Experts]]) -> RoutedSequence:
    """The sequence of ``tokens[t][layer]``: the tokens that every layer has (see the module
    docstring), or a ValueError naming the first layer that is missing or has a gap."""
    by_layer: dict[int, set[int]] = {}
    for t, layers in tokens.items():
        for layer in layers:
            by_layer.setdefault(layer, set()).add(t)
    num_layers = max(by_layer) + 1
    for layer in range(num_layers):
        seen = by_layer.get(layer, set())
        if not seen:
            raise ValueError(f"{source}: {_name(key)} has no row for layer {layer}")
        gap = min(set(range(max(seen) + 1)) - seen, default=None)
        if gap is not None:
            raise ValueError(
                f"{source}: {_name(key)} layer {layer} has no token_idx {gap} but has later "
                f"ones (a layer's tokens must run 0, 1, 2, ... without a gap)"
            )
    kept = min(len(seen) for seen in by_layer.values())
    rows = tuple(tuple(tokens[t][i] for i in range(num_layers)) for t in range(kept))
    dropped = sum(len(layers) for layers in tokens.values()) - kept * num_layers
    return RoutedSequence(key[0], key[1], rows, dropped)


def from_routing_trace(trace: RoutingTrace, name: str = "trace") -> RoutedSequence:
    """The target routing of a speq recorded trace as one sequence: its positions in order
    (the prompt's first), each a token, with ``name`` as its dataset."""
    rows = []
    for pos in sorted(trace.target):
        layers = trace.target[pos]
        if len(layers) != trace.moe_layers:
            raise ValueError(
                f"position {pos} routes {len(layers)} layers, the trace {trace.moe_layers}"
            )
        rows.append(tuple(tuple(int(e) for e in experts) for experts in layers))
    if not rows:
        raise ValueError("the trace has no target routing")
    return RoutedSequence(name, 0, tuple(rows))


def read_trace(path: str | Path) -> RoutingTrace | RoutingLog:
    """``path`` as it is: a speq recorded trace (JSON, format ``speq-routing-trace/1``) whole,
    draft and acceptance included, or a JSONL routing log. OSError when it cannot be read,
    ValueError (``FILE:LINE: why``) when it is neither."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("{"):
        try:
            whole = json.loads(text)
        except ValueError:  # several objects: JSONL
            whole = None
        if isinstance(whole, dict) and "format" in whole:
            try:
                return RoutingTrace.from_json(whole)
            except (KeyError, TypeError, ValueError) as e:
                why = f"missing key {e}" if isinstance(e, KeyError) else str(e)
                raise ValueError(f"{path}: not a valid {FORMAT} file: {why}") from None
    return parse_routing_lines(text.splitlines(), str(path))


def read_routing_log(path: str | Path) -> RoutingLog:
    """The routing of ``path`` (`read_trace`): a speq recorded trace as one sequence."""
    got = read_trace(path)
    if isinstance(got, RoutingTrace):
        return RoutingLog(str(path), (from_routing_trace(got, Path(path).stem),))
    return got


def to_routing_trace(seq: RoutedSequence, num_experts: int, prompt_len: int = 1) -> RoutingTrace:
    """A `RoutingTrace` of ``seq``'s target routing alone (no draft, no acceptance), for the
    ``trace`` backend: position p is the token with ``token_idx == p``, so the first
    ``prompt_len`` logged tokens form the prompt (one prefill pass) and each later one a decode
    pass; the trace decodes ``seq.num_tokens - prompt_len + 1`` tokens. Every (token, layer)
    must route the same number of experts, all below ``num_experts``."""
    if not 1 <= prompt_len <= seq.num_tokens:
        raise ValueError(f"prompt_len must be in [1, {seq.num_tokens}], got {prompt_len}")
    ks = {len(r) for t in seq.tokens for r in t}
    if len(ks) != 1:
        name = _name((seq.dataset, seq.problem_id))
        raise ValueError(
            f"{name} routes {sorted(ks)} experts per (token, layer): a trace needs one"
        )
    top = max(e for t in seq.tokens for r in t for e in r)
    if top >= num_experts:
        raise ValueError(f"expert id {top} is not below num_experts ({num_experts})")
    target = {p: [list(r) for r in layers] for p, layers in enumerate(seq.tokens)}
    return RoutingTrace(num_experts, ks.pop(), seq.num_layers, prompt_len, target)
