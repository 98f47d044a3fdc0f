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

import torch

from speq.compiler import CompiledModel, compile_spec
from speq.cost import Calibration
from speq.models.checkpoint import expected_shapes
from speq.models.config import MoEConfig
from speq.models.spec import ModelSpec
from speq.runtime.metrics import Metrics
from speq.runtime.options import CompileOptions
from speq.runtime.trace_routing import TraceRecorder
from speq.sim.routing_trace import RoutingTrace

__all__ = ["meta_weights", "record_trace", "simulate", "simulated_model"]


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
    engine = cm.engine
    cfg = cm.config
    engine.recorder = TraceRecorder(cfg.num_experts, cfg.top_k, cfg.moe_layers, engine.program)
    try:
        prompt = engine.check_request(input_ids, max_new_tokens)
        cm.generate(prompt, max_new_tokens)
        trace = engine.recorder.trace
    finally:
        engine.recorder = None
    trace.prompt_len = int(prompt.shape[0])
    return trace
