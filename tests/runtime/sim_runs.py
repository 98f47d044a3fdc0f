"""A fixed set of sim-backend runs (every policy, the demo model, two budgets) whose metrics
must not change when the code is reorganised. `python tests/runtime/sim_runs.py` rewrites the
recorded numbers; do that only for a change meant to alter behaviour, and say so."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

import speq
from speq.models.demo import demo_model

RECORDED = Path(__file__).parent / "data" / "sim_metrics.json"
PROMPT = "And it came to pass, when the king"
NEW_TOKENS = 24
BUDGETS = {"tight": 0.375, "medium": 0.75}  # fractions of all expert bytes, counted in bf16
CONTENDERS = {
    "resident": dict(policy="resident"),
    "ondemand": dict(policy="ondemand"),
    "nextgate": dict(policy="nextgate"),
    "oracle": dict(policy="oracle"),
    "speq-governed": dict(policy="speq", draft_memory="separate"),
    "speq-governed-no-host": dict(policy="speq", host_compute=False, draft_memory="separate"),
    "speq-k4": dict(policy="speq", k=4, draft_memory="separate"),
    "speq-k2-oracle-predictor": dict(
        policy="speq", k=2, predictor="oracle", draft_memory="separate"
    ),
    "speq-governed-shared": dict(policy="speq", draft_memory="shared"),
    "speq-k4-shared": dict(policy="speq", k=4, draft_memory="shared"),
    "fiddler": dict(policy="fiddler"),
    "hostcompute": dict(policy="hostcompute"),
}


def _plain(value):
    """Metrics as JSON values (dict keys as strings, tuples as lists)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


@torch.no_grad()
def run_all() -> dict[str, dict]:
    model, tokenizer = demo_model(dtype=torch.float64)
    prompt = torch.tensor([tokenizer.encode(PROMPT)])
    base = dict(backend="sim", memory_dtype=torch.bfloat16)
    resident = speq.compile(model, speq.CompileOptions(**base))
    mem = resident.memory
    experts = mem.expert_bytes * len(resident.store.keys())
    out = {}
    for budget, fraction in BUDGETS.items():
        nbytes = mem.non_expert_bytes + mem.kv_bytes + int(fraction * experts)
        for name, opts in CONTENDERS.items():
            memory = None if opts["policy"] == "resident" else nbytes
            cm = speq.compile(model, speq.CompileOptions(**base, **opts, device_memory=memory))
            tokens = cm.generate(prompt, NEW_TOKENS)
            metrics = cm.metrics.as_dict()
            del metrics["calibration_s"]  # wall-clock seconds even on the sim backend
            out[f"{budget}/{name}"] = {"tokens": tokens[0].tolist(), "metrics": _plain(metrics)}
    return out


if __name__ == "__main__":
    torch.set_num_threads(1)
    RECORDED.write_text(json.dumps(run_all(), indent=1, sort_keys=True) + "\n")
    sys.stdout.write(f"wrote {RECORDED}\n")
