"""Validation loss and routing statistics of a speq checkpoint folder on held-out text.

Runs the model over the held-out token streams written by ``train_tokenizer.py``
(``val_<domain>.npy``), in consecutive windows of ``--window`` tokens, records every MoE layer's
expert choices exactly as the model routes (``speq.models.functional.route`` on the block input),
and reports:

* validation loss, nats/token, and perplexity, overall (token-weighted) and per domain;
* per MoE layer: the entropy in bits of the expert-usage distribution (the share of all
  token-choices that went to each expert; 3.0 bits is uniform over 8 experts), the largest
  expert's share, temporal reuse (for each token t > 0 of a window, the fraction of its k experts
  that token t-1 also chose, averaged; k/E at random), and next-layer predictability (for the layer
  pair l, l+1: how often the top expert of layer l+1 equals the one most often seen after the top
  expert a of layer l, i.e. sum_a max_b count(a, b) / N; 1/E at random).

Writes ``routing_stats.json`` into the checkpoint folder (or ``--out``) and prints a table.

    python scripts/routing_stats.py speq/models/checkpoints/demo-moe --data /tmp/speq-data
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from speq.models import MoEForCausalLM
from speq.models import functional as fn
from speq.models.model import MoEBlock


def collect(model: MoEForCausalLM, stream: np.ndarray, window: int, batch: int):
    """(sum of token losses, token count, per-layer expert ids [windows, window-1, k])."""
    cfg = model.config
    blocks = [m for m in model.modules() if isinstance(m, MoEBlock)]
    captured: list[torch.Tensor] = []

    def hook(module, args):
        x = args[0]
        logits = x.reshape(-1, x.shape[-1]) @ module.router.t()
        ids, _ = fn.route(logits, cfg.top_k, cfg.router_mode, cfg.norm_topk_prob)
        captured.append(ids.view(x.shape[0], x.shape[1], -1))

    handles = [b.register_forward_pre_hook(hook) for b in blocks]
    n = (stream.size - 1) // window
    xs = torch.from_numpy(stream[: n * window + 1].astype(np.int64))
    inputs = xs[:-1].view(n, window)
    targets = xs[1:].view(n, window)
    total, count = 0.0, 0
    ids: list[list[torch.Tensor]] = [[] for _ in blocks]
    try:
        with torch.no_grad():
            for i in range(0, n, batch):
                captured.clear()
                logits = model(inputs[i : i + batch]).float()
                loss = F.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]),
                    targets[i : i + batch].reshape(-1),
                    reduction="sum",
                )
                total += float(loss)
                count += targets[i : i + batch].numel()
                for layer, c in enumerate(captured):
                    ids[layer].append(c)
    finally:
        for h in handles:
            h.remove()
    return total, count, [torch.cat(x) for x in ids]


def layer_stats(ids: list[torch.Tensor], num_experts: int) -> list[dict]:
    """Per-layer statistics from expert ids ``[windows, tokens, k]`` of every MoE layer."""
    out = []
    for layer, x in enumerate(ids):
        k = x.shape[-1]
        counts = torch.bincount(x.reshape(-1), minlength=num_experts).double()
        share = counts / counts.sum()
        nz = share[share > 0]
        entropy = float(-(nz * nz.log2()).sum())
        prev, cur = x[:, :-1, :], x[:, 1:, :]  # [W, T-1, k]
        overlap = (cur[..., :, None] == prev[..., None, :]).any(-1).sum(-1).double() / k
        rec = {
            "layer": layer,
            "entropy_bits": round(entropy, 4),
            "max_expert_share": round(float(share.max()), 4),
            "expert_share": [round(float(s), 4) for s in share],
            "temporal_reuse": round(float(overlap.mean()), 4),
        }
        if layer + 1 < len(ids):
            a = x[..., 0].reshape(-1)
            b = ids[layer + 1][..., 0].reshape(-1)
            joint = torch.zeros(num_experts, num_experts, dtype=torch.long)
            joint.index_put_((a, b), torch.ones_like(a), accumulate=True)
            rec["next_layer_predictability"] = round(
                float(joint.max(1).values.sum()) / a.numel(), 4
            )
        out.append(rec)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("checkpoint")
    ap.add_argument("--data", default="/tmp/speq-data")
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--max-tokens", type=int, default=0, help="per domain; 0 = all")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="default: <checkpoint>/routing_stats.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    folder, data = Path(args.checkpoint), Path(args.data)
    model = MoEForCausalLM.from_pretrained(folder, dtype=getattr(torch, args.dtype)).eval()
    cfg = model.config
    domains, all_ids = {}, None
    total, count = 0.0, 0
    for f in sorted(data.glob("val_*.npy")):
        stream = np.load(f)
        if args.max_tokens:
            stream = stream[: args.max_tokens + 1]
        s, c, ids = collect(model, stream, args.window, args.batch)
        domains[f.stem[4:]] = {
            "tokens": c,
            "loss": round(s / c, 4),
            "ppl": round(math.exp(s / c), 2),
        }
        total, count = total + s, count + c
        all_ids = ids if all_ids is None else [torch.cat(p) for p in zip(all_ids, ids, strict=True)]
    layers = layer_stats(all_ids, cfg.num_experts)
    result = {
        "checkpoint": folder.name,
        "dtype": args.dtype,
        "window": args.window,
        "tokens": count,
        "val_loss": round(total / count, 4),
        "val_ppl": round(math.exp(total / count), 2),
        "domains": domains,
        "random_baselines": {
            "entropy_bits": round(math.log2(cfg.num_experts), 4),
            "temporal_reuse": cfg.top_k / cfg.num_experts,
            "next_layer_predictability": 1 / cfg.num_experts,
        },
        "layers": layers,
    }
    out = Path(args.out) if args.out else folder / "routing_stats.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"val loss {result['val_loss']:.4f} nats/token, ppl {result['val_ppl']:.2f} on {count} tokens"
    )
    for name, d in domains.items():
        print(f"  {name:12s} loss {d['loss']:.4f}  ppl {d['ppl']:8.2f}  ({d['tokens']} tokens)")
    print(
        "| layer | entropy (bits) | max expert share | temporal reuse | next-layer predictability |"
    )
    print("| --- | --- | --- | --- | --- |")
    for r in layers:
        nl = r.get("next_layer_predictability")
        nls = f"{nl:.3f}" if nl is not None else "-"
        print(
            f"| {r['layer']} | {r['entropy_bits']:.3f} | {r['max_expert_share']:.3f} | "
            f"{r['temporal_reuse']:.3f} | {nls} |"
        )


if __name__ == "__main__":
    main()
