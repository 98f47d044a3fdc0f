"""``speq generate``: decode after a prompt under any policy, backend, device budget and link,
then print the text and the run's metrics, each with its unit."""

from __future__ import annotations

import argparse
import contextlib
import time

import speq
from speq.cli.common import (
    bars,
    budget_flag,
    compile_model,
    load_model,
    model_config,
    prompt_ids,
)
from speq.simulate import recording


def _check_flags(args: argparse.Namespace) -> None:
    """Flag combinations refused before any work, naming the flags."""
    from speq.runtime.backends import BACKENDS

    error = args.generate_parser.error
    if args.k is not None and args.policy != "speq":
        error(f"--k {args.k}: applies to --policy speq only, not --policy {args.policy}")
    if args.host_compute == "on" and args.policy != "speq":
        error(f"--host-compute on: applies to --policy speq only, not --policy {args.policy}")
    if args.draft_memory is not None and args.policy != "speq":
        error(
            f"--draft-memory {args.draft_memory}: applies to --policy speq only, "
            f"not --policy {args.policy}"
        )
    if args.link_gbps is not None and args.backend == "cuda":
        error(f"--link-gbps {args.link_gbps:g}: applies to the cpu and sim backends (emulated)")
    if why := BACKENDS[args.backend].unavailable():
        here = ", ".join(name for name, b in BACKENDS.items() if not b.unavailable())
        raise ValueError(f"--backend {args.backend}: {why}; expected one of {here} here")


def _budget_flag(args: argparse.Namespace) -> tuple[str, str | None]:
    """The flag that sets the device budget, and its value as given (None: no budget)."""
    if args.budget is not None:
        return "--budget", f"{args.budget:g}"
    return "--device-memory", args.device_memory


def _options(args: argparse.Namespace, model) -> tuple[speq.CompileOptions, str]:
    """The run's options, and its device memory as the setting line says it."""
    host = {"auto": "auto", "on": True, "off": False}[args.host_compute]
    kw = dict(policy=args.policy, backend=args.backend, k=args.k, link_gbps=args.link_gbps)
    if args.policy == "speq":
        kw.update(host_compute=host)
        if args.draft_memory is not None:  # else CompileOptions' default
            kw.update(draft_memory=args.draft_memory)
    if args.device_memory is not None:
        return speq.CompileOptions(**kw, device_memory=args.device_memory), args.device_memory
    if args.budget is not None:
        from speq.compare import budget_bytes

        nbytes = budget_bytes(speq.compile(model), args.budget)
        said = (
            f"{nbytes / 1e6:.2f} MB (--budget {args.budget:g}: non-expert weights + KV cache + "
            f"{args.budget:.0%} of the expert bytes)"
        )
        return speq.CompileOptions(**kw, device_memory=nbytes), said
    return speq.CompileOptions(**kw), "room for every expert"


def _setting(cm: speq.CompiledModel, args: argparse.Namespace, memory: str) -> str:
    """The policy, backend, link and device memory of the run, in one line."""
    policy = cm.options.policy
    if cm.governed is not None:
        choice = f"k*={cm.governed.spec.k}" if cm.governed.use_draft else "no draft"
        policy += f" (governor: {choice})"
    elif cm.options.k is not None:
        policy += f" (k={cm.options.k})"
    clock = "virtual clock" if cm.engine.backend.modelled_time else "wall clock"
    if cm.options.backend == "cuda":
        link = "the GPU's own"
    else:
        gbps, latency = cm.engine.link_params
        source = "--link-gbps" if args.link_gbps is not None else f"{cm.options.profile}'s"
        kind = "modelled" if cm.engine.backend.modelled_time else "emulated"
        link = f"{gbps:.4g} GB/s ({source}) + {latency:.4g} us per copy, {kind}"
    return (
        f"setting: policy {policy}; backend {cm.options.backend} ({clock}); link {link}; "
        f"device memory {memory}"
    )


def _metrics(cm: speq.CompiledModel) -> list[str]:
    """The run's metrics, one a line, each with its unit."""
    m = cm.metrics
    total = len(cm.store.keys())
    unit = "virtual ms" if cm.engine.backend.modelled_time else "ms"
    if m.acceptance_rate is not None:
        acceptance = f"{m.acceptance_rate:.2f} of drafted tokens accepted"
    elif cm.options.policy != "speq":
        acceptance = f"- (not speculative: policy {cm.options.policy})"
    else:
        acceptance = "- (no draft ran)"
    lines = [
        f"TPOT: {m.tpot_ms:.2f} {unit}/token (decoding, prompt excluded)",
        f"hit rate: {m.hit_rate:.2f} of (layer, expert) needs resident when needed "
        f"({m.hits} of {m.needs})",
        f"moved: {m.bytes_moved / 1e6:.2f} MB over the link while decoding "
        f"({m.experts_moved} expert copies)",
        f"host: {m.host_expert_runs} (layer, expert) needs computed on the host instead of "
        f"the device, {m.host_compute_ms:.2f} {unit} of host time",
        f"acceptance: {acceptance}",
        f"expert cache slots: {m.cache_slots} of {total} experts ({m.full_precision_slots} "
        f"held at full precision at the end, {m.demotions} demoted to INT4 while decoding)",
    ]
    if m.calibration_s is not None:
        lines.append(f"governor calibration: {m.calibration_s:.2f} s (wall clock, not in TPOT)")
    return lines


def cmd_generate(args: argparse.Namespace) -> int:
    _check_flags(args)
    if args.record_trace is not None and args.sample:
        raise ValueError("--record-trace records greedy runs (acceptance by the greedy rule)")
    model, tokenizer, what = load_model(args)
    ids = prompt_ids(args, tokenizer, model_config(model))
    print(f"model: {what}")
    with budget_flag(*_budget_flag(args)):
        opts, memory = _options(args, model)
        if args.policy == "speq" and args.k is None:
            print(f"calibrating the governor on the {args.backend} backend...", flush=True)
        cm = compile_model(model, opts)
    cm.engine.check_request(ids, args.max_new_tokens)  # anything else wrong: before the bar
    if args.max_new_tokens:
        cm.calibrate(ids)  # the governor's, on this prompt (a no-op without one): not in the bar
    kw = {name: getattr(args, name) for name in ("temperature", "top_k", "top_p", "seed")}
    with bars() as new_bar:
        bar = new_bar(total=args.max_new_tokens, desc="decoding", unit="tok")
        t0, tick = time.perf_counter(), lambda _: bar.update(1)
        with recording(cm) if args.record_trace else contextlib.nullcontext() as recorder:
            out = cm.generate(ids, args.max_new_tokens, do_sample=args.sample, callback=tick, **kw)
    if recorder is not None:
        recorder.trace.prompt_len = int(ids.shape[-1])
        recorder.trace.save(args.record_trace)
        print(f"routing trace written to {args.record_trace} (speq simulate --trace reads it)")
    seconds = time.perf_counter() - t0
    print(
        f"{args.max_new_tokens} tokens in {seconds:.2f} s "
        f"({seconds / max(args.max_new_tokens, 1) * 1e3:.1f} ms/token, wall clock, prompt "
        "included)"
    )
    if tokenizer is not None:
        print(tokenizer.decode(out[0].tolist()))
    else:
        print("tokens:", " ".join(str(t) for t in out[0].tolist()))
    print(_setting(cm, args, memory))
    if cm.metrics is None:
        print("metrics: none (no new tokens)")
    else:
        print("\n".join(_metrics(cm)))
    return 0
