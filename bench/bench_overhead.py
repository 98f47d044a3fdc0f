"""The host's own cost: speq's per-token framework overhead over the eager model's KV-cached greedy
loop, and the governor's calibration time, against model depth.

For a random MoE of the demo's width (hidden 64, 8 experts top-2, float32) at each depth in
--layers, interleaved in --rounds rounds: the eager loop (``MoEForCausalLM`` with its KV cache,
one token per call, greedy) and ``speq.compile(model)`` (policy resident, cpu backend: every
expert on the device, so no copy is involved) each decode --tokens tokens after an 8-token
prompt (identical tokens, checked). Overhead per token = speq's TPOT - eager's, in the same
round; per node = that over the step graph's node count. Then, once per depth, the time a
governed compile (policy speq, k=None, a budget of half the experts) spends calibrating
(``cm.engine.calibration_s``).

Goals (from the issue that asked for this benchmark): overhead <= 2 µs per node and linear in
depth (<= 1.5 ms per token at 32 layers); calibration of a 32-layer model <= 5 s; peak extra
host memory while quantizing the draft <= 1.5x the draft's bytes (`quantize_peak`). The output
says where they are met.

    python bench/bench_overhead.py [--layers 2 4 8 16 32] [--tokens 32] [--rounds 3]

About 3 minutes on this project's 2-core CPU machine with the defaults.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    FORMAT,
    RESULTS,
    environment,
    fmt_ratio,
    git_state,
    interleaved,
    markdown_table,
    spread,
    write_json,
)

import speq
from speq.models import MoEConfig, MoEForCausalLM

GOAL_US_PER_NODE, GOAL_MS_AT_32, GOAL_CALIBRATION_S = 2.0, 1.5, 5.0
GOAL_QUANTIZE_X = 1.5  # peak extra host memory while quantizing the draft / the draft's bytes


def quantize_peak(width: int = 1024) -> dict:
    """Peak extra host memory (RssAnon, sampled every half millisecond) while the draft's
    experts are quantized (`DraftWeights`), for a bf16 MoE of 8 layers x 8 experts (hidden and
    intermediate ``width``), over the draft's bytes."""
    import threading

    from speq.runtime.draft import DraftWeights

    cfg = MoEConfig(
        vocab_size=256, hidden_size=width, num_layers=8, num_heads=8, num_kv_heads=8,
        num_experts=8, top_k=2, expert_intermediate_size=width, max_seq_len=64,
    )  # fmt: skip
    model = MoEForCausalLM(cfg, seed=0).to(torch.bfloat16)
    engine = speq.compile(model, speq.CompileOptions(policy="speq", k=2, backend="sim")).engine
    base = _anon_bytes()
    peak, stop = [base], threading.Event()

    def watch() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _anon_bytes())
            time.sleep(0.0005)

    thread = threading.Thread(target=watch)
    thread.start()
    draft = DraftWeights(engine.program, engine.store, torch.device("cpu"))
    stop.set()
    thread.join()
    extra = peak[0] - base
    return dict(
        width=width, draft_bytes=draft.nbytes, peak_extra_bytes=extra, ratio=extra / draft.nbytes
    )


def _anon_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("RssAnon"))


def model_of(layers: int) -> MoEForCausalLM:
    cfg = MoEConfig(
        vocab_size=256, hidden_size=64, num_layers=layers, num_heads=4, num_kv_heads=2,
        num_experts=8, top_k=2, expert_intermediate_size=128, max_seq_len=128,
    )  # fmt: skip
    return MoEForCausalLM(cfg, seed=0).eval()


@torch.no_grad()
def eager_tpot_ms(model: MoEForCausalLM, prompt: torch.Tensor, n: int) -> tuple[float, list]:
    cache = model.new_cache()
    logits = model(prompt, cache, 0)
    tok = int(logits[0, -1].argmax())
    out, t0 = [tok], time.perf_counter()
    for i in range(n - 1):
        logits = model(torch.tensor([[tok]]), cache, prompt.shape[1] + i)
        tok = int(logits[0, -1].argmax())
        out.append(tok)
    return 1e3 * (time.perf_counter() - t0) / max(n - 1, 1), out


def results_table(rows: list[dict]) -> str:
    """The result rows as a markdown table (printed here, and in docs/RESULTS.md)."""
    headers = ["layers", "graph nodes", "eager (ms/token)", "speq resident (ms/token)"]
    headers += ["overhead (ms/token)", "overhead (µs/node)", "calibration (s)", "same tokens"]
    table = [
        [
            f"{r['layers']}", f"{r['nodes']}", fmt_ratio(r["eager_ms"]), fmt_ratio(r["speq_ms"]),
            fmt_ratio(r["overhead_ms"]), fmt_ratio(r["overhead_us_per_node"], spec=".1f"),
            f"{r['calibration_s']:.2f}", "yes" if r["same_tokens"] else "no",
        ]
        for r in rows
    ]  # fmt: skip
    return markdown_table(table, headers)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, nargs="+", default=[2, 4, 8, 16, 32])
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--quantize-width", type=int, default=1024, help="of the quantized model")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    code, prompt = git_state(), torch.arange(1, 9)[None]
    quantize = quantize_peak(args.quantize_width)  # first: no earlier run's freed memory about
    rows = []
    bar = tqdm(total=len(args.layers) * (args.rounds + 1), desc="bench_overhead", file=sys.stderr)
    for layers in args.layers:
        model = model_of(layers)
        cm = speq.compile(model)
        nodes = len(cm.graph.nodes)

        def run(_r: int, who: str, model=model, cm=cm) -> tuple[float, list]:
            if who == "eager":
                return eager_tpot_ms(model, prompt, args.tokens)
            out = cm.generate(prompt, args.tokens)[0, prompt.shape[1] :].tolist()
            return cm.metrics["tpot_ms"], out

        rounds = interleaved(
            args.rounds, ("eager", "speq"), lambda r, w: (bar.update(0.5), run(r, w))[1]
        )
        same = all(rd["eager"][1] == rd["speq"][1] for rd in rounds)
        overhead = spread([rd["speq"][0] - rd["eager"][0] for rd in rounds])
        per_node = spread([1e3 * (rd["speq"][0] - rd["eager"][0]) / nodes for rd in rounds])
        budget = cm.memory.non_expert_bytes + cm.memory.kv_bytes
        budget += cm.memory.expert_bytes * len(cm.store.keys()) // 2
        governed = speq.compile(model, speq.CompileOptions(policy="speq", device_memory=budget))
        bar.update()
        rows.append(
            dict(
                layers=layers,
                nodes=nodes,
                eager_ms=spread([rd["eager"][0] for rd in rounds]),
                speq_ms=spread([rd["speq"][0] for rd in rounds]),
                overhead_ms=overhead,
                overhead_us_per_node=per_node,
                calibration_s=governed.engine.calibration_s,
                same_tokens=same,
            )
        )
    bar.close()
    deepest = rows[-1]
    goals = {
        "us_per_node": {
            "target": GOAL_US_PER_NODE,
            "met": all(r["overhead_us_per_node"]["max"] <= GOAL_US_PER_NODE for r in rows),
        },
        "ms_at_32_layers": {
            "target": GOAL_MS_AT_32,
            "met": deepest["layers"] == 32 and deepest["overhead_ms"]["max"] <= GOAL_MS_AT_32,
        },
        "calibration_s_at_32_layers": {
            "target": GOAL_CALIBRATION_S,
            "met": deepest["layers"] == 32 and deepest["calibration_s"] <= GOAL_CALIBRATION_S,
        },
        "draft_quantize_peak_x": {
            "target": GOAL_QUANTIZE_X,
            "met": quantize["ratio"] <= GOAL_QUANTIZE_X,
        },
    }
    setting = (
        f"random MoE, hidden 64, 8 experts top-2, float32, 1 torch thread, cpu backend; "
        f"{args.tokens} greedy tokens after an 8-token prompt; policy resident vs the eager "
        f"KV-cached loop; {args.rounds} interleaved rounds, median (min-max); calibration: one "
        "governed compile (policy speq, k=None, half the experts' bytes)"
    )
    payload = dict(format=FORMAT, benchmark="overhead", setting=setting, rounds=args.rounds)
    payload |= dict(code=code, environment=environment(), rows=rows, goals=goals)
    payload["quantize"] = quantize
    path = write_json(args.out / "overhead_cpu.json", payload)
    print(f"# {setting}")
    print(results_table(rows))
    q = quantize
    print(
        f"# quantizing the draft (bf16, 8 layers x 8 experts, {q['width']} wide): peak extra "
        "host memory "
        f"{q['peak_extra_bytes'] / 1e6:.1f} MB = {q['ratio']:.2f}x the draft's "
        f"{q['draft_bytes'] / 1e6:.1f} MB"
    )
    for name, g in goals.items():
        print(f"# goal {name} <= {g['target']}: {'met' if g['met'] else 'missed'}")
    print(f"# wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
