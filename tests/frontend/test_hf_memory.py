"""Opening a checkpoint folder whose experts dominate its size costs host memory for the
non-expert weights and the device budget only: the experts stay memory-mapped (file pages the
kernel may drop), never copied into process memory. Measured in a fresh process as the peak of
its anonymous resident memory (RssAnon, sampled every millisecond) while it opens the folder and
decodes."""

from __future__ import annotations

import json
import subprocess
import sys

import torch
import transformers

SCRIPT = r"""
import json, sys, threading, time
import torch, speq

def anon_mb():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024

base, peak, done = anon_mb(), [0.0], threading.Event()
def watch():
    while not done.is_set():
        peak[0] = max(peak[0], anon_mb())
        time.sleep(0.001)
threading.Thread(target=watch, daemon=True).start()
cm = speq.load(sys.argv[1], speq.CompileOptions(policy="ondemand", device_memory=sys.argv[2]))
cm.generate(torch.tensor([[1, 2, 3]]), 4)
done.set()
m = cm.memory
print(json.dumps({"base_mb": base, "peak_mb": max(peak[0], anon_mb()),
                  "non_expert_mb": m.non_expert_bytes / 2**20, "kv_mb": m.kv_bytes / 2**20,
                  "expert_mb": cm.store.total_expert_bytes / 2**20,
                  "hit_rate": cm.metrics["hit_rate"]}))
"""


def test_experts_stay_memory_mapped_while_a_folder_opens_and_decodes(tmp_path):
    cfg = transformers.MixtralConfig(
        vocab_size=128, hidden_size=256, intermediate_size=1024, num_hidden_layers=8,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2,
        max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.MixtralForCausalLM(cfg).save_pretrained(tmp_path)  # float32, one file per expert
    budget_mb = 24
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path), f"{budget_mb}MiB"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout.splitlines()[-1])
    assert r["expert_mb"] > 190  # the experts dominate the folder ...
    assert r["hit_rate"] < 1.0  # ... and decoding fetched them on demand
    constant_mb = 40  # the engine's own allocations: graphs, caches, temporaries
    grew = r["peak_mb"] - r["base_mb"]
    assert grew < budget_mb + constant_mb, r  # the budget covers non-expert weights and KV
