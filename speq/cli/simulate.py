"""``speq simulate``: what a routing trace says about expert caching, and how fast a model runs
on a GPU with a memory budget, from a trace-driven simulation.

Two modes, picked by the flags:

* the cache replay: ``--trace FILE --cache-policy lru|belady --slots-per-layer N`` replays the
  trace's target routing through a per-layer cache of N expert slots (speq.sim.cache_replay);
* the comparison: ``--model NAME --hardware NAME --budget SIZE`` simulates speq (governed) and
  every baseline (speq.simulate.compare) on a trace: ``--trace FILE`` (a routing log, whose
  draft is drawn at ``--agreement`` and ``--acceptance``, or a speq recorded trace), else one
  generated with the real Mixtral traces' statistics (speq.sim.trace_gen.REFERENCE_STATS).

Each prints a table, or (``--json``) one JSON object.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

from speq.cli.args import POSITIVE_INT

if TYPE_CHECKING:
    from speq.sim.cache_replay import CacheReplay
    from speq.sim.traces import RoutingLog

MODES = (
    "give --trace FILE with --cache-policy lru|belady --slots-per-layer N (a cache replay), or "
    "--model NAME --hardware NAME --budget SIZE (a simulated comparison)"
)


def add_simulate_args(p: argparse.ArgumentParser) -> None:
    """The flags of ``speq simulate``."""
    from speq.sim.cache_replay import REPLAY_POLICIES

    trace_help = "routing to replay: a JSONL routing log (one object per (token, layer): "
    trace_help += "dataset, problem_id, layer, token_idx, experts) or a speq recorded trace (JSON)"
    p.add_argument("--trace", type=Path, metavar="FILE", help=trace_help)
    policy_help = "replay the trace through a per-layer expert cache evicting by this policy "
    policy_help += "(lru: least recently used; belady: used farthest ahead, the optimum)"
    p.add_argument("--cache-policy", choices=tuple(REPLAY_POLICIES), help=policy_help)
    slots_help = "expert slots in each layer's cache (--cache-policy)"
    p.add_argument("--slots-per-layer", type=POSITIVE_INT, metavar="N", help=slots_help)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    model_help = "a model preset (phi-3.5-moe, mixtral-8x7b, ...), a config.json or a checkpoint "
    model_help += "folder (only its config is read): simulate speq and every baseline"
    p.add_argument("--model", help=model_help)
    p.add_argument("--hardware", help="a hardware profile name, or 'measured' (this machine)")
    p.add_argument("--budget", help="device memory for the model, e.g. 24GB (1 GB = 1e9 bytes)")
    p.add_argument("--tokens", type=POSITIVE_INT, default=128, help="new tokens (default 128)")
    p.add_argument("--seed", type=int, default=0, help="the generated trace's seed")
    agree_help = "draft-target expert agreement for a trace without a draft (default 0.9)"
    p.add_argument("--agreement", type=float, help=agree_help)
    accept_help = "P(accept) and P(accept | previous accepted) of a drafted token for a trace "
    accept_help += "without a draft (default 0.75 0.85)"
    p.add_argument("--acceptance", type=float, nargs=2, metavar=("P", "P_AFTER"), help=accept_help)
    p.add_argument("--timeline", type=Path, metavar="FILE", help="speq's cycle, Chrome trace JSON")
    p.add_argument("--plot", type=Path, metavar="FILE", help="speq's cycle as a PNG")


def run(args: argparse.Namespace) -> int:
    """``speq simulate``: the mode its flags ask for."""
    if args.trace is not None and args.cache_policy is not None:
        return _cache_replay(args)
    if args.model is not None:
        from speq.cli.simulate_model import compare_model

        return compare_model(args)
    if args.cache_policy is not None:
        args.simulate_parser.error(f"--cache-policy needs --trace FILE; {MODES}")
    if args.slots_per_layer is not None:
        args.simulate_parser.error(f"--slots-per-layer needs --cache-policy; {MODES}")
    args.simulate_parser.error(MODES)


def _cache_replay(args: argparse.Namespace) -> int:
    from speq.sim.cache_replay import replay
    from speq.sim.traces import read_routing_log

    if args.slots_per_layer is None:
        args.simulate_parser.error("--cache-policy needs --slots-per-layer N")
    log = read_routing_log(args.trace)
    result = replay((s.tokens for s in log.sequences), args.slots_per_layer, args.cache_policy)
    if args.json:
        out = dict(trace=str(args.trace), **result.as_dict())
        out |= dict(num_experts=log.num_experts, top_k=log.top_k, dropped_rows=log.dropped_rows)
        print(json.dumps(out))
    else:
        _print_replay(args.trace, log, result)
    return 0


def _print_replay(trace: Path, log: RoutingLog, result: CacheReplay) -> None:
    routing = f"{result.sequences} sequence(s), {result.tokens} tokens x {result.layers} layers"
    routing += f", top-{log.top_k} of {log.num_experts} experts"
    cache = f"{result.policy}, {result.slots_per_layer} expert slots per layer"
    hits = f"{result.hit_rate:.1%} ({result.hits} hits / {result.lookups} lookups"
    print(f"cache replay of {trace}")
    print(f"  routing: {routing}")
    if log.dropped_rows:
        print(f"  left out: {log.dropped_rows} rows of the last tokens, which some layer lacks")
    print(f"  cache: {cache}, each empty at each sequence's start")
    print(f"hit rate {hits}; a lookup is one expert of one token in one layer)")
    print("hit rate by layer (%):")
    rates = result.layer_hit_rates
    for first in range(0, len(rates), 8):
        row = rates[first : first + 8]
        span = f"{first}-{first + len(row) - 1}"
        print(f"  layers {span:>5}: " + " ".join(f"{100 * r:5.1f}" for r in row))
