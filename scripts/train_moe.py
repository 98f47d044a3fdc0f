"""Train the demo MoE (speq's own ``MoEForCausalLM``) on the CPU, seeded and reproducible.

Reads the token streams written by ``train_tokenizer.py`` (``train.npy``, ``val.npy``). AdamW with
linear warmup and cosine decay; random windows of ``--seq`` tokens. The loss is cross-entropy plus,
for every MoE layer, the Switch/Mixtral load-balancing loss ``E * sum_i f_i * P_i`` of that layer's
router (``f_i`` the fraction of the token-choices routed to expert i, ``P_i`` the mean router
probability of expert i) averaged over the layers, plus a small router z-loss
(``mean(logsumexp(logits)^2)``, also averaged over layers). Router inputs are captured with forward
pre-hooks on the ``MoEBlock`` modules and the router probabilities recomputed from them.

Every ``--eval-every`` steps it logs the validation loss and the per-layer routing entropy, and
writes the model (bf16, ``save_pretrained``) plus ``tokenizer.json`` to ``<run>/latest``; the final
model goes to ``<run>/final``. Progress goes to stdout as JSON lines.

    nice -n 5 python scripts/train_moe.py --data /tmp/speq-data --run /tmp/speq-data/run \
        --steps 1300
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from speq.models import MoEConfig, MoEForCausalLM
from speq.models.model import MoEBlock

CONFIG = MoEConfig(
    vocab_size=4096,
    hidden_size=192,
    num_layers=4,
    num_heads=6,
    num_kv_heads=2,
    num_experts=8,
    top_k=2,
    expert_intermediate_size=384,
    max_seq_len=512,
    tie_word_embeddings=True,
)


class RouterTap:
    """Forward pre-hooks that keep every MoE block's input for the auxiliary losses."""

    def __init__(self, model: MoEForCausalLM) -> None:
        self.blocks = [m for m in model.modules() if isinstance(m, MoEBlock)]
        self.inputs: list[torch.Tensor] = []
        for b in self.blocks:
            b.register_forward_pre_hook(self._hook)

    def _hook(self, module, args) -> None:
        self.inputs.append(args[0])

    def losses(self, k: int) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """(load-balancing loss, z-loss, per-layer expert-choice counts), averaged over layers."""
        bal, z, counts = [], [], []
        for block, x in zip(self.blocks, self.inputs, strict=True):
            logits = x.reshape(-1, x.shape[-1]) @ block.router.t()  # [N, E]
            e = logits.shape[-1]
            probs = torch.softmax(logits.float(), dim=-1)
            ids = probs.topk(k, dim=-1).indices
            cnt = torch.bincount(ids.reshape(-1), minlength=e).float()
            f = cnt / ids.numel()
            bal.append(e * (f * probs.mean(0)).sum())
            z.append(torch.logsumexp(logits.float(), dim=-1).pow(2).mean())
            counts.append(cnt)
        self.inputs = []
        return torch.stack(bal).mean(), torch.stack(z).mean(), counts


def init_weights(model: MoEForCausalLM, seed: int) -> None:
    """GPT-2-style scales: small tied embedding, residual-output projections scaled 1/sqrt(2L)."""
    gen = torch.Generator().manual_seed(seed)
    layers = model.config.num_layers
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name == "embed" or name == "lm_head" or name.endswith("router"):
                p.normal_(0.0, 0.02, generator=gen)
            else:
                std = p.shape[-1] ** -0.5
                if name.endswith(("wo", "w2")):
                    std /= math.sqrt(2 * layers)
                p.normal_(0.0, std, generator=gen)


def lr_at(step: int, total: int, peak: float, warmup: int, floor: float) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return floor * peak + (1 - floor) * peak * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


def batch(data: np.ndarray, rng: np.random.Generator, n: int, seq: int) -> torch.Tensor:
    starts = rng.integers(0, data.size - seq - 1, size=n)
    return torch.from_numpy(np.stack([data[s : s + seq + 1] for s in starts]).astype(np.int64))


@torch.no_grad()
def evaluate(model: MoEForCausalLM, tap: RouterTap, val: torch.Tensor, k: int) -> dict:
    model.eval()
    losses, counts = [], None
    for i in range(0, val.shape[0], 8):
        xb = val[i : i + 8]
        logits = model(xb[:, :-1])
        losses.append(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), xb[:, 1:].reshape(-1)))
        _, _, c = tap.losses(k)
        counts = c if counts is None else [a + b for a, b in zip(counts, c, strict=True)]
    model.train()
    ent = []
    for c in counts:
        p = c / c.sum()
        ent.append(float(-(p[p > 0] * p[p > 0].log2()).sum()))
    return {
        "val_loss": float(torch.stack(losses).mean()),
        "entropy_bits": [round(e, 3) for e in ent],
    }


def save(model: MoEForCausalLM, folder: Path, tokenizer: Path) -> None:
    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    bf = MoEForCausalLM(model.config, seed=0)
    bf.load_state_dict(model.state_dict())
    bf.to(torch.bfloat16).save_pretrained(tmp)
    shutil.copy(tokenizer, tmp / "tokenizer.json")
    torch.save(model.state_dict(), tmp / "fp32_state.pt")
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--data", default="/tmp/speq-data")
    ap.add_argument("--run", default="/tmp/speq-data/run")
    ap.add_argument("--steps", type=int, default=1300)
    ap.add_argument("--batch", type=int, default=12)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--lr-floor", type=float, default=0.1)
    ap.add_argument("--wd", type=float, default=0.1)
    ap.add_argument("--balance", type=float, default=0.04)
    ap.add_argument("--zloss", type=float, default=1e-3)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--val-windows", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    data, run = Path(args.data), Path(args.run)
    run.mkdir(parents=True, exist_ok=True)
    train = np.load(data / "train.npy")
    val_stream = np.load(data / "val.npy")
    vrng = np.random.default_rng(1234)
    val = batch(val_stream, vrng, args.val_windows, args.seq)
    rng = np.random.default_rng(args.seed)

    model = MoEForCausalLM(CONFIG, seed=args.seed)
    init_weights(model, args.seed)
    tap = RouterTap(model)
    k = CONFIG.top_k
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and not n.endswith("router")]
    other = [
        p for n, p in model.named_parameters() if not (p.dim() >= 2 and not n.endswith("router"))
    ]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.wd}, {"params": other, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
        eps=1e-8,
    )
    nparams = sum(p.numel() for p in model.parameters())
    print(json.dumps({"event": "start", "params": nparams, "args": vars(args)}), flush=True)
    t0 = time.time()
    tokens = 0
    for step in range(args.steps):
        lr = lr_at(step, args.steps, args.lr, args.warmup, args.lr_floor)
        for g in opt.param_groups:
            g["lr"] = lr
        xb = batch(train, rng, args.batch, args.seq)
        logits = model(xb[:, :-1])
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), xb[:, 1:].reshape(-1))
        bal, z, _ = tap.losses(k)
        loss = ce + args.balance * bal + args.zloss * z
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        tokens += args.batch * args.seq
        if step % 20 == 0 or step == args.steps - 1:
            el = time.time() - t0
            rec = {
                "step": step,
                "ce": round(ce.item(), 4),
                "bal": round(bal.item(), 4),
                "z": round(z.item(), 3),
                "gnorm": round(gnorm.item(), 3),
                "lr": round(lr, 6),
                "tokens": tokens,
                "elapsed_s": round(el, 1),
                "tok_per_s": round(tokens / el, 1),
            }
            print(json.dumps(rec), flush=True)
        if (step + 1) % args.eval_every == 0 or step == args.steps - 1:
            ev = evaluate(model, tap, val, k)
            ev.update(step=step + 1, tokens=tokens, elapsed_s=round(time.time() - t0, 1))
            print(json.dumps({"event": "eval", **ev}), flush=True)
            save(model, run / "latest", data / "tokenizer.json")
    save(model, run / "final", data / "tokenizer.json")
    print(
        json.dumps({"event": "done", "tokens": tokens, "elapsed_s": time.time() - t0}), flush=True
    )


if __name__ == "__main__":
    main()
