"""Opening a large Hugging Face checkpoint: speq.load against transformers' from_pretrained.

Writes a random Mixtral-shaped checkpoint (bfloat16, one tensor per expert projection, sharded
with a model.safetensors.index.json, as Hugging Face publishes Mixtral) of at least --gb GB, then
opens it in fresh processes, the contenders interleaved in --rounds rounds:

    speq.load      speq.load(folder, ondemand, a device budget of the non-expert weights + KV
                   cache + --slots expert slots), then 8 greedy tokens
    transformers   AutoModelForCausalLM.from_pretrained(folder), then 8 greedy tokens

Reported per contender: the wall time to open (for speq: open and compile; it allocates its device
memory at the first generate, so that is in the decode time) and to decode 8 tokens, and the
peak anonymous resident memory (RssAnon, sampled every millisecond: what the process holds in
memory of its own, excluding the file pages of memory-mapped weights, which the kernel may
drop) above the process's memory after its imports. The page cache is warm (the checkpoint was
just written or read): a cold open also reads the non-expert weights from disk.

    python bench/bench_load.py [--gb 2] [--rounds 3] [--slots 8] [--folder /tmp/speq-load-bench]

About 2-4 minutes on this project's 2-core CPU machine with the defaults; the checkpoint is kept
in --folder for the next run (delete it afterwards).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
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

HIDDEN, INTER, EXPERTS, TOP_K, HEADS, KV_HEADS, VOCAB = 1024, 3584, 8, 2, 16, 4, 32000

CHILD = r"""
import json, sys, threading, time
import torch
torch.set_num_threads(1)
which, folder, budget = sys.argv[1], sys.argv[2], int(sys.argv[3])
if which == "speq":
    import speq
else:
    import transformers

def anon_mb():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024

base, peak, stop = anon_mb(), [0.0], threading.Event()
def watch():
    while not stop.is_set():
        peak[0] = max(peak[0], anon_mb())
        time.sleep(0.001)
threading.Thread(target=watch, daemon=True).start()
ids = torch.tensor([[1, 2, 3, 4]])
t0 = time.perf_counter()
if which == "speq":
    model = speq.load(folder, speq.CompileOptions(policy="ondemand", device_memory=budget))
    t1 = time.perf_counter()
    model.generate(ids, 8)
else:
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    t1 = time.perf_counter()
    with torch.no_grad():
        model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)
t2 = time.perf_counter()
stop.set()
print(json.dumps({"open_s": t1 - t0, "decode_s": t2 - t1, "peak_anon_mb": max(peak[0], anon_mb()) - base}))
"""


def write_checkpoint(folder: Path, gb: float) -> dict:
    """A random Mixtral-shaped bfloat16 checkpoint of at least ``gb`` GB, one shard per layer."""
    expert_bytes = 3 * HIDDEN * INTER * 2
    layers = max(1, math.ceil(gb * 1e9 / (EXPERTS * expert_bytes)))
    config = {
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "vocab_size": VOCAB,
        "hidden_size": HIDDEN,
        "intermediate_size": INTER,
        "num_hidden_layers": layers,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "num_local_experts": EXPERTS,
        "num_experts_per_tok": TOP_K,
        "max_position_embeddings": 256,
        "rms_norm_eps": 1e-5,
        "rope_parameters": {"rope_theta": 1e6, "rope_type": "default"},
        "tie_word_embeddings": False,
        "dtype": "bfloat16",
    }
    marker = folder / "config.json"
    if marker.is_file() and json.loads(marker.read_text()) == config:
        return config  # written by an earlier run
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) / math.sqrt(shape[-1])).to(torch.bfloat16)

    weight_map: dict[str, str] = {}
    kv = HIDDEN // HEADS * KV_HEADS
    shards = layers + 1
    for n in tqdm(range(shards), desc="writing the checkpoint", unit="shard", file=sys.stderr):
        name = f"model-{n + 1:05d}-of-{shards:05d}.safetensors"
        if n == layers:
            t = {
                "model.embed_tokens.weight": rand(VOCAB, HIDDEN),
                "lm_head.weight": rand(VOCAB, HIDDEN),
            }
            t["model.norm.weight"] = torch.ones(HIDDEN, dtype=torch.bfloat16)
        else:
            p = f"model.layers.{n}"
            t = {
                f"{p}.self_attn.q_proj.weight": rand(HIDDEN, HIDDEN),
                f"{p}.self_attn.k_proj.weight": rand(kv, HIDDEN),
                f"{p}.self_attn.v_proj.weight": rand(kv, HIDDEN),
                f"{p}.self_attn.o_proj.weight": rand(HIDDEN, HIDDEN),
                f"{p}.input_layernorm.weight": torch.ones(HIDDEN, dtype=torch.bfloat16),
                f"{p}.post_attention_layernorm.weight": torch.ones(HIDDEN, dtype=torch.bfloat16),
                f"{p}.block_sparse_moe.gate.weight": rand(EXPERTS, HIDDEN),
            }
            for j in range(EXPERTS):
                x = f"{p}.block_sparse_moe.experts.{j}"
                t[f"{x}.w1.weight"], t[f"{x}.w3.weight"] = rand(INTER, HIDDEN), rand(INTER, HIDDEN)
                t[f"{x}.w2.weight"] = rand(HIDDEN, INTER)
        save_file(t, str(folder / name), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(t, name)
    index = {"metadata": {}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    marker.write_text(json.dumps(config))  # last: a folder with a config is complete
    return config


def results_table(results: dict[str, dict]) -> str:
    """Contender -> spreads as a markdown table (printed here, and in docs/RESULTS.md)."""
    headers = ["contender", "open (s)", "decode 8 tokens (s)", "peak memory (MB, anonymous)"]
    table = [
        [
            w,
            fmt_ratio(r["open_s"]),
            fmt_ratio(r["decode_s"]),
            fmt_ratio(r["peak_anon_mb"], spec=".0f"),
        ]
        for w, r in results.items()
    ]
    return markdown_table(table, headers)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gb", type=float, default=2.0, help="checkpoint size, at least (GB)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--slots", type=int, default=8, help="speq's expert slots in its budget")
    p.add_argument("--folder", type=Path, default=Path("/tmp/speq-load-bench"))
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    code = git_state()
    config = write_checkpoint(args.folder, args.gb)
    size = sum(f.stat().st_size for f in args.folder.glob("*.safetensors"))
    expert_bytes = 3 * HIDDEN * INTER * 2
    experts = EXPERTS * config["num_hidden_layers"] * expert_bytes
    non_expert = size - experts
    kv = 2 * config["num_hidden_layers"] * 256 * (HIDDEN // HEADS * KV_HEADS) * 2
    budget = non_expert + kv + args.slots * expert_bytes
    bar = tqdm(total=2 * args.rounds, desc="bench_load", unit="run", file=sys.stderr)

    def run(_r: int, which: str) -> dict:
        out = subprocess.run(
            [sys.executable, "-c", CHILD, which, str(args.folder), str(budget)],
            capture_output=True,
            text=True,
            check=False,
        )
        bar.update()
        if out.returncode != 0:
            raise SystemExit(f"{which} failed:\n{out.stderr[-2000:]}")
        return json.loads(out.stdout.splitlines()[-1])

    rounds = interleaved(args.rounds, ("speq", "transformers"), run)
    bar.close()
    rows = {}
    for which in ("speq", "transformers"):
        rows[which] = {
            key: spread([rd[which][key] for rd in rounds])
            for key in ("open_s", "decode_s", "peak_anon_mb")
        }
    ratio = spread([rd["transformers"]["open_s"] / rd["speq"]["open_s"] for rd in rounds])
    setting = {
        "checkpoint": f"random Mixtral-shaped, bfloat16, {config['num_hidden_layers']} layers x "
        f"{EXPERTS} experts (hidden {HIDDEN}, intermediate {INTER}), one tensor per expert "
        f"projection, {config['num_hidden_layers'] + 1} shards",
        "size_gb": size / 1e9,
        "expert_gb": experts / 1e9,
        "speq_budget_mb": budget / 1e6,
        "speq_options": f"policy ondemand, device_memory {budget} bytes (non-expert weights + KV "
        f"cache + {args.slots} expert slots), cpu backend",
        "decode": "8 greedy tokens after a 4-token prompt, 1 torch thread",
        "memory": "peak RssAnon (MB) above the process's after `import speq` or `import "
        "transformers` (transformers loads its model code inside from_pretrained: counted), "
        "sampled every ms; the file pages of memory-mapped weights are not in it",
        "page_cache": "warm",
        "rounds": args.rounds,
        "code": code,
        "environment": environment(),
    }
    payload = {"format": FORMAT, "benchmark": "load", "setting": setting, "results": rows}
    payload["open_speedup_vs_transformers"] = ratio
    path = write_json(args.out / "load_cpu.json", payload)
    print(f"# {setting['checkpoint']}: {size / 1e9:.2f} GB, experts {experts / 1e9:.2f} GB")
    print(results_table(rows))
    print(f"# open: transformers / speq = {fmt_ratio(ratio)} (median (min-max) over the rounds)")
    print(f"# wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
