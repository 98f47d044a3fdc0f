"""`build_parser`: every command of ``speq`` and its flags."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import speq
from speq.cli.args import (
    BUDGET,
    COUNT,
    GBPS,
    POSITIVE,
    POSITIVE_INT,
    PROBABILITY,
    TOP_P,
    Parser,
    device_memory,
    prompt_text,
    token_ids,
    torch_dtype,
)
from speq.cli.demo import DEMO_PROMPT, cmd_demo
from speq.cli.generate import cmd_generate
from speq.cli.simulate import add_simulate_args
from speq.cli.simulate import run as cmd_simulate
from speq.cli.tools import cmd_explain, cmd_export, cmd_roofline, cmd_tune


def _add_model_args(p: argparse.ArgumentParser) -> None:
    which = p.add_mutually_exclusive_group()
    model_help = "a checkpoint folder: speq's (config.json + model.safetensors) or a Hugging Face "
    model_help += "one of a supported family (config.json + safetensors shards)"
    which.add_argument("--model", "--checkpoint", dest="checkpoint", help=model_help)
    random_help = "a seeded random model of a small demo-family shape (RANDOM_DEMO_CONFIG)"
    which.add_argument("--random", action="store_true", help=random_help)
    p.add_argument("--seed", type=int, default=0, help="seed of the random model and of sampling")


def _add_decode_args(p: argparse.ArgumentParser, max_new_tokens: int) -> None:
    p.add_argument("--max-new-tokens", type=COUNT, default=max_new_tokens)
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=POSITIVE, default=1.0)
    p.add_argument("--top-k", type=POSITIVE_INT, default=None)
    p.add_argument("--top-p", type=TOP_P, default=None)


def _add_generate(sub, policies: tuple[str, ...], backends: tuple[str, ...]) -> None:
    p = sub.add_parser("generate", help="generate tokens from a prompt, then print the metrics")
    _add_model_args(p)
    _add_decode_args(p, 32)
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--prompt", type=prompt_text, help="prompt text (needs a tokenizer)")
    group.add_argument("--prompt-ids", type=token_ids, help='prompt token ids, e.g. "1 2 3"')
    policy_help = "how experts reach the device (default: resident, every expert on it)"
    p.add_argument("--policy", default="resident", choices=policies, help=policy_help)
    memory = p.add_mutually_exclusive_group()
    memory_help = 'device memory, e.g. "12MB", counted in the model\'s dtype (default: room for '
    memory_help += "every expert); non-expert weights and the KV cache come first"
    memory.add_argument("--device-memory", type=device_memory, help=memory_help)
    budget_help = "device memory as non-expert weights + KV cache + this fraction of all expert "
    budget_help += "bytes (as speq demo --budget)"
    memory.add_argument("--budget", type=BUDGET, help=budget_help)
    p.add_argument("--k", type=POSITIVE_INT, help="tokens drafted per cycle (--policy speq; "
                   "default: the governor chooses)")  # fmt: skip
    host_help = "--policy speq: compute the verification's missing experts on the host where "
    host_help += "the cost model says that is faster (auto, the default), always (on) or never "
    host_help += "(off: every miss is copied)"
    p.add_argument("--host-compute", choices=("auto", "on", "off"), default="auto", help=host_help)
    shared_help = "--policy speq: shared (the default) holds each expert once (full precision "
    shared_help += "while cached, INT4 otherwise; on cuda not yet run on a GPU); separate keeps "
    shared_help += "the draft's INT4 copy of every expert beside the cache"
    p.add_argument("--draft-memory", choices=("shared", "separate"), help=shared_help)
    link_help = "bandwidth of the emulated host -> device link (cpu and sim backends; default: "
    link_help += "the hardware profile's, a100-40g-pcie4)"
    p.add_argument("--link-gbps", type=GBPS, help=link_help)
    trace_help = "also record the run's routing trace (JSON) there: its target and draft routing, "
    trace_help += "acceptance and node times, for speq simulate --trace (greedy runs)"
    p.add_argument("--record-trace", type=Path, metavar="FILE", help=trace_help)
    backend_help = "cpu: real compute, emulated link, wall clock; sim: virtual clock from the "
    backend_help += "hardware profile; cuda: a GPU"
    p.add_argument("--backend", default="cpu", choices=backends, help=backend_help)
    p.set_defaults(func=cmd_generate, generate_parser=p)


def build_parser() -> argparse.ArgumentParser:
    from speq.kernels.autotune import CONFIG_DIR, DEFAULT_BUCKETS
    from speq.kernels.shapes import PRESETS
    from speq.runtime.backends import BACKENDS
    from speq.runtime.policies import POLICIES
    from speq.sim import MODEL_PRESETS, PROFILES

    parser = Parser(prog="speq", description=speq.__doc__)
    parser.add_argument("--version", action="version", version=f"speq {speq.__version__}")
    threads_help = "torch intra-op threads (default 1: the demo-size models gain nothing from "
    threads_help += "more, and spinning threads lose badly when a core is busy)"
    parser.add_argument("--threads", type=POSITIVE_INT, default=1, help=threads_help)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="speq against every baseline on the shipped demo model")
    p.add_argument("--prompt", type=prompt_text, default=DEMO_PROMPT)
    p.add_argument("--max-new-tokens", type=POSITIVE_INT, default=32)
    budget_help = "device memory for experts (and the draft), as a fraction of all expert bytes"
    p.add_argument("--budget", type=BUDGET, default=0.375, help=budget_help)
    p.add_argument("--k", type=POSITIVE_INT, help="tokens drafted per cycle (default: governor)")
    demo_model_help = "a checkpoint folder (speq's or a Hugging Face one, with tokenizer.json) to "
    demo_model_help += "run instead of the shipped model"
    p.add_argument("--model", default=None, help=demo_model_help)
    p.set_defaults(func=cmd_demo)

    # "trace" runs on a routing trace, which only speq.simulate supplies: not a user's choice
    backends = tuple(name for name in BACKENDS if name != "trace")
    _add_generate(sub, tuple(POLICIES), backends)

    p = sub.add_parser("explain", help="print the IR after every compiler pass, and the policy")
    _add_model_args(p)
    p.add_argument("--policy", default="speq", choices=tuple(POLICIES))
    p.add_argument("--k", type=POSITIVE_INT, help="drafted tokens (speq; default: governor)")
    p.add_argument("--backend", default="sim", choices=backends, help="sim: modelled hardware")
    p.add_argument("--profile", default="a100-40g-pcie4", choices=tuple(PROFILES))
    p.add_argument("--device-memory", type=device_memory, help='device budget, e.g. "12MB"')
    p.set_defaults(func=cmd_explain)

    what = "Write a model as a Hugging Face transformers checkpoint folder (MixtralForCausalLM)."
    p = sub.add_parser(
        "export", help="write a model as a transformers checkpoint", description=what
    )
    _add_model_args(p)
    hf_help = (
        "output folder: config.json, model.safetensors, tokenizer files (AutoModelForCausalLM "
    )
    hf_help += "and AutoTokenizer load it)"
    p.add_argument("--hf", type=Path, required=True, metavar="OUT", help=hf_help)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("roofline", help="plot the Amortization Roofline (PNG) from the cost model")
    p.add_argument("--model", default="phi-3.5-moe", choices=(*sorted(MODEL_PRESETS), "demo"))
    p.add_argument("--profile", default="a100-40g-pcie4", choices=tuple(PROFILES))
    p.add_argument("--acceptance", type=PROBABILITY, default=0.9, help="p_j, at every position")
    p.add_argument("--miss-rate", type=PROBABILITY, default=0.5, help="needed experts not resident")
    p.add_argument("--out", default="roofline.png")
    p.set_defaults(func=cmd_roofline)

    what = "Tune the fused MoE Triton kernel and write JSON configs."
    p = sub.add_parser("tune", help="autotune the fused MoE kernels on this GPU", description=what)
    presets_help = "model preset (repeatable; default: every preset)"
    p.add_argument("--model", action="append", choices=sorted(PRESETS), help=presets_help)
    p.add_argument("--E", type=POSITIVE_INT, help="number of experts (explicit shape)")
    p.add_argument("--N", type=POSITIVE_INT, help="expert intermediate size I (explicit shape)")
    p.add_argument("--K", type=POSITIVE_INT, help="hidden size H (explicit shape)")
    p.add_argument("--top-k", type=POSITIVE_INT, default=2, help="experts per token (explicit)")
    p.add_argument("--dtype", type=torch_dtype, default=torch.bfloat16)
    p.add_argument("--bits", type=int, choices=(0, 4, 8), default=0, help="0 = dense")
    p.add_argument("--group-size", type=POSITIVE_INT, default=128)
    p.add_argument("--buckets", type=POSITIVE_INT, nargs="+", default=list(DEFAULT_BUCKETS))
    p.add_argument("--max-candidates", type=POSITIVE_INT, default=None)
    p.add_argument("--out", type=Path, default=CONFIG_DIR, help="output directory")
    p.set_defaults(func=cmd_tune, tune_parser=p)

    what = "Replay a routing trace through a per-layer expert cache and report its hit rate "
    what += "(--trace --cache-policy), or simulate speq and every baseline on a model, a GPU and "
    what += "a memory budget (--model --hardware --budget)."
    help_ = "expert-cache hit rates on a routing trace; speq vs the baselines at paper scale"
    p = sub.add_parser("simulate", help=help_, description=what)
    add_simulate_args(p)
    p.set_defaults(func=cmd_simulate, simulate_parser=p)
    return parser
