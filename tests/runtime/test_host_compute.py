"""Experts computed on the host: the hostcompute and fiddler policies and speq's host_compute
are lossless, the cost rule picks the lane that finishes first, and the host lanes keep time."""

import dataclasses
import threading
import time

import pytest
import torch

import speq
from helpers import (
    VARIANTS,
    chi_square_p,
    first_sampled_counts,
    sampling_case,
    speq_budget,
    tiny_model,
)
from speq.runtime.host import HostJob, HostRate, ThreadHost, VirtualHost
from speq.runtime.link import EmulatedLink, VirtualLink
from speq.sim.profiles import get_profile

PROMPT = torch.tensor([[5, 17, 3, 42, 8, 1]])
N = 12
BASE = get_profile("a100-40g-pcie4")
FAST_HOST = dataclasses.replace(BASE, name="fast host", host_latency_us=0.0)  # host wins
SLOW_HOST = dataclasses.replace(BASE, name="slow host", host_gbps=1e-3)  # the link wins


def _budget(model, slots: int) -> int:
    m = speq.compile(model).memory
    return m.non_expert_bytes + m.kv_bytes + slots * m.expert_bytes


@pytest.mark.parametrize(
    "variant",
    ["top1", "mha_shared", "oai_expert_biases", "deepseek_v2_mla", "dense_first_topk_softmax"],
)
@pytest.mark.parametrize("backend", ["cpu", "sim"])
def test_host_compute_policies_equal_resident_greedy(variant, backend):
    model = tiny_model(torch.float64, **VARIANTS[variant])
    expected = speq.compile(model).generate(PROMPT, N)
    cfg = model.config
    slots = cfg.top_k + 1
    runs = [
        ("hostcompute", {}, _budget(model, 0)),
        ("fiddler", {}, _budget(model, slots)),
        ("speq", dict(k=3, host_compute=True), speq_budget(model, slots)),
        ("speq", dict(k=2, host_compute="auto"), speq_budget(model, slots)),
    ]
    for policy, extra, budget in runs:
        opts = speq.CompileOptions(
            policy=policy,
            backend=backend,
            device_memory=budget,
            link_gbps=4.0,
            profile=FAST_HOST,
            **extra,
        )
        cm = speq.compile(model, opts)
        assert torch.equal(cm.generate(PROMPT, N), expected), (policy, extra)
        m = cm.metrics
        assert m["host_expert_runs"] > 0, (policy, extra)
        assert m["host_compute_ms"] > 0
        if policy == "hostcompute":
            assert m.cache_slots == 0 and m.bytes_moved == 0 and m.hits == 0
            assert m["host_expert_runs"] == m.needs


def test_speq_with_a_governor_and_host_compute_is_lossless():
    model = tiny_model(torch.float64, **VARIANTS["qwen_gated_headnorm"])
    expected = speq.compile(model).generate(PROMPT, N)
    budget = speq_budget(model, model.config.top_k + 1)
    for backend in ("cpu", "sim"):
        opts = speq.CompileOptions(
            policy="speq", backend=backend, device_memory=budget, profile=FAST_HOST
        )
        assert torch.equal(speq.compile(model, opts).generate(PROMPT, N), expected)


def test_the_cost_rule_sends_a_miss_where_it_finishes_first():
    model = tiny_model(torch.float64)
    budget = _budget(model, model.config.top_k + 1)

    def runs(profile, host_compute="auto", policy="speq"):
        extra = dict(k=2, host_compute=host_compute) if policy == "speq" else {}
        opts = speq.CompileOptions(
            policy=policy, backend="sim", device_memory=budget, profile=profile, **extra
        )
        if policy == "speq":
            opts = dataclasses.replace(opts, device_memory=speq_budget(model, 3))
        cm = speq.compile(model, opts)
        cm.generate(PROMPT, N)
        return cm.metrics

    assert runs(FAST_HOST, policy="fiddler")["host_expert_runs"] > 0
    assert runs(SLOW_HOST, policy="fiddler")["host_expert_runs"] == 0
    assert runs(FAST_HOST)["host_expert_runs"] > 0
    assert runs(SLOW_HOST)["host_expert_runs"] == 0
    assert runs(SLOW_HOST, host_compute=True)["host_expert_runs"] > 0  # forced
    assert runs(FAST_HOST, host_compute=False)["host_expert_runs"] == 0
    off = runs(FAST_HOST, host_compute=False)
    assert off.demand_fetches > 0  # the misses it would have sent to the host are copied


def test_nothing_on_the_host_reports_zero_runs():
    model = tiny_model(torch.float64)
    for opts in (
        speq.CompileOptions(),
        speq.CompileOptions(policy="ondemand", backend="sim", device_memory=_budget(model, 3)),
    ):
        cm = speq.compile(model, opts)
        cm.generate(PROMPT, 4)
        assert cm.metrics["host_expert_runs"] == 0 and cm.metrics["host_compute_ms"] == 0.0


def test_every_layer_waits_for_the_host_when_nothing_is_on_the_device():
    """hostcompute on the sim clock: each layer's host job lies on the critical path, so the
    decode takes at least the host's time (the waits are counted as stalls)."""
    model = tiny_model(torch.float64)
    opts = speq.CompileOptions(
        policy="hostcompute", backend="sim", device_memory=_budget(model, 0), profile=BASE
    )
    cm = speq.compile(model, opts)
    cm.generate(PROMPT, N)
    m = cm.metrics
    assert m.decode_ms >= m["host_compute_ms"] > 0
    assert m.stall_ms > 0 and m.stalls_per_token == 0  # host waits, not copies


def test_sampling_with_host_compute_keeps_the_targets_distribution():
    model, prompt, probs = sampling_case()
    opts = speq.CompileOptions(
        policy="speq",
        k=1,
        backend="sim",
        device_memory=speq_budget(model, model.config.top_k),
        host_compute=True,
        profile=FAST_HOST,
    )
    cm = speq.compile(model, opts)
    cm.generate(prompt, 2, do_sample=True, temperature=0.9, seed=0)
    assert cm.metrics["host_expert_runs"] > 0  # the verification's misses ran on the host
    assert chi_square_p(first_sampled_counts(model, prompt, 7, options=opts), probs) > 1e-3


@pytest.mark.parametrize(
    "value, policy, error",
    [
        ("yes", "speq", "host_compute = 'yes'"),
        (1, "speq", "host_compute = 1"),
        (True, "ondemand", "applies to policy='speq' only"),
    ],
)
def test_bad_host_compute_options_are_refused(value, policy, error):
    with pytest.raises(ValueError, match=error):
        speq.CompileOptions(policy=policy, host_compute=value)


# ---------------------------------------------------------------------------- the lanes
def _job(seconds, compute=lambda: None, layer=0):
    return HostJob(layer, (0,), seconds, compute)


def test_virtual_host_runs_jobs_one_after_another_and_waits_after_the_device_work():
    link = VirtualLink(16.0, 10.0)
    host = VirtualHost(link)
    a, b = _job(3.0, lambda: torch.ones(1)), _job(2.0)
    host.submit(a)
    host.submit(b)
    assert (a.started_at, a.done_at, b.started_at, b.done_at) == (0.0, 3.0, 3.0, 5.0)
    assert torch.equal(a.result, torch.ones(1))  # computed at once
    assert host.backlog() == 5.0
    assert host.collect(b) == 0.0  # the wait is deferred to join
    link.advance(1.5)  # the layer's device work
    assert host.join() == 3.5 and link.now() == 5.0
    assert host.join() == 0.0


def test_thread_host_computes_on_another_thread_and_throttles_to_its_time():
    link = EmulatedLink(16.0, 10.0)
    host = ThreadHost(link, throttle=True)
    where = []
    job = _job(0.05, lambda: where.append(threading.current_thread().name) or torch.zeros(2))
    t0 = time.perf_counter()
    host.submit(job)
    host.collect(job)
    assert time.perf_counter() - t0 >= 0.05 and job.done_at - job.started_at >= 0.05
    assert where == ["speq-host"] and torch.equal(job.result, torch.zeros(2))

    def fails():
        raise RuntimeError("host out of memory")

    bad = _job(0.0, fails)
    host.submit(bad)
    with pytest.raises(RuntimeError, match="host out of memory"):
        host.collect(bad)
    host.close()
    link.close()


def test_host_rate_scales_the_profiles_host_time():
    rate = HostRate(BASE, time_scale=2.0)
    nbytes, flops = 10**9, 1e9
    expected = 2.0 * (
        BASE.host_latency_us * 1e-6 + max(1 / BASE.host_gbps, 1e-3 / BASE.host_tflops)
    )
    assert rate.job_seconds(nbytes, [flops]) == pytest.approx(expected)


def test_speq_without_its_draft_runs_the_draftless_policy_its_calibration_measured_faster():
    """Without its draft, speq runs fiddler's policy or ondemand's, whichever the calibration
    measured waiting less for its misses (`Policy.plain_host`); host_compute=True forces
    fiddler's (every miss on the host), False ondemand's."""
    from helpers import tiny_config
    from speq.cost import CacheModel, HardwareModel, govern
    from speq.runtime.policies import Fiddler, OnDemand, draftless

    cfg = tiny_config(num_layers=4, num_experts=8, top_k=2)
    hw = HardwareModel(1e-3, {1: 4e-3, 9: 4e-3}, copy_s=10e-3, host_s=2e-3)

    def policy(host):
        return govern(cfg, hw, [0.5], CacheModel(0.5), plain_io_s=1e-3, plain_host=host)

    assert type(draftless("auto", policy(False))) is OnDemand
    assert type(draftless("auto", policy(True))) is Fiddler and not draftless("auto").always
    assert type(draftless("auto", None)) is Fiddler  # no calibration: host where faster
    assert draftless(True, policy(False)).always
    assert type(draftless(False, policy(True))) is OnDemand


def test_the_calibration_weighs_both_draftless_policies_and_keeps_the_faster():
    """On the sim backend (deterministic) the calibration runs ondemand's and fiddler's
    one-token decoding and keeps the one whose misses cost less; the choice it records is what
    a draftless run then does."""
    model = tiny_model(torch.float64, num_layers=2, num_experts=8, top_k=2)
    base = dict(backend="sim", memory_dtype=torch.bfloat16)
    mem = speq.compile(
        model, speq.CompileOptions(**base, policy="speq", draft_memory="separate", k=1)
    ).memory  # k: the draft
    nbytes = mem.non_expert_bytes + mem.kv_bytes + mem.draft_bytes + 6 * mem.expert_bytes
    cm = speq.compile(
        model,
        speq.CompileOptions(**base, policy="speq", draft_memory="separate", device_memory=nbytes),
    )
    from speq.runtime.policies import Fiddler, OnDemand

    calibrator = cm.engine.calibrator
    prompt = torch.arange(1, 9)
    hw = cm.governed.hardware  # the calibration's copy and host times
    waits = {
        h: calibrator.draftless_waits(p, prompt, 16, hw)
        for h, p in ((False, OnDemand()), (True, Fiddler()))
    }
    io_s, host = calibrator.plain(prompt, 16, hw)
    assert waits[host][0] <= waits[not host][0] and io_s == waits[host][1]
    off = speq.compile(
        model,
        speq.CompileOptions(
            **base, policy="speq", draft_memory="separate", device_memory=nbytes, host_compute=False
        ),
    )
    off_hw = off.governed.hardware
    assert off.engine.calibrator.plain(prompt, 16, off_hw) == (waits[False][1], False)
