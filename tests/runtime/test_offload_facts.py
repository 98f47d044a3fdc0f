"""Deterministic facts of the offloading runtime: bytes moved, hits, waste. No timings."""

import json

import pytest
import torch

import speq
from helpers import tiny_model

PROMPT = torch.tensor([[5, 17, 3, 42, 8, 1]])
N = 16


@pytest.fixture(scope="module")
def model():
    return tiny_model(torch.float64, num_layers=3, num_experts=7, top_k=2)


def _run(model, policy, slots=4, backend="sim", **kw):
    probe = speq.compile(model)
    m = probe.memory
    budget = m.non_expert_bytes + m.kv_bytes + slots * m.expert_bytes
    cm = speq.compile(
        model, speq.CompileOptions(policy=policy, backend=backend, device_memory=budget, **kw)
    )
    cm.generate(PROMPT, N)
    return cm.metrics


def test_resident_moves_nothing_and_always_hits(model):
    cm = speq.compile(model)
    cm.generate(PROMPT, N)
    m = cm.metrics
    assert m.bytes_moved == m.prefill_bytes_moved == m.experts_moved == 0
    assert m.hit_rate == 1.0 and m.stall_ms == 0.0


def test_counts_add_up(model):
    m = _run(model, "ondemand")
    assert m.hits + m.late + m.demand_fetches == m.needs
    assert m.bytes_moved == m.experts_moved * speq.compile(model).store.expert_bytes
    assert m.experts_moved == m.demand_fetches  # ondemand never prefetches
    assert m.prefetches_issued == 0
    # every decode step needs top_k experts in each of the 3 MoE layers (k distinct ids)
    assert m.needs == N * 3 * 2  # N one-token steps, 3 MoE layers, top-2


@pytest.mark.parametrize("slots", [2, 4, 9])
def test_oracle_moves_no_more_than_ondemand(model, slots):
    ondemand, oracle = _run(model, "ondemand", slots), _run(model, "oracle", slots)
    assert oracle.bytes_moved <= ondemand.bytes_moved
    assert oracle.demand_fetches == 0  # everything it moves it prefetched
    assert oracle.prefetches_wasted == 0


def test_cpu_and_sim_backends_move_the_same_experts_on_demand(model):
    cpu, sim = _run(model, "ondemand", backend="cpu", link_gbps=8.0), _run(model, "ondemand")
    assert (cpu.bytes_moved, cpu.hits, cpu.needs) == (sim.bytes_moved, sim.hits, sim.needs)


def test_full_cache_moves_each_expert_at_most_once(model):
    m = _run(model, "ondemand", slots=21)
    assert m.experts_moved + m.prefill_bytes_moved // speq.compile(model).store.expert_bytes <= 21


def test_prefetch_accounting(model):
    m = _run(model, "nextgate")
    assert m.prefetches_issued > 0
    assert m.prefetches_used + m.prefetches_wasted <= m.prefetches_issued


def test_sim_stall_is_zero_with_an_infinitely_fast_link(model):
    m = _run(model, "ondemand", link_gbps=1e9, link_latency_us=0.0)
    assert m.stall_ms == pytest.approx(0.0, abs=1e-6)
    slow = _run(model, "ondemand", link_gbps=0.01)
    assert slow.stall_ms > 0 and slow.tpot_ms > m.tpot_ms


def test_timeline_has_compute_and_copy_lanes(model, tmp_path):
    path = tmp_path / "trace.json"
    _run(model, "ondemand", backend="cpu", link_gbps=8.0, trace_path=str(path))
    events = json.loads(path.read_text())["traceEvents"]
    lanes = {e["tid"] for e in events}
    assert {"compute", "copy"} <= lanes
    assert all(e["dur"] >= 0 for e in events)


@pytest.mark.parametrize("policy", ["ondemand", "nextgate"])
def test_one_token_per_pass_makes_the_token_hit_rate_the_hit_rate(model, policy):
    """Each pass routes one token to top-k distinct experts: routings and needs coincide, and
    every need that was not a hit is a copy the compute waited for."""
    m = _run(model, policy)
    assert m.token_hit_rate == pytest.approx(m.hit_rate)
    assert m.stalls_per_token * N == pytest.approx(m.needs - m.hits)
    assert m.stalls_per_token * N == pytest.approx(m.demand_fetches + m.late)
    resident = speq.compile(model)
    resident.generate(PROMPT, N)
    assert resident.metrics.token_hit_rate == 1.0 and resident.metrics.stalls_per_token == 0.0
