"""``speq explain``, ``speq export``, ``speq roofline`` and ``speq tune``: the compiler's passes,
a model as a transformers checkpoint, the cost model's roofline, and the kernels' autotuner."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import speq
from speq.cli.common import bars, budget_flag, compile_model, load_model
from speq.models.demo import demo_model


def cmd_explain(args: argparse.Namespace) -> int:
    model, _, what = load_model(args)
    names = ("policy", "k", "backend", "profile", "device_memory")
    opts = speq.CompileOptions(**{name: getattr(args, name) for name in names})
    print(f"# model: {what}")
    print(f"# options: {opts}")
    with budget_flag("--device-memory", args.device_memory):
        print(compile_model(model, opts).graphs)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from speq.models import MoEForCausalLM, export_hf
    from speq.models.demo import random_demo_model
    from speq.models.folder import read_config
    from speq.models.tokenizer import Tokenizer

    if args.checkpoint:
        folder = Path(args.checkpoint)
        if folder.is_dir() and "model_type" in read_config(folder):
            raise ValueError(f"--model {folder} is a transformers checkpoint already")
        model = MoEForCausalLM.from_pretrained(folder)
        tok_path = folder / "tokenizer.json"
        tok, what = (Tokenizer(tok_path) if tok_path.is_file() else None), f"checkpoint {folder}"
    elif args.random:
        model, tok, what = random_demo_model(args.seed), None, f"a random model (seed {args.seed})"
    else:
        (model, tok), what = demo_model(), "the shipped demo MoE"
    out = export_hf(model, tok, args.hf)
    print(f"wrote {what} to {out} as MixtralForCausalLM ({model.embed.dtype}); load it with")
    print(f"  transformers.AutoModelForCausalLM.from_pretrained({str(out)!r}) or speq.load(...)")
    return 0


def cmd_roofline(args: argparse.Namespace) -> int:
    from speq.cost.plot import plot
    from speq.passes.governor import roofline
    from speq.sim import get_preset, get_profile

    folder = Path(args.out).parent
    if not folder.is_dir():
        raise FileNotFoundError(f"--out {args.out}: the folder {folder} does not exist")
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


def cmd_tune(args: argparse.Namespace) -> int:
    from speq.kernels.shapes import PRESETS, MoEShape, get_shape
    from speq.kernels.tuner import tune_and_write, tuning_available

    shapes = [get_shape(m) for m in args.model or []]
    explicit = (args.E, args.N, args.K)
    if any(v is not None for v in explicit):
        if any(v is None for v in explicit):
            args.tune_parser.error("--E, --N and --K go together")
        if args.top_k > args.E:
            args.tune_parser.error(f"--top-k {args.top_k}: expected at most --E ({args.E})")
        shapes.append(MoEShape("custom", args.E, args.top_k, args.K, args.N))
    if not shapes:  # no shape given: every preset
        shapes = [get_shape(m) for m in sorted(PRESETS)]
    if not tuning_available():
        print("speq tune: tuning needs a CUDA device (and Triton); nothing to do on this machine.")
        return 0
    for shape in shapes:
        start = time.perf_counter()
        with bars() as new_bar:
            bar = lambda it, s=shape: new_bar(iterable=it, desc=s.name, leave=False)
            kw = dict(group_size=args.group_size, max_candidates=args.max_candidates, progress=bar)
            path, best = tune_and_write(
                shape, args.dtype, args.buckets, bits=args.bits, **kw, config_dir=args.out
            )
        print(f"{shape.name}: {len(best)} buckets in {time.perf_counter() - start:.0f} s -> {path}")
    return 0
