"""Trace-driven simulation: the real policies, expert cache, link model, governor and
speculative loop on a virtual clock, with no weights and no compute.

`simulate` compiles a model of the given shape with weights on the ``meta`` device and runs it on
the ``trace`` backend: routing and acceptance come from a `RoutingTrace`, node times from the
cost model for a hardware profile (speq.sim.profiles). `record_trace` records such a trace from
a real run of a compiled model, so that a simulation can be checked against the run it came
from (bench/bench_sim_validate.py).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch

from speq.compiler import CompiledModel, compile_spec
from speq.cost import Calibration
from speq.models.checkpoint import expected_shapes
from speq.models.config import MoEConfig
from speq.models.folder import read_config
from speq.models.hf import family_of
from speq.models.spec import ModelSpec
from speq.models.weights import read_json
from speq.runtime.budget import BudgetError
from speq.runtime.metrics import Metrics
from speq.runtime.options import CompileOptions
from speq.runtime.trace_routing import TraceRecorder
from speq.sim.layerwise import layerwise_offload
from speq.sim.presets import MODEL_PRESETS, get_preset
from speq.sim.profiles import HardwareProfile, get_profile
from speq.sim.routing_trace import RoutingTrace
from speq.sim.trace_gen import REFERENCE_STATS, generate_trace, with_draft
from speq.sim.traces import read_trace, to_routing_trace

__all__ = [
    "CONTENDERS",
    "compare",
    "meta_weights",
    "model_config",
    "one_cycle",
    "record_trace",
    "recording",
    "routing_for",
    "simulate",
    "simulated_model",
]


def meta_weights(cfg: MoEConfig, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every weight of a model of ``cfg``'s shape, on the ``meta`` device (no memory)."""
    return {
        name: torch.empty(shape, dtype=dtype, device="meta")
        for name, shape in expected_shapes(cfg).items()
    }


def simulated_model(
    cfg: MoEConfig,
    trace: RoutingTrace,
    options: CompileOptions | None = None,
    measured: bool = False,
    calibration: Calibration | None = None,
) -> CompiledModel:
    """A compiled model of ``cfg``'s shape on the ``trace`` backend, driven by ``trace``.
    ``options.dtype`` (default bfloat16) is the dtype the weights, copies and node times count;
    ``measured``: node times (and the host's time between nodes) as measured in the recorded
    run, where the trace has them, instead of the cost model's for ``options.profile``;
    ``calibration``: the governor's (of the recorded run, say) instead of calibrating here."""
    options = dataclasses.replace(options or CompileOptions(), backend="trace")
    dtype = options.dtype or torch.bfloat16
    if trace.moe_layers != len(cfg.moe_layers) or trace.num_experts != cfg.num_experts:
        raise ValueError(
            f"the trace routes {trace.moe_layers} MoE layers of {trace.num_experts} experts, "
            f"the model has {len(cfg.moe_layers)} of {cfg.num_experts}"
        )
    spec = ModelSpec(cfg, dtype)
    if measured and not trace.node_seconds:
        raise ValueError("the trace has no measured node times: record it with record_trace")
    return compile_spec(spec, meta_weights(cfg, dtype), options, trace, measured, calibration)


def simulate(
    cfg: MoEConfig,
    trace: RoutingTrace,
    options: CompileOptions | None = None,
    new_tokens: int | None = None,
    measured: bool = False,
    calibration: Calibration | None = None,
) -> Metrics:
    """Decode ``new_tokens`` (default: as many as the trace routes) after the trace's prompt on
    the ``trace`` backend; the run's metrics (TPOT on the virtual clock, hits, bytes moved)."""
    cm = simulated_model(cfg, trace, options, measured, calibration)
    n = trace.decode_tokens if new_tokens is None else new_tokens
    if not 0 < n <= trace.decode_tokens:
        raise ValueError(f"new_tokens must be in [1, {trace.decode_tokens}] for this trace")
    cm.generate(torch.zeros(trace.prompt_len, dtype=torch.int64), n)
    return cm.metrics


def record_trace(cm: CompiledModel, input_ids: torch.Tensor, max_new_tokens: int) -> RoutingTrace:
    """Generate with ``cm`` as usual and return the routing trace of that run (every pass's
    routing, the routing of the true tokens by position, the acceptance of verified drafts).
    Greedy decoding: acceptance is recorded for the greedy rule."""
    prompt = cm.engine.check_request(input_ids, max_new_tokens)
    with recording(cm) as recorder:
        cm.generate(prompt, max_new_tokens)
    recorder.trace.prompt_len = int(prompt.shape[0])
    return recorder.trace


@contextmanager
def recording(cm: CompiledModel) -> Iterator[TraceRecorder]:
    """Record the routing trace of the `generate` call inside (one, greedy): the recorder's
    ``trace`` afterwards; set its ``prompt_len`` to the prompt's length."""
    engine, cfg = cm.engine, cm.config
    recorder = TraceRecorder(cfg.num_experts, cfg.top_k, cfg.moe_layers, engine.program)
    engine.recorder = recorder
    try:
        yield recorder
    finally:
        engine.recorder = None


# ---------------------------------------------------------------------------- routing
PROMPT_TOKENS = 16  # a generated trace's prompt
SPARE = 32  # positions routed past the last new token: the last windows draft beyond it


def routing_for(
    cfg: MoEConfig,
    tokens: int,
    paths: Sequence[str | Path] = (),
    seed: int = 0,
    agreement: float | None = None,
    acceptance: tuple[float, float] | None = None,
    name: str = "the model",
) -> tuple[RoutingTrace, int, str]:
    """The routing to simulate ``tokens`` new tokens of ``cfg`` on: (the trace, the new tokens
    it can decode, where it came from). No ``paths``: generated with the real Mixtral traces'
    statistics (`REFERENCE_STATS`); one speq recorded trace: as recorded; routing logs: their
    longest sequence, with a draft drawn at ``agreement`` and ``acceptance`` (`with_draft`). A
    ValueError (naming the model ``name``) when the routing's shape is not ``cfg``'s or it
    routes too few tokens."""
    E, k, L = cfg.num_experts, cfg.top_k, len(cfg.moe_layers)
    draft = dict(agreement=agreement, acceptance=acceptance)
    if not paths:
        trace = generate_trace(
            REFERENCE_STATS, E, k, L, tokens + SPARE, PROMPT_TOKENS, seed, **draft
        )
        source = f"generated (Mixtral traces' statistics, seed {seed})"
    else:
        read = [read_trace(p) for p in paths]
        recorded = [r for r in read if isinstance(r, RoutingTrace)]
        if recorded and len(read) > 1:
            raise ValueError("a speq recorded trace is simulated alone, not with other routing")
        if recorded:
            trace, source = recorded[0], str(paths[0])
        else:
            seq = max((s for log in read for s in log.sequences), key=lambda s: len(s.tokens))
            trace = with_draft(to_routing_trace(seq, E), seed, **draft)
            files = ", ".join(Path(p).name for p in paths)
            source = f"{files}: {seq.dataset} problem {seq.problem_id}"
    if (trace.num_experts, trace.top_k, trace.moe_layers) != (E, k, L):
        raise ValueError(
            f"{source} routes top-{trace.top_k} of {trace.num_experts} experts in "
            f"{trace.moe_layers} layers; {name} has top-{k} of {E} in {L}"
        )
    n = min(tokens, trace.decode_tokens - SPARE)
    if n < 1:
        raise ValueError(
            f"{source} routes {trace.decode_tokens} tokens: a simulation needs {SPARE} more than "
            "it decodes (speculation drafts past the last token)"
        )
    return trace, n, source


# ---------------------------------------------------------------------------- contenders
# name: (policy, what it stands for); "-sc" runs in the memory speq's expert cache gets. The
# next-layer gate prefetch (policy nextgate) is left out: it needs the next layer's router applied
# to the current hidden state, which only a recorded trace of a nextgate run holds.
# name -> (policy, what it stands for, further CompileOptions fields)
CONTENDERS: dict[str, tuple[str | None, str, dict]] = {
    "speq": (
        "speq",
        "speq: INT4 draft, prefetch, verification, misses on the host where faster, each "
        "expert held once (full precision while cached, INT4 otherwise); the governor picks k "
        "and split",
        {},
    ),
    "speq-no-host": (
        "speq",
        "speq without host compute (host_compute=False)",
        {"host_compute": False},
    ),
    "speq-separate": (
        "speq",
        "speq with a separate draft: an INT4 copy of every expert beside the cache "
        '(draft_memory="separate")',
        {"draft_memory": "separate"},
    ),
    "mixtral-offloading-sm": ("ondemand", "Mixtral-Offloading: LRU cache, same memory as speq", {}),
    "mixtral-offloading-sc": (
        "ondemand",
        "Mixtral-Offloading: LRU, the memory a separate INT4 draft leaves (the paper's SC)",
        {},
    ),
    "fiddler": ("fiddler", "Fiddler: LRU cache, misses computed on the host", {}),
    "hostcompute": (
        "hostcompute",
        "llama.cpp --n-cpu-moe / KTransformers: every routed expert computed on the host",
        {},
    ),
    "transformers-layerwise": (None, "Transformers device_map offloading (closed form)", {}),
    "oracle": ("oracle", "Belady's fetches, each as early as its slot allows (the I/O bound)", {}),
    "resident": (
        "resident",
        "every expert on the device (the compute bound; ignores the budget)",
        {},
    ),
}


def compare(
    cfg: MoEConfig,
    trace: RoutingTrace,
    hardware: str | HardwareProfile,
    budget: int,
    new_tokens: int | None = None,
    contenders: tuple[str, ...] = tuple(CONTENDERS),
    timeline: str | None = None,
    progress=None,
) -> dict[str, dict]:
    """Every contender on ``trace`` at ``budget`` bytes of device memory on ``hardware``:
    per contender ``tpot_ms``, ``hit_rate``, ``bytes_per_token`` and
    ``host_expert_runs_per_token`` (decode), speq's with the governor's ``k`` (None when it
    dropped the draft, or ``draft_fits`` False: the budget has no room for it). A contender that does not fit the budget
    has ``tpot_ms`` None and an ``error``. ``timeline``: write speq's run as a Chrome trace
    there (`one_cycle` cuts one draft-verify cycle from it). ``progress(name)``: called as each
    contender starts."""
    unknown = sorted(set(contenders) - set(CONTENDERS))
    if unknown:
        raise ValueError(f"unknown contenders {unknown}; known: {', '.join(CONTENDERS)}")
    n = trace.decode_tokens if new_tokens is None else new_tokens
    base = CompileOptions(profile=hardware, dtype=torch.bfloat16)
    out: dict[str, dict] = {}
    draft_bytes = None
    order = sorted(contenders, key=lambda c: c not in ("speq", "resident"))  # theirs first
    for name in order:
        if progress is not None:
            progress(name)
        policy, _, extra = CONTENDERS[name]
        if name == "transformers-layerwise":
            out[name] = _layerwise(cfg, hardware, budget, out.get("resident"), trace)
            continue
        memory = None if policy == "resident" else budget
        if name == "mixtral-offloading-sc":
            if draft_bytes is None:
                out[name] = _unfit("speq's draft does not fit: there is no speq cache to match")
                continue
            memory = budget - draft_bytes
        path = timeline if name == "speq" else None
        opts = dataclasses.replace(
            base, policy=policy, device_memory=memory, trace_path=path, **extra
        )
        try:
            cm = simulated_model(cfg, trace, opts)
        except BudgetError as e:  # the budget cannot hold what the contender needs
            out[name] = _unfit(str(e))
            continue
        cm.generate(torch.zeros(trace.prompt_len, dtype=torch.int64), n)
        m = cm.metrics
        out[name] = dict(
            tpot_ms=m.tpot_ms,
            hit_rate=m.hit_rate,
            bytes_per_token=m.bytes_moved / m.tokens,
            cache_slots=m.cache_slots,
            host_expert_runs_per_token=m["host_expert_runs"] / m.tokens,
        )
        if policy == "speq":
            g = cm.engine.governed
            drafting = g is None or g.use_draft
            out[name]["k"] = g.spec.k if drafting and g is not None else None
            out[name]["acceptance"] = m.extra.get("acceptance_rate")
            out[name]["draft_fits"] = cm.engine.draft_fits
            # a draftless run may bring the draft back mid-run (None: it did not)
            out[name]["switched_to_draft_after"] = m.extra.get("switched_to_draft_after")
            if name == "speq" and cm.engine.draft_fits:  # SC: beside a separate draft
                draft_bytes = cm.engine.draft.nbytes
    return {name: out[name] for name in contenders}


def _unfit(error: str) -> dict:
    return dict(tpot_ms=None, hit_rate=None, bytes_per_token=None, error=error)


def _layerwise(cfg, hardware, budget, resident, trace) -> dict:
    """Transformers-style offloading: the resident run's compute plus the copies of the layers
    that do not fit (speq.sim.layerwise), in the memory an ondemand plan leaves for experts."""
    if resident is None or resident.get("tpot_ms") is None:
        return _unfit("needs the resident run's compute time (contender 'resident')")
    plan = CompileOptions(profile=hardware, dtype=torch.bfloat16, device_memory=budget)
    try:
        memory = simulated_model(cfg, trace, dataclasses.replace(plan, policy="ondemand")).memory
        fixed = memory.non_expert_bytes + memory.kv_bytes + memory.workspace_bytes
        lw = layerwise_offload(cfg, get_profile(hardware), budget, fixed)
    except ValueError as e:  # BudgetError included
        return _unfit(str(e))
    return dict(
        tpot_ms=resident["tpot_ms"] + 1e3 * lw.copy_seconds,
        hit_rate=lw.hit_rate,
        bytes_per_token=lw.bytes_per_token,
        resident_layers=lw.resident_layers,
    )


def one_cycle(events: list[dict]) -> list[dict]:
    """The events of one draft-verify cycle from a run's Chrome trace: from the start of the
    draft passes of the middle cycle to the end of the verification that follows them."""
    passes = sorted((e for e in events if e["tid"] == "pass"), key=lambda e: e["ts"])
    verifies = [i for i, e in enumerate(passes) if e["name"].startswith("step") and i > 0]
    drafted = [i for i in verifies if passes[i - 1]["name"].startswith("draft")]
    if not drafted:  # no speculation: one decode step
        if not passes:
            return events
        mid = passes[len(passes) // 2]
        start, end = mid["ts"], mid["ts"] + mid["dur"]
    else:
        v = drafted[len(drafted) // 2]
        first = v - 1
        while first > 0 and passes[first - 1]["name"].startswith("draft"):
            first -= 1
        start, end = passes[first]["ts"], passes[v]["ts"] + passes[v]["dur"]
    return [e for e in events if e["ts"] < end and e["ts"] + e["dur"] > start]


def model_config(model: str) -> MoEConfig:
    """A model's shape: a preset name (speq.sim.MODEL_PRESETS), a ``config.json`` path or a
    checkpoint folder (Hugging Face, by its ``model_type``, or speq's own); only the config
    is read."""
    if model in MODEL_PRESETS:
        return get_preset(model)
    path = Path(model)
    if path.is_dir():
        d = read_config(path)
        source = str(path / "config.json")
    elif path.is_file():
        d = read_json(path, "a JSON object")
        source = str(path)
    else:
        raise ValueError(
            f"--model {model!r}: not a preset ({', '.join(sorted(MODEL_PRESETS))}), "
            "nor a config.json or checkpoint folder"
        )
    if "model_type" in d:
        return family_of(d["model_type"]).config(d, source)
    try:
        return MoEConfig.from_dict(d)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{source}: {e}") from None
