"""The ``speq`` command line: demo, generate, explain, tune."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

import torch
from tqdm import tqdm

import speq
from speq.models import MoEForCausalLM
from speq.models.demo import random_demo_model


def _model(args: argparse.Namespace) -> tuple[MoEForCausalLM, str]:
    if args.checkpoint:
        return speq.load(args.checkpoint), f"checkpoint {args.checkpoint}"
    return (
        random_demo_model(args.seed),
        f"a randomly initialised demo model (seed {args.seed}; untrained, so its text is noise)",
    )


def _prompt_ids(args: argparse.Namespace) -> torch.Tensor:
    if args.prompt is not None:
        raise SystemExit(
            "speq: this model has no tokenizer; give the prompt as token ids with --prompt-ids"
        )
    return torch.tensor([[int(t) for t in args.prompt_ids.replace(",", " ").split()]])


def _generate(cm: speq.CompiledModel, ids: torch.Tensor, args: argparse.Namespace) -> torch.Tensor:
    bar = tqdm(total=args.max_new_tokens, desc="decoding", unit="tok", file=sys.stderr)
    t0 = time.perf_counter()
    out = cm.generate(
        ids,
        args.max_new_tokens,
        do_sample=args.sample,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        callback=lambda _: bar.update(1),
    )
    bar.close()
    seconds = time.perf_counter() - t0
    n = max(args.max_new_tokens, 1)
    print(
        f"{args.max_new_tokens} tokens in {seconds:.2f} s: {seconds / n * 1e3:.1f} ms/token "
        "(wall clock, CPU, all experts resident, prompt included)"
    )
    return out


def cmd_generate(args: argparse.Namespace) -> int:
    model, what = _model(args)
    print(f"model: {what}")
    cm = speq.compile(model)
    out = _generate(cm, _prompt_ids(args), args)
    print("tokens:", " ".join(str(t) for t in out[0].tolist()))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    model, what = _model(args)
    cfg = model.config
    print(f"speq demo: {what}")
    print(
        f"  {cfg.num_layers} layers, {cfg.num_experts} experts top-{cfg.top_k}, hidden "
        f"{cfg.hidden_size}, vocab {cfg.vocab_size}"
    )
    cm = speq.compile(model)
    print(f"compiled: {len(cm.graph)} IR nodes after passes {cm.graphs.names()}")
    ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])
    out = _generate(cm, ids, args)
    print("generated token ids:", " ".join(str(t) for t in out[0, ids.shape[1] :].tolist()))
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    model, what = _model(args)
    print(f"# model: {what}")
    print(speq.compile(model).graphs)
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from speq.kernels.autotune import tune_main

    return tune_main(args.rest)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--checkpoint", help="a speq checkpoint folder (config.json + model.safetensors)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the random model and of sampling")


def _add_decode_args(p: argparse.ArgumentParser, max_new_tokens: int) -> None:
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="speq", description=speq.__doc__)
    parser.add_argument("--version", action="version", version=f"speq {speq.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="run the demo model and report speed")
    _add_model_args(p)
    _add_decode_args(p, 48)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("generate", help="generate tokens from a prompt")
    _add_model_args(p)
    _add_decode_args(p, 32)
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--prompt", help="prompt text (needs a model with a tokenizer)")
    group.add_argument("--prompt-ids", help='prompt token ids, e.g. "1 2 3"')
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("explain", help="print the IR after every compiler pass")
    _add_model_args(p)
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser("tune", help="autotune the fused MoE kernels on this GPU", add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_tune)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"speq: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
