"""The trace backend: the real policies, cache, link, governor and speculative loop on a virtual
clock, with routing and acceptance from a recorded trace and weights on the meta device.
Replaying a run recorded on the sim backend (the same cost model) reproduces it exactly."""

import dataclasses

import pytest
import torch

import speq
from helpers import speq_budget, tiny_model
from speq.sim.routing_trace import RoutingTrace
from speq.simulate import record_trace, simulate, simulated_model

PROMPT = torch.tensor([[5, 17, 3, 42, 8, 1, 9, 30]])
KEYS = ("tpot_ms", "prefill_ms", "needs", "hits", "late", "bytes_moved", "stall_ms")


@pytest.mark.parametrize(
    "policy,k",
    [("resident", None), ("ondemand", None), ("nextgate", None), ("oracle", None), ("speq", 3)],
)
def test_a_sim_run_replayed_from_its_trace_is_the_same_run(policy, k):
    model = tiny_model(torch.float64, num_layers=3, num_experts=8)
    budget = None if policy == "resident" else speq_budget(model, 6)
    opts = speq.CompileOptions(policy=policy, k=k, backend="sim", device_memory=budget)
    cm = speq.compile(model, opts)
    trace = record_trace(cm, PROMPT, 20)
    real = cm.metrics
    sim = simulate(model.config, trace, dataclasses.replace(opts, dtype=torch.float64), 20)
    assert sim.backend == "trace" and real.needs > 0
    for key in KEYS:
        assert getattr(sim, key) == pytest.approx(getattr(real, key), rel=1e-9), key
    if policy == "speq":
        assert sim.extra["acceptance_by_position"] == real.extra["acceptance_by_position"]


def test_a_governed_run_replayed_with_its_calibration_decides_as_it_did():
    model = tiny_model(torch.float64, num_layers=3, num_experts=8)
    opts = speq.CompileOptions(policy="speq", backend="sim", device_memory=speq_budget(model, 6))
    cm = speq.compile(model, opts)
    trace = record_trace(cm, PROMPT, 20)
    sim = simulated_model(model.config, trace, dataclasses.replace(opts, dtype=torch.float64),
                          calibration=cm.calibration)  # fmt: skip
    sim.generate(torch.zeros(trace.prompt_len, dtype=torch.int64), 20)
    assert sim.engine.governed == cm.engine.governed
    for key in KEYS:
        assert getattr(sim.metrics, key) == pytest.approx(getattr(cm.metrics, key), rel=1e-9)


def test_a_trace_round_trips_through_json(tmp_path):
    model = tiny_model(torch.float64, num_layers=2)
    cm = speq.compile(model, speq.CompileOptions(policy="speq", k=2, backend="sim"))
    trace = record_trace(cm, PROMPT, 10)
    assert trace.draft and trace.accept and trace.passes and trace.node_seconds
    assert trace.positions == PROMPT.shape[1] + 10 - 1 and trace.prompt_len == PROMPT.shape[1]
    trace.save(tmp_path / "t.json")
    assert RoutingTrace.load(tmp_path / "t.json") == trace


def test_a_paper_scale_model_simulates_without_weights_in_seconds():
    """Mixtral-8x7B's shape (46.7B parameters, 32 MoE layers) on the meta device, driven by a
    synthetic trace: ondemand at a budget of 8 experts per layer."""
    import time

    from speq.sim.presets import get_preset

    cfg = get_preset("mixtral-8x7b")
    gen = torch.Generator().manual_seed(0)
    n, layers = 24, len(cfg.moe_layers)
    target = {
        p: [torch.randperm(8, generator=gen)[:2].tolist() for _ in range(layers)] for p in range(n)
    }
    trace = RoutingTrace(8, 2, layers, prompt_len=1, target=target)
    t0 = time.perf_counter()
    m = simulate(cfg, trace, speq.CompileOptions(policy="ondemand", device_memory="40GB"), 20)
    assert time.perf_counter() - t0 < 60
    assert 0 < m.hit_rate < 1 and m.tpot_ms > 1 and m.bytes_moved > 0


def test_a_measured_simulation_keeps_the_recorded_runs_emulated_host():
    """The cpu backend slows its host lane as much as its emulated link; a simulation on the
    run's measured node times takes that slow-down from the trace (with the profile's own rate
    it computed the host's experts many times faster than the run it replays)."""
    model = tiny_model(torch.float64, num_layers=2, num_experts=8)
    m = speq.compile(model).memory
    opts = speq.CompileOptions(
        policy="hostcompute",
        device_memory=m.non_expert_bytes + m.kv_bytes,
        link_gbps=0.1,
    )
    cm = speq.compile(model, opts)
    trace = record_trace(cm, PROMPT, 8)
    link = cm.engine.backend.link(*cm.engine.link_params, cm.engine.device)
    try:
        assert trace.host_time_scale == cm.engine.host_rate(cm.engine.backend, link).time_scale
    finally:
        link.close()  # the emulated link's thread
    assert trace.host_time_scale > 10
    sim = simulated_model(model.config, trace, dataclasses.replace(opts, dtype=torch.float64),
                          measured=True)  # fmt: skip
    sim.generate(torch.zeros(trace.prompt_len, dtype=torch.int64), 8)
    real_ms, sim_ms = cm.metrics.host_compute_ms, sim.metrics.host_compute_ms
    # the emulated host waits out each job's modelled time, so it takes at least the simulation's
    assert 0.5 * real_ms <= sim_ms <= real_ms * 1.001
