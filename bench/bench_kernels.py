"""Fused MoE kernel benchmark. Writes bench/results/kernels_{cpu|gpu}.json and prints a table.
The JSON is rewritten after every row, so a run that is stopped (a timeout) keeps the rows it
finished; ``"complete": true`` marks a run that got to the end.

GPU (the default when CUDA is present): bfloat16 at the four preset models' real shapes, T in
{1, 2, 4, 8, 16, 64}. The Triton ``fused_moe`` (dense, and INT4 g128 as the draft uses it) is
timed as the median of CUDA-graph replays (``triton.testing.do_bench_cudagraph``) that rotate
through 8 routings, so the touched experts change between calls as in decoding. Achieved GB/s
is measured against the bytes floor: the weights of the experts the batch touches, read once,
plus the activations in and out; "% of HBM" compares that floor's time at the device's nominal
bandwidth with the measured time. The torch reference (fp32 math) and the grouped torch path are
timed with ``triton.testing.do_bench`` for comparison.

CPU: float32 at the preset shapes with hidden and intermediate sizes divided by ``--divisor``
(default 8): the grouped torch path (fused_moe's CPU backend) against a Hugging Face-style eager
loop (one iteration per expert hit, tokens found with ``torch.where``, separate gate, up and
down projections). Median wall-clock of repeated calls. Then the demo model's draft pass over
its target pass, with the draft's INT4 experts dequantized at every call and through torch's
CPU INT4 matmul (`draft_pass_ratio`).

Both: every shape runs its contenders interleaved in ``--rounds`` rounds (default 3; each round
times every contender once, in the same order); a time is the median over the rounds with its
spread (min-max), and a speed-up is computed within each round, then given as the median and
spread over the rounds ("no difference" when the spread includes 1.0). About 3 minutes on the
project's 2-core CPU with the defaults.

    python bench/bench_kernels.py [--device auto|cpu|gpu] [--tokens 1 2 4 8 16 64]
                                  [--models mixtral-8x7b ...] [--divisor 8] [--rounds 3]
                                  [--budget-s 240]
"""

from __future__ import annotations

import argparse
import functools
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    FORMAT,
    RESULTS,
    environment,
    fmt_speedup,
    git_state,
    interleaved,
    spread,
    table,
    time_cpu_us,
    write_json,
)

from speq.kernels import PRESETS, fused_moe, fused_moe_torch, quantize_experts
from speq.kernels.routing import route_topk_torch
from speq.kernels.shapes import MoEShape

TOKENS = (1, 2, 4, 8, 16, 64)
NUM_ROUTINGS = 8
# Nominal HBM bandwidth in bytes/s, matched as a substring of the device name.
PEAK_BANDWIDTH = {
    "H200": 4.8e12,
    "H100 PCIe": 2.0e12,
    "H100": 3.35e12,
    "A100 80GB PCIe": 1.935e12,
    "A100-SXM4-80GB": 2.039e12,
    "A100": 1.555e12,
    "L40S": 0.864e12,
    "RTX 4090": 1.008e12,
}


def hf_eager_experts(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
) -> torch.Tensor:
    """The routed experts as Hugging Face's eager MoE blocks compute them (e.g. Mixtral's
    SparseMoeBlock): a Python loop over the experts hit, tokens found with torch.where."""
    num_experts, two_i, _ = w13.shape
    inter = two_i // 2
    out = torch.zeros_like(x)
    mask = torch.nn.functional.one_hot(topk_ids.long(), num_classes=num_experts).permute(2, 1, 0)
    hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
    for e in hit.flatten().tolist():
        choice, token = torch.where(mask[e])
        cur = x[token]
        gate = torch.nn.functional.linear(cur, w13[e, :inter])
        up = torch.nn.functional.linear(cur, w13[e, inter:])
        y = torch.nn.functional.linear(torch.nn.functional.silu(gate) * up, w2[e])
        y = y * topk_weights[token, choice, None].to(x.dtype)
        out.index_add_(0, token, y)
    return out


def _weights(shape: MoEShape, dtype: torch.dtype, device: str, seed: int = 0):
    gen = torch.Generator(device=device).manual_seed(seed)
    e, h, i = shape.num_experts, shape.hidden, shape.intermediate
    w13 = torch.randn(e, 2 * i, h, device=device, generator=gen) / math.sqrt(h)
    w2 = torch.randn(e, h, i, device=device, generator=gen) / math.sqrt(i)
    return w13.to(dtype), w2.to(dtype)


def _routings(shape: MoEShape, tokens: int, dtype: torch.dtype, device: str, count: int):
    """``count`` batches (x, topk_ids, topk_weights) with softmax top-k routing of random logits."""
    gen = torch.Generator(device=device).manual_seed(1000 + tokens)
    out = []
    for _ in range(count):
        x = torch.randn(tokens, shape.hidden, device=device, generator=gen).to(dtype)
        logits = torch.randn(tokens, shape.num_experts, device=device, generator=gen)
        ids, weights = route_topk_torch(logits, shape.top_k)
        out.append((x, ids, weights))
    return out


# ------------------------------------------------------------------------------------ rounds
def timed_rounds(rounds: int, timers: dict[str, Callable[[], float]]) -> list[dict[str, float]]:
    """Each timer (returning microseconds) once per round, interleaved: one {name: µs} per round."""
    return interleaved(rounds, list(timers), lambda _r, name: timers[name]())


def time_spread(per_round: list[dict[str, float]], name: str) -> dict[str, Any]:
    """The median and spread (min-max) of one contender's time over the rounds (µs)."""
    return spread([rd[name] for rd in per_round])


def ratio_spread(per_round: list[dict[str, float]], num: str, den: str) -> dict[str, Any]:
    """``num``'s time over ``den``'s, computed within each round; median and spread."""
    return spread([rd[num] / rd[den] for rd in per_round])


def fmt_time(s: dict[str, Any] | None) -> str:
    return "-" if s is None else f"{s['median']:.1f} ({s['min']:.1f}-{s['max']:.1f})"


# ----------------------------------------------------------------------------------------- CPU
def run_cpu(args: argparse.Namespace, save: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """The CPU table; ``save(result)`` after each row (the rows so far)."""
    # One thread by default: on a small shared machine, OpenMP workers waiting for a busy
    # core turn microsecond matmuls into scheduler ticks, and the numbers into noise.
    torch.set_num_threads(args.threads)
    dtype = torch.float32
    rows: list[dict[str, Any]] = []
    setting = (
        f"CPU, float32, preset shapes with H and I divided by {args.divisor}; grouped torch path "
        f"(fused_moe backend='torch') vs a Hugging Face-style eager loop over experts; each time "
        f"is the median wall-clock of >= {args.min_time_s} s of calls, {torch.get_num_threads()} "
        f"torch thread(s); {args.rounds} interleaved rounds, median (min-max) over them"
    )
    columns = {
        "model": "model",
        "T": "T (tokens)",
        "experts_hit": "experts hit",
        "hf_loop_us": "HF eager loop (µs)",
        "grouped_us": "grouped torch (µs)",
        "speedup": "speed-up of grouped (×)",
    }
    result = dict(setting=setting, rows=rows, columns=columns)
    shapes = [PRESETS[m].scaled(args.divisor) for m in args.models]
    work = len(shapes) * len(args.tokens)
    bar = tqdm(total=work, desc="bench_kernels[cpu]", unit="shape", file=sys.stderr)
    for shape in shapes:
        w13, w2 = _weights(shape, dtype, "cpu")
        for tokens in args.tokens:
            x, ids, weights = _routings(shape, tokens, dtype, "cpu", 1)[0]
            fast = functools.partial(fused_moe, x, w13, w2, ids, weights, backend="torch")
            hf = functools.partial(hf_eager_experts, x, w13, w2, ids, weights)
            diff = (fast() - hf()).abs().max().item()
            per_round = timed_rounds(
                args.rounds,
                {
                    "hf_loop": functools.partial(time_cpu_us, hf, min_time_s=args.min_time_s),
                    "grouped": functools.partial(time_cpu_us, fast, min_time_s=args.min_time_s),
                },
            )
            rows.append(
                dict(
                    model=shape.name,
                    E=shape.num_experts,
                    top_k=shape.top_k,
                    H=shape.hidden,
                    I=shape.intermediate,
                    T=tokens,
                    experts_hit=int(torch.unique(ids).numel()),
                    hf_loop_us=time_spread(per_round, "hf_loop"),
                    grouped_us=time_spread(per_round, "grouped"),
                    speedup=ratio_spread(per_round, "hf_loop", "grouped"),
                    max_abs_diff=diff,
                )
            )
            save(result)
            bar.update()
    bar.close()
    return result


def draft_pass_ratio(rounds: int) -> dict[str, Any]:
    """The demo model's one-token draft pass against its target pass (float64, every expert
    resident), the draft's INT4 experts dequantized at every call (as before the CPU INT4
    kernel) and through torch's CPU INT4 matmul (`speq.kernels.quant.CpuInt4Experts`), in
    interleaved rounds: ms per pass and the draft / target ratio, median (min-max)."""
    import speq
    from speq.ir.program import DRAFT_PREFIX
    from speq.models.demo import demo_model

    model, tokenizer = demo_model(dtype=torch.float64)
    cm = speq.compile(model, speq.CompileOptions(policy="speq", k=1))
    engine = cm.engine
    prompt = torch.tensor([tokenizer.encode("And it came to pass, when the king")])
    int4 = dict(engine.draft.params)
    group = cm.options.draft_group_size
    dequantized = {
        name: quantize_experts(engine.store.expert_param(name.removeprefix(DRAFT_PREFIX)), 4, group)
        for name in int4
    }

    def draft_ms(params) -> float:
        engine.draft.params = params
        return engine.calibrator.time_passes(prompt, (1,), repeats=9)[0] * 1e3

    def target_ms() -> float:
        return engine.calibrator.time_passes(prompt, (1,), repeats=9)[1][1] * 1e3

    timers = {
        "target": target_ms,
        "draft_dequantize": lambda: draft_ms(dequantized),
        "draft_cpu_int4": lambda: draft_ms(int4),
    }
    per_round = interleaved(rounds, list(timers), lambda _r, name: timers[name]())
    engine.draft.params = int4
    return dict(
        setting="demo model, float64, one token per pass, every expert resident, wall-clock ms "
        f"(median of 9 passes), {rounds} interleaved rounds, median (min-max)",
        ms={name: spread([r[name] for r in per_round]) for name in timers},
        draft_over_target={
            name: spread([r[name] / r["target"] for r in per_round])
            for name in ("draft_dequantize", "draft_cpu_int4")
        },
    )


# ----------------------------------------------------------------------------------------- GPU
def _peak_bandwidth(name: str) -> float | None:
    for key, bw in PEAK_BANDWIDTH.items():
        if key in name:
            return bw
    return None


def _cycle(fns: list[Callable[[], object]]) -> Callable[[], object]:
    """One call per invocation, rotating through ``fns`` (a graph capture records each)."""
    state = {"i": 0}

    def call() -> object:
        fn = fns[state["i"] % len(fns)]
        state["i"] += 1
        return fn()

    return call


def _cudagraph_us(fn: Callable[[], object]) -> float:
    import triton.testing

    return 1e3 * triton.testing.do_bench_cudagraph(fn, return_mode="median")


def _do_bench_us(fn: Callable[[], object]) -> float:
    import triton.testing

    return 1e3 * triton.testing.do_bench(fn, return_mode="median")


def run_gpu(args: argparse.Namespace, save: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """The GPU table; ``save(result)`` after each row (the rows so far)."""
    dtype, dev = torch.bfloat16, "cuda"
    name = torch.cuda.get_device_name()
    peak = _peak_bandwidth(name)
    deadline = time.monotonic() + args.budget_s
    rows: list[dict[str, Any]] = []
    skipped: list[tuple[str, int]] = []
    setting = (
        f"GPU {name}, bfloat16 activations, real preset shapes; Triton timed as the median of "
        f"CUDA-graph replays over {NUM_ROUTINGS} rotating routings; bytes floor = touched "
        f"experts' weights once + activations (GB/s and % from the median time); nominal HBM "
        f"{'%.2f TB/s' % (peak / 1e12) if peak else 'unknown'}; {args.rounds} interleaved "
        f"rounds, median (min-max) over them"
    )
    columns = {
        "model": "model",
        "T": "T (tokens)",
        "experts_hit": "experts hit (mean)",
        "bf16_us": "Triton bf16 (µs)",
        "bf16_gbps": "bf16 (GB/s)",
        "bf16_pct_hbm": "bf16 (% of HBM floor)",
        "int4_us": "Triton int4 (µs)",
        "int4_gbps": "int4 (GB/s)",
        "torch_grouped_us": "torch grouped (µs)",
        "torch_ref_us": "torch ref fp32 (µs)",
        "speedup_vs_ref": "speedup vs ref (×)",
    }
    result = dict(setting=setting, rows=rows, columns=columns, skipped=skipped, peak_bw=peak)
    work = [(m, t) for m in args.models for t in args.tokens]
    bar = tqdm(total=len(work), desc="bench_kernels[gpu]", file=sys.stderr)
    for model in args.models:
        shape = PRESETS[model]
        if time.monotonic() > deadline:
            skipped += [(model, t) for t in args.tokens]
            continue
        w13, w2 = _weights(shape, dtype, dev)
        q13, q2 = quantize_experts(w13, 4, 128), quantize_experts(w2, 4, 128)
        slots = torch.arange(shape.num_experts, dtype=torch.int32, device=dev)
        dense_expert = shape.expert_bytes(2)
        int4_expert = (q13.nbytes + q2.nbytes) / shape.num_experts
        for tokens in args.tokens:
            if time.monotonic() > deadline:
                skipped.append((model, tokens))
                bar.update()
                continue
            batches = _routings(shape, tokens, dtype, dev, NUM_ROUTINGS)
            hit = sum(int(torch.unique(ids).numel()) for _, ids, _ in batches) / len(batches)
            act_bytes = 2 * tokens * shape.hidden * 2  # x in, out back, bf16
            x0, ids0, w0 = batches[0]
            err = (
                (fused_moe(x0, w13, w2, ids0, w0, slots) - fused_moe_torch(x0, w13, w2, ids0, w0))
                .abs()
                .max()
                .item()
            )
            row: dict[str, Any] = dict(
                model=model, T=tokens, experts_hit=hit, max_abs_err_vs_ref=err
            )
            timers: dict[str, Callable[[], float]] = {}
            for label, a, b in (("bf16", w13, w2), ("int4", q13, q2)):
                fns = [functools.partial(fused_moe, x, a, b, i, w, slots) for x, i, w in batches]
                fns[0]()  # compile outside the capture
                timers[label] = functools.partial(_cudagraph_us, _cycle(fns))
            grouped = functools.partial(fused_moe, x0, w13, w2, ids0, w0, slots, backend="torch")
            ref = functools.partial(fused_moe_torch, x0, w13, w2, ids0, w0, slots)
            timers["torch_grouped"] = functools.partial(_do_bench_us, grouped)
            timers["torch_ref"] = functools.partial(_do_bench_us, ref)
            per_round = timed_rounds(args.rounds, timers)
            for label, per_expert in (("bf16", dense_expert), ("int4", int4_expert)):
                t = time_spread(per_round, label)
                floor_bytes = hit * per_expert + act_bytes
                row[f"{label}_us"] = t
                row[f"{label}_gbps"] = floor_bytes / t["median"] / 1e3
                row[f"{label}_pct_hbm"] = (
                    100 * (floor_bytes / peak * 1e6) / t["median"] if peak is not None else None
                )
            row["torch_grouped_us"] = time_spread(per_round, "torch_grouped")
            row["torch_ref_us"] = time_spread(per_round, "torch_ref")
            row["speedup_vs_ref"] = ratio_spread(per_round, "torch_ref", "bf16")
            rows.append(row)
            save(result)
            bar.update()
        del w13, w2, q13, q2
        torch.cuda.empty_cache()
    bar.close()
    return result


def printable(row: dict[str, Any]) -> dict[str, Any]:
    """A result row with its spreads as text: times "median (min-max)", speed-ups as
    common.fmt_speedup writes them."""
    out = dict(row)
    for key, value in row.items():
        if isinstance(value, dict) and "median" in value:
            out[key] = fmt_speedup(value) if key.startswith("speedup") else fmt_time(value)
    return out


def build_parser() -> argparse.ArgumentParser:
    """The command line (bench/gpu_check.py's test parses the command it builds with it)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("auto", "cpu", "gpu"), default="auto")
    parser.add_argument("--tokens", type=int, nargs="+", default=list(TOKENS))
    parser.add_argument("--models", nargs="+", choices=list(PRESETS), default=list(PRESETS))
    parser.add_argument("--divisor", type=int, default=8, help="CPU: divide H and I by this")
    parser.add_argument("--min-time-s", type=float, default=0.25, help="CPU: time per number")
    parser.add_argument("--threads", type=int, default=1, help="CPU: torch threads")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (>= 1)")
    parser.add_argument("--budget-s", type=float, default=240.0, help="GPU: stop starting rows")
    parser.add_argument("--out", type=Path, default=RESULTS)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)

    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    gpu = args.device == "gpu" or (args.device == "auto" and torch.cuda.is_available())
    if gpu and not torch.cuda.is_available():
        print("bench_kernels: --device gpu needs a CUDA device; none found.")
        return 0
    code = git_state()  # at the start: the code the numbers were measured on
    env = environment()
    path = args.out / f"kernels_{'gpu' if gpu else 'cpu'}.json"
    start = time.perf_counter()

    def save(result: dict[str, Any], complete: bool = False) -> Path:
        """The file as it stands: rewritten after every row, so a run that is stopped keeps
        the rows it finished (``complete`` is False until the last one is in)."""
        payload = dict(
            format=FORMAT,
            benchmark="kernels",
            device="gpu" if gpu else "cpu",
            setting=result["setting"],
            rounds=args.rounds,
            code=code,
            environment=env,
            seconds=time.perf_counter() - start,
            complete=complete,
            rows=result["rows"],
            **{k: v for k, v in result.items() if k not in ("setting", "rows", "columns")},
        )
        return write_json(path, payload)

    result = run_gpu(args, save) if gpu else run_cpu(args, save)
    if not gpu:
        result["draft_pass"] = draft_pass_ratio(args.rounds)
    save(result, complete=True)
    print(f"# {result['setting']}")
    print(table([printable(row) for row in result["rows"]], result["columns"]))
    if "draft_pass" in result:
        d = result["draft_pass"]
        print(f"# draft / target pass time, {d['setting']}:")
        for name, r in d["draft_over_target"].items():
            ratio = f"{r['median']:.2f}x ({r['min']:.2f}-{r['max']:.2f})"
            print(f"#   {name}: {ratio} ({fmt_time(d['ms'][name])} ms per draft pass)")
    print(f"# wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
