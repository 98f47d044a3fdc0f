"""The ``speq`` command line: demo, generate, explain, roofline, tune."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm import tqdm

import speq
from speq.models import MoEForCausalLM
from speq.models.demo import demo_model, random_demo_model
from speq.models.tokenizer import Tokenizer


def _model(args: argparse.Namespace) -> tuple[MoEForCausalLM, Tokenizer | None, str]:
    """The model a command runs: a checkpoint folder, the random demo shape, or the shipped
    demo model (the default)."""
    if args.checkpoint:
        folder = Path(args.checkpoint)
        tok = (
            Tokenizer(folder / "tokenizer.json") if (folder / "tokenizer.json").is_file() else None
        )
        return speq.load(args.checkpoint), tok, f"checkpoint {args.checkpoint}"
    if args.random:
        what = f"a randomly initialised model (seed {args.seed}; untrained, so its output is noise)"
        return random_demo_model(args.seed), None, what
    model, tok = demo_model(dtype=torch.float32)
    return model, tok, "the shipped demo MoE (docs/MODEL_CARD.md)"


def _prompt_ids(args: argparse.Namespace, tokenizer: Tokenizer | None) -> torch.Tensor:
    if args.prompt is not None:
        if tokenizer is None:
            raise ValueError("this model has no tokenizer; give the prompt as --prompt-ids")
        return torch.tensor([tokenizer.encode(args.prompt)])
    return torch.tensor([[int(t) for t in args.prompt_ids.replace(",", " ").split()]])


def cmd_generate(args: argparse.Namespace) -> int:
    model, tokenizer, what = _model(args)
    print(f"model: {what}")
    cm = speq.compile(model)
    ids = _prompt_ids(args, tokenizer)
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
    print(
        f"{args.max_new_tokens} tokens in {seconds:.2f} s "
        f"({seconds / max(args.max_new_tokens, 1) * 1e3:.1f} ms/token, wall clock, CPU, all "
        "experts resident, prompt included)"
    )
    if tokenizer is not None:
        print(tokenizer.decode(out[0].tolist()))
    else:
        print("tokens:", " ".join(str(t) for t in out[0].tolist()))
    return 0


DEMO_PROMPT = "And it came to pass, when the king"


def cmd_demo(args: argparse.Namespace) -> int:
    from tabulate import tabulate

    from speq.compare import compare

    model, tokenizer = demo_model(dtype=torch.float64)  # float64: exact, batch-invariant argmax
    cfg = model.config
    print(
        f"speq demo: the shipped demo MoE ({cfg.num_layers} layers, {cfg.num_experts} experts "
        f"top-{cfg.top_k}, hidden {cfg.hidden_size}; see docs/MODEL_CARD.md), float64 on the CPU"
    )
    prompt = torch.tensor([tokenizer.encode(args.prompt)])
    bars: dict[str, tqdm] = {}

    def progress(label: str):
        bar = bars[label] = tqdm(
            total=args.max_new_tokens, desc=f"{label:>24}", unit="tok", file=sys.stderr
        )
        return lambda _: bar.update(1)

    result = compare(
        model, prompt, args.max_new_tokens, args.budget, ks=(args.k,), progress=progress
    )
    for bar in bars.values():
        bar.close()
    cal = result.calibration
    print(f"\nlink: {cal.describe()}")
    print(
        f"device budget: {result.budget_bytes / 1e6:.2f} MB = non-expert weights + KV cache + "
        f"{args.budget:.0%} of the expert bytes, sizes counted in bf16 as on a GPU (compute "
        f"stays float64)"
    )
    text = tokenizer.decode(result.expected[0, prompt.shape[1] :].tolist())
    print(f"\n{args.prompt}|{text}\n")
    rows = [
        [
            r["label"],
            r["cache_slots"],
            f"{r['tpot_ms']:.1f}",
            f"{r['speq_speedup']:.2f}x",
            f"{r['hit_rate']:.2f}",
            f"{r['token_hit_rate']:.2f}",
            "-" if r["acceptance_rate"] is None else f"{r['acceptance_rate']:.2f}",
            "-" if r["elb_recall"] is None else f"{r['elb_recall']:.2f}",
            "yes" if r["identical_to_resident"] else "NO",
        ]
        for r in result.rows
    ]
    headers = [
        "policy",
        "expert slots",
        "TPOT (ms)",
        "its TPOT / speq's",
        "hit rate",
        "token hit rate",
        "acceptance",
        "ELB recall",
        "same tokens",
    ]
    print(tabulate(rows, headers=headers, tablefmt="github"))
    print(
        f"TPOT: wall-clock ms per output token on this CPU, {args.max_new_tokens} tokens after a "
        f"{prompt.shape[1]}-token prompt, cpu backend with the emulated link above. Hit rate: "
        f"(layer, expert) needs resident when a pass reached them; token hit rate: the passes' "
        f"routings (token, layer, top-k choice) whose expert needed no copy the compute waited for."
    )
    return 0 if all(r["identical_to_resident"] for r in result.rows) else 1


def cmd_explain(args: argparse.Namespace) -> int:
    model, _, what = _model(args)
    opts = speq.CompileOptions(
        policy=args.policy,
        k=args.k,
        backend=args.backend,
        profile=args.profile,
        device_memory=args.device_memory,
    )
    print(f"# model: {what}")
    print(f"# options: {opts}")
    print(speq.compile(model, opts).graphs)
    return 0


def cmd_roofline(args: argparse.Namespace) -> int:
    from speq.cost.plot import plot
    from speq.passes.governor import roofline
    from speq.sim import get_preset, get_profile

    if args.model == "demo":
        cfg = demo_model()[0].config
    else:
        cfg = get_preset(args.model)
    profile = get_profile(args.profile)
    policy = roofline(cfg, profile, args.acceptance, args.miss_rate)
    title = (
        f"{args.model} on {profile.name}: acceptance {args.acceptance:.2f} per position, "
        f"{args.miss_rate:.0%} of needed experts not resident"
    )
    path = plot(policy, cfg, profile, title, args.out)
    print(policy.describe())
    print(f"wrote {path}")
    return 0


def _torch_dtype(name: str) -> torch.dtype:
    """``speq tune --dtype``: a float dtype by name (float16, bf16, ...)."""
    table = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
    table |= {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
    if name not in table:
        raise argparse.ArgumentTypeError(f"dtype must be one of {sorted(table)}")
    return table[name]


def cmd_tune(args: argparse.Namespace) -> int:
    from speq.kernels.shapes import PRESETS, MoEShape, get_shape
    from speq.kernels.tuner import tune_and_write, tuning_available

    shapes = [get_shape(m) for m in args.model or []]
    explicit = (args.E, args.N, args.K)
    if any(v is not None for v in explicit):
        if any(v is None for v in explicit):
            args.tune_parser.error("--E, --N and --K go together")
        shapes.append(MoEShape("custom", args.E, args.top_k, args.K, args.N))
    if not shapes:  # no shape given: every preset
        shapes = [get_shape(m) for m in sorted(PRESETS)]
    if not tuning_available():
        print("speq tune: tuning needs a CUDA device (and Triton); nothing to do on this machine.")
        return 0
    for shape in shapes:
        start = time.perf_counter()
        path, best = tune_and_write(
            shape,
            args.dtype,
            args.buckets,
            bits=args.bits,
            group_size=args.group_size,
            max_candidates=args.max_candidates,
            config_dir=args.out,
            progress=lambda it, s=shape: tqdm(it, desc=s.name, leave=False),
        )
        print(f"{shape.name}: {len(best)} buckets in {time.perf_counter() - start:.0f} s -> {path}")
    return 0


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--checkpoint", help="a speq checkpoint folder (config.json + model.safetensors)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the random model and of sampling")
    p.add_argument(
        "--random",
        action="store_true",
        help="a seeded random model of a small demo-family shape (speq.models.demo.RANDOM_DEMO_CONFIG)",
    )


def _add_decode_args(p: argparse.ArgumentParser, max_new_tokens: int) -> None:
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="speq", description=speq.__doc__)
    parser.add_argument("--version", action="version", version=f"speq {speq.__version__}")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1: the demo-size models gain nothing from more, and "
        "spinning threads lose badly when a core is busy)",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="speq against every baseline on the shipped demo model")
    p.add_argument("--prompt", default=DEMO_PROMPT)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument(
        "--budget",
        type=float,
        default=0.375,
        help="device memory for experts (and the draft), as a fraction of all expert bytes",
    )
    p.add_argument(
        "--k", type=int, default=None, help="tokens drafted per cycle (default: the governor)"
    )
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("generate", help="generate tokens from a prompt")
    _add_model_args(p)
    _add_decode_args(p, 32)
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--prompt", help="prompt text (needs a model with a tokenizer)")
    group.add_argument("--prompt-ids", help='prompt token ids, e.g. "1 2 3"')
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("explain", help="print the IR after every compiler pass, and the policy")
    _add_model_args(p)
    p.add_argument("--policy", default="speq", help="speq, resident, ondemand, nextgate, oracle")
    p.add_argument("--k", type=int, default=None, help="drafted tokens (speq; default: governor)")
    p.add_argument("--backend", default="sim", help="cpu, sim or cuda (sim: modelled hardware)")
    p.add_argument("--profile", default="a100-40g-pcie4", help="hardware profile (sim backend)")
    p.add_argument("--device-memory", default=None, help='device budget, e.g. "12MB"')
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser("roofline", help="plot the Amortization Roofline (PNG) from the cost model")
    p.add_argument("--model", default="phi-3.5-moe", help="a preset name (speq.sim) or 'demo'")
    p.add_argument("--profile", default="a100-40g-pcie4")
    p.add_argument("--acceptance", type=float, default=0.9, help="p_j, the same at every position")
    p.add_argument("--miss-rate", type=float, default=0.5, help="needed experts not resident")
    p.add_argument("--out", default="roofline.png")
    p.set_defaults(func=cmd_roofline)

    from speq.kernels.autotune import CONFIG_DIR, DEFAULT_BUCKETS
    from speq.kernels.shapes import PRESETS

    p = sub.add_parser(
        "tune",
        help="autotune the fused MoE kernels on this GPU",
        description="Tune the fused MoE Triton kernel and write JSON configs.",
    )
    p.add_argument(
        "--model",
        action="append",
        choices=sorted(PRESETS),
        help="model preset (repeatable; default: every preset)",
    )
    p.add_argument("--E", type=int, help="number of experts (explicit shape)")
    p.add_argument("--N", type=int, help="expert intermediate size I (explicit shape)")
    p.add_argument("--K", type=int, help="hidden size H (explicit shape)")
    p.add_argument("--top-k", type=int, default=2, help="experts per token (explicit shape)")
    p.add_argument("--dtype", type=_torch_dtype, default=torch.bfloat16)
    p.add_argument("--bits", type=int, choices=(0, 4, 8), default=0, help="0 = dense")
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--buckets", type=int, nargs="+", default=list(DEFAULT_BUCKETS))
    p.add_argument("--max-candidates", type=int, default=None)
    p.add_argument("--out", type=Path, default=CONFIG_DIR, help="output directory")
    p.set_defaults(func=cmd_tune, tune_parser=p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"speq: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
