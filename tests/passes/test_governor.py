import dataclasses
import math

import pytest
import torch

import speq
from helpers import speq_budget, tiny_config, tiny_model
from speq.cost import (
    K_MAX,
    CacheModel,
    Governor,
    HardwareModel,
    distinct_experts,
    estimate,
    expected_tokens,
    govern,
    switch_to_draft,
)
from speq.runtime.budget import BudgetError

CFG = tiny_config(num_layers=4, num_experts=8, top_k=2)
FLAT = HardwareModel(draft_pass_s=1e-3, verify_s={1: 4e-3, 9: 4e-3}, copy_s=10e-3)


def test_expected_tokens():
    assert expected_tokens([1.0], 4) == 5.0
    assert expected_tokens([0.0], 4) == 1.0
    assert expected_tokens([0.5, 0.5], 3) == pytest.approx(1 + 0.5 + 0.25 + 0.125)


def test_distinct_experts_grows_towards_all_experts():
    assert distinct_experts(CFG, 1) == pytest.approx(2.0)
    assert distinct_experts(CFG, 1000) == pytest.approx(8.0)
    assert distinct_experts(CFG, 2) < distinct_experts(CFG, 3)


def test_verify_time_is_interpolated_and_extrapolated():
    hw = HardwareModel(1e-3, {1: 1.0, 3: 2.0, 5: 4.0}, 0.0)
    assert (
        hw.verify(2) == 1.5 and hw.verify(4) == 3.0 and hw.verify(7) == 6.0 and hw.verify(1) == 1.0
    )


def test_perfect_acceptance_and_free_io_take_the_largest_k():
    p = govern(CFG, FLAT, [1.0], CacheModel(1.0))
    assert p.spec.k == K_MAX and p.k_slo == K_MAX


def test_hopeless_draft_takes_the_smallest_k():
    assert govern(CFG, FLAT, [0.0], CacheModel(0.5)).spec.k == 1


def test_ttft_budget_caps_k():
    p = govern(CFG, FLAT, [1.0], CacheModel(1.0), ttft_budget_s=0.0085)
    assert p.k_slo == 3 and p.spec.k == 3  # (k+1) ms of draft + 4 ms of verify <= 8.5 ms
    assert all(e.cycle_s <= 0.0085 for e in p.estimates if e.k <= p.k_slo)


def test_cycle_model_terms():
    e = estimate(3, CFG, FLAT, [0.5], CacheModel.from_miss_rate(0.25), phase2_start=0.5)
    io = 4 * distinct_experts(CFG, 4) * 0.25 * 10e-3
    assert e.draft_s == pytest.approx(4e-3) and e.io_s == pytest.approx(io)
    assert e.stall_s == pytest.approx(io - 0.5 * 4e-3)
    assert e.cycle_s == pytest.approx(4e-3 + e.stall_s + 4e-3)
    assert e.tpot_ms == pytest.approx(e.cycle_s / expected_tokens([0.5], 3) * 1e3)


def test_phase_two_width_follows_the_link():
    fast = HardwareModel(1e-3, {1: 1e-3}, copy_s=0.25e-3)
    assert govern(CFG, fast, [0.9], CacheModel(0.9)).spec.phase2_width == 4
    assert govern(CFG, FLAT, [0.9], CacheModel(0.9)).spec.phase2_width == 1


def test_runtime_governor_follows_live_acceptance():
    g = Governor(govern(CFG, FLAT, [1.0], CacheModel(1.0)), CFG, alpha=0.5)
    assert g.best_k() == K_MAX
    k = K_MAX
    for _ in range(12):
        k = g.update([False], needs=10, new=5, k=k)
    assert k == 1 and g.acceptance[0] < 0.01 and g.cache.reuse == pytest.approx(0.5, abs=1e-3)


def test_runtime_governor_keeps_the_reuse_of_each_k_it_ran():
    """A cycle's reuse updates the estimate at its own k; the other k's measurements stay."""
    cache = CacheModel(0.5, slots=20).measured_at(2, 0.5).measured_at(16, 1.0)
    g = Governor(govern(CFG, FLAT, [1.0], cache), CFG, alpha=0.5)
    w = cache.window(CFG, 2)
    g.update([True, True], needs=w, new=w, k=2)  # copied every expert: reuse 0
    assert g.cache.measured == ((2, 0.25), (16, 1.0))


def test_a_window_larger_than_the_cache_evicts_what_it_kept():
    """A window that fits keeps ``reuse`` of its experts from the window before; a larger one
    evicts one kept expert for each it copies beyond the cache, and one of twice the cache or
    more copies every expert it needs."""
    cache = CacheModel(reuse=0.8, slots=20)
    w1, w8 = cache.window(CFG, 1), cache.window(CFG, 8)
    assert w1 < 20 < w8 < 40
    assert cache.new_experts(CFG, 1) == pytest.approx(0.2 * w1)
    assert cache.new_experts(CFG, 8) == pytest.approx(w8 - 0.8 * (40 - w8))
    assert cache.new_experts(CFG, 8) / w8 > cache.new_experts(CFG, 1) / w1
    tiny = CacheModel(reuse=0.8, slots=5)
    assert tiny.new_experts(CFG, 8) == pytest.approx(tiny.window(CFG, 8))  # over twice the cache
    assert 1 <= cache.largest_fitting_k(CFG) < 8
    assert cache.window(CFG, cache.largest_fitting_k(CFG) + 1) > 20
    assert CacheModel(0.5, slots=1).largest_fitting_k(CFG) == 0
    assert cache.observed_reuse(needs=15, new=3) == pytest.approx(0.8)  # 12 of 15 were resident
    assert cache.observed_reuse(needs=30, new=22) == pytest.approx(0.8)  # 8 of the 10 kept
    assert cache.observed_reuse(needs=45, new=14) == 0.8  # twice the cache: says nothing, kept
    assert CacheModel.from_miss_rate(0.25).new_experts(CFG, 3) == pytest.approx(
        0.25 * cache.window(CFG, 3)
    )
    with pytest.raises(ValueError, match="reuse"):
        CacheModel(1.5)


def test_routing_locality_is_a_smaller_pool():
    """Text that reuses experts needs fewer distinct ones per window; observed_pool inverts
    distinct_experts."""
    assert distinct_experts(CFG, 9, pool=5.0) < distinct_experts(CFG, 9)
    assert distinct_experts(CFG, 1, pool=5.0) == pytest.approx(2.0)  # one token: its top_k
    for pool in (2.5, 5.0, 7.5):
        d = distinct_experts(CFG, 4, pool)
        assert CacheModel.observed_pool(CFG, d, 4) == pytest.approx(pool, rel=1e-6)
    assert CacheModel.observed_pool(CFG, 8.0, 4) == 8.0  # more than uniform: all experts
    local = CacheModel(0.5, pool=5.0)
    assert local.window(CFG, 8) == pytest.approx(4 * distinct_experts(CFG, 9, 5.0))


def test_compile_without_k_runs_the_governor_and_stays_lossless():
    """A tight budget over a slow link, misses copied: speculation amortizes the copies, so the
    draft stays."""
    model = tiny_model(torch.float64, num_layers=3)
    prompt = torch.tensor([[5, 17, 3, 42, 8, 1]])
    m = speq.compile(model, speq.CompileOptions(policy="speq", draft_memory="separate", k=1)).memory
    budget = m.non_expert_bytes + m.kv_bytes + m.draft_bytes + 4 * m.expert_bytes
    opts = speq.CompileOptions(
        policy="speq",
        draft_memory="separate",
        backend="sim",
        device_memory=budget,
        link_gbps=0.01,
        host_compute=False,
    )
    cm = speq.compile(model, opts)
    assert cm.governed.use_draft and cm.draft_bytes == m.draft_bytes
    assert cm.graphs.names()[-1] == "governor"
    assert "k* = " in str(cm.graphs)
    assert 1 <= cm.governed.spec.k <= cm.governed.k_slo <= K_MAX
    assert torch.equal(cm.generate(prompt, 20), speq.compile(model).generate(prompt, 20))
    assert all(0 <= k <= K_MAX for k in cm.metrics["k_per_cycle"])
    # the first generate recalibrates on its own prompt, once
    recal = "governor (recalibrated on the first prompt)"
    assert cm.graphs.names()[-1] == recal
    cm.generate(prompt, 4)
    assert cm.graphs.names().count(recal) == 1
    assert not math.isnan(cm.governed.chosen.tpot_ms)


def test_the_governor_splits_memory_between_draft_and_cache():
    """Speculation must beat giving the draft's memory to the cache, or the draft goes."""
    good = govern(CFG, FLAT, [1.0], CacheModel(0.9), plain_io_s=0.0)
    assert good.use_draft and good.plain.tpot_ms == pytest.approx(4.0)
    bad = govern(CFG, FLAT, [0.0], CacheModel(0.0), plain_io_s=5e-3)
    assert not bad.use_draft and bad.plain.tpot_ms == pytest.approx(4.0 + 5.0)
    assert "NO DRAFT" in bad.describe() and "NO DRAFT" not in good.describe()
    assert govern(CFG, FLAT, [0.0], CacheModel(0.0)).use_draft  # no alternative given


def test_compile_drops_the_draft_when_its_memory_serves_better_as_cache():
    """A budget where the draft's bytes would make room for every expert, over a slow link."""
    model = tiny_model(torch.float64, num_layers=3)
    prompt = torch.tensor([[5, 17, 3, 42, 8, 1]])
    probe = speq.compile(
        model, speq.CompileOptions(policy="speq", draft_memory="separate", k=1)
    ).memory
    total = 3 * model.config.num_experts
    budget = probe.non_expert_bytes + probe.kv_bytes + total * probe.expert_bytes
    assert budget - probe.draft_bytes < budget  # with the draft, not every expert fits
    opts = speq.CompileOptions(
        policy="speq", draft_memory="separate", device_memory=budget, backend="sim", link_gbps=0.01
    )
    cm = speq.compile(model, opts)
    assert not cm.governed.use_draft and cm.draft_bytes == 0 and cm.memory.slots == total
    assert "NO DRAFT" in str(cm.graphs)
    assert torch.equal(cm.generate(prompt, 12), speq.compile(model).generate(prompt, 12))
    assert cm.metrics.experts_moved == 0 and cm.metrics["acceptance_rate"] is None
    assert cm.metrics["switched_to_draft_after"] is None  # nothing is copied: no reason to


def spy_probes(monkeypatch) -> list[tuple[int, float, float]]:
    """Every calibration probe from now on, as (k, experts needed per cycle, of which copied)."""
    from speq.runtime.calibrate import Calibrator

    probes = []
    probe = Calibrator.probe

    def spy(self, prompt, k, n):
        out = probe(self, prompt, k, n)
        probes.append((k, out[1], out[2]))
        return out

    monkeypatch.setattr(Calibrator, "probe", spy)
    return probes


def test_calibration_probes_again_where_the_first_window_overflows(monkeypatch):
    """The k = 8 probe's windows overflow a small cache, which hides the reuse between windows:
    the calibration probes again at the largest k whose window fits, and takes reuse from it."""
    model = tiny_model(torch.float64, num_layers=3, num_experts=8, top_k=1)
    budget = speq_budget(model, 7)
    probes = spy_probes(monkeypatch)
    opts = speq.CompileOptions(policy="speq", backend="sim", device_memory=budget, link_gbps=0.01)
    cache = speq.compile(model, opts).governed.cache
    (k1, needs1, _), (k2, needs2, new2) = probes
    assert k1 == 8 and cache.slots == 7 and cache.kept(needs1) < needs1 / 2
    assert k2 == cache.largest_fitting_k(model.config) >= 1
    assert needs2 <= cache.slots and 0 < cache.reuse == cache.observed_reuse(needs2, new2)


def test_calibration_takes_the_reuse_from_a_probe_at_the_governed_k(monkeypatch):
    """A window's reuse depends on its length: the k = 8 probe's reuse misjudges a shorter
    window. When the governor picks another k, the calibration probes again at that k and
    governs with each probed k's own reuse, until the k it picks was probed."""
    from speq.runtime.calibrate import REPROBES

    model = tiny_model(torch.float64, num_layers=3)
    probes = spy_probes(monkeypatch)
    budget = speq_budget(model, 10)
    opts = speq.CompileOptions(policy="speq", backend="sim", device_memory=budget, link_gbps=1.0)
    governed = speq.compile(model, opts).governed
    (k1, needs1, _), *later = probes
    assert k1 == 8 and governed.cache.kept(needs1) >= needs1 / 2  # no overflow: no refit probe
    assert 1 <= len(later) <= REPROBES and len({k for k, _, _ in probes}) == len(probes)
    measured = dict(governed.cache.measured)
    assert list(measured) == sorted(k for k, _, _ in probes)
    assert all(measured[k] == governed.cache.observed_reuse(n, new) for k, n, new in probes)
    assert len(set(measured.values())) > 1  # the window's length matters here
    assert governed.spec.k in measured  # the pick is judged by the reuse measured at its k


def test_each_k_is_judged_by_the_reuse_measured_at_its_window_length():
    """Reuse measured at k = 2 and k = 16 (as where a calibration's picks alternated between
    them, each judged by the other's reuse): each k's copies use its own measurement, the k's
    between them a linear interpolation, the k's beyond them the nearest measurement."""
    from speq.cost import CacheModel

    cfg = tiny_model(torch.float64, num_layers=3).config
    cache = CacheModel(0.5, slots=6).measured_at(16, 1.0).measured_at(2, 0.64)
    assert cache.measured == ((2, 0.64), (16, 1.0)) and cache.reuse == 0.64
    assert [cache.reuse_for(k) for k in (1, 2, 9, 16)] == pytest.approx([0.64, 0.64, 0.82, 1.0])
    for k in (1, 2, 9, 16):
        w = cache.window(cfg, k)
        assert cache.new_experts(cfg, k) == w - cache.reuse_for(k) * cache.kept(w)
    assert cache.measured_at(2, 0.5).measured == ((2, 0.5), (16, 1.0))
    with pytest.raises(ValueError, match="ascending"):
        CacheModel(0.5, measured=((4, 0.5), (2, 0.5)))


def test_wall_clock_calibration_waits_for_the_device_around_every_timed_pass(monkeypatch):
    """On CUDA a pass returns once its kernels are queued (the draft has no host sync): each
    timed pass is bracketed by a device synchronisation, or the governor would see enqueueing
    time and think the draft almost free. (Under shared draft memory the draft pass is also
    timed beside a small cache, a call nested in the first: its syncs count once, there.)"""
    from speq.runtime.backends import Backend
    from speq.runtime.calibrate import PASS_TOKENS, Calibrator

    syncs, timed = [], []
    monkeypatch.setattr(Backend, "synchronize", lambda self: syncs.append(self.name))
    time_passes = Calibrator.time_passes

    def spy(self, prompt, tokens=PASS_TOKENS, repeats=3, slots=None):
        before, nested = len(syncs), len(timed)
        out = time_passes(self, prompt, tokens, repeats, slots)
        inner = sum(n for n, _ in timed[nested:])
        timed.append((len(syncs) - before - inner, (len(tokens) + 1) * repeats))
        return out

    monkeypatch.setattr(Calibrator, "time_passes", spy)
    model = tiny_model(torch.float64, num_layers=2)
    opts = speq.CompileOptions(policy="speq", device_memory=speq_budget(model, 4))
    speq.compile(model, opts)
    assert len(timed) == 2 and all(n == 2 * passes for n, passes in timed), timed
    assert set(syncs) == {"cpu"}


@pytest.mark.parametrize("backend", ["sim", "cpu"])
def test_a_run_that_copies_more_than_calibrated_switches_to_the_draft(monkeypatch, backend):
    """The split is chosen on one calibration prompt. Here the calibration is made to believe
    that one-token decoding copies nothing (as a prompt that reuses few experts would): the
    draft is dropped. The run then copies experts at every step, so after the warm-up and one
    observation window the governor brings the draft back over the link and speculates, with
    the output unchanged. The next run starts from the calibrated split again."""
    from speq.cost import Calibration, Estimate
    from speq.runtime.switch import SWITCH_WARMUP, SWITCH_WINDOW

    model = tiny_model(torch.float64, num_layers=3)
    prompt = torch.tensor([[5, 17, 3, 42, 8, 1]])
    expected = speq.compile(model).generate(prompt, 24)
    budget = speq_budget(model, 4)
    govern = Calibration.govern

    def misjudged(self, cfg):
        policy = govern(self, cfg)
        free = Estimate(0, 1.0, 1e-6, 0.0, 0.0, 0.0, 1e-6)  # predicted: no copies, no time
        return dataclasses.replace(policy, plain=free)

    monkeypatch.setattr(Calibration, "govern", misjudged)
    opts = speq.CompileOptions(
        policy="speq",
        draft_memory="separate",
        device_memory=budget,
        backend=backend,
        link_gbps=0.01 if backend == "sim" else 0.002,
        host_compute=False,  # misses are copied (on the host, this slow link would copy none)
    )
    cm = speq.compile(model, opts)
    assert not cm.governed.use_draft and cm.draft_bytes == 0
    no_draft_slots = cm.memory.slots
    for _ in range(2):
        assert torch.equal(cm.generate(prompt, 24), expected)
        met = cm.metrics
        assert met["switched_to_draft_after"] == SWITCH_WARMUP + SWITCH_WINDOW
        assert met.cache_slots < no_draft_slots and cm.draft_bytes > 0
        assert met["cycles"] >= 1 and met.bytes_moved >= cm.draft_bytes


def test_switching_to_the_draft_pays_for_itself_or_does_not_happen():
    """The switch re-solves k for the pool the text was routed over, and happens only when the
    time it is predicted to save over the remaining tokens exceeds its cost."""
    policy = govern(CFG, FLAT, [0.9] * 8, CacheModel(0.5, slots=6), plain_io_s=0.0)
    assert not policy.use_draft  # as calibrated: one-token decoding copies nothing
    copies = 30e-3  # observed: 30 ms of copies per token
    narrow = switch_to_draft(policy, CFG, copies, 2.5, remaining=20, switch_s=0.05)
    assert narrow is not None and narrow.use_draft and narrow.cache.pool == 2.5
    assert (
        narrow.spec.k
        == max(
            (e for e in narrow.estimates if e.k <= policy.k_slo),
            key=lambda e: e.tokens_per_cycle / e.cycle_s,
        ).k
    )
    saved_s = (narrow.plain.tpot_ms - narrow.chosen.tpot_ms) / 1e3 * 20
    assert switch_to_draft(policy, CFG, copies, 2.5, 20, switch_s=saved_s * 1.01) is None
    assert switch_to_draft(policy, CFG, copies, 2.5, 20, switch_s=saved_s * 0.99) is not None
    assert switch_to_draft(policy, CFG, 0.0, 2.5, 20, switch_s=0.0) is None  # nothing to save


def test_the_governor_calibrates_on_a_prompt_that_is_not_measured():
    """`calibrate` takes other text than the measured prompt; generate then does not
    recalibrate on its own prompt, and reports how long the calibration took."""
    model = tiny_model(torch.float64, num_layers=3)
    opts = speq.CompileOptions(policy="speq", backend="sim", device_memory=speq_budget(model, 4))
    cm = speq.compile(model, opts)
    cm.calibrate(torch.tensor([[7, 8, 9, 10, 11, 12, 13]]))
    names = cm.graphs.names()
    assert names[-1] == "governor (recalibrated on a calibration prompt)"
    measured = torch.tensor([[5, 17, 3, 42, 8, 1]])
    assert torch.equal(cm.generate(measured, 8), speq.compile(model).generate(measured, 8))
    assert cm.graphs.names() == names  # no recalibration on the measured prompt
    assert cm.metrics["calibration_s"] > 0
    ondemand = speq.compile(model, speq.CompileOptions(policy="ondemand"))
    ondemand.calibrate(measured)  # no governor: nothing to calibrate
    ondemand.generate(measured, 2)
    assert ondemand.metrics["calibration_s"] is None


@pytest.mark.parametrize("do_sample", [False, True])
def test_perfect_prediction_after_a_mid_run_switch_records_the_windows_from_there(
    monkeypatch, do_sample
):
    """A run that switches to the draft under ``predictor="oracle"`` records the rest of the
    run's verification windows at the switch (from the sampling generator's state there): its
    ELB then holds exactly what verification needs."""
    from speq.cost import Calibration, Estimate

    govern = Calibration.govern

    def misjudged(self, cfg):
        free = Estimate(0, 1.0, 1e-6, 0.0, 0.0, 0.0, 1e-6)
        return dataclasses.replace(govern(self, cfg), plain=free)

    monkeypatch.setattr(Calibration, "govern", misjudged)
    model = tiny_model(torch.float64, num_layers=3)
    prompt = torch.tensor([[5, 17, 3, 42, 8, 1]])
    opts = speq.CompileOptions(
        policy="speq",
        draft_memory="separate",
        predictor="oracle",
        device_memory=speq_budget(model, 4),
        backend="sim",
        link_gbps=0.01,
        host_compute=False,  # misses copied: the slow link makes the run switch
    )
    sampling = dict(do_sample=True, temperature=0.8, seed=3) if do_sample else {}
    out = speq.compile(model, opts).generate(prompt, 24, **sampling)
    cm = speq.compile(model, opts)
    assert torch.equal(cm.generate(prompt, 24, **sampling), out)  # reproducible
    m = cm.metrics
    assert m["switched_to_draft_after"] is not None
    assert m["elb_precision"] == m["elb_recall"] == 1.0
    if not do_sample:
        assert torch.equal(out, speq.compile(model).generate(prompt, 24))


def test_host_compute_caps_what_a_miss_costs():
    """With the host faster than a copy, what does not land by verification is computed there."""
    host = dataclasses.replace(FLAT, host_s=2e-3)
    assert host.miss_s == 2e-3 and FLAT.miss_s == FLAT.copy_s
    cache = CacheModel.from_miss_rate(0.25)
    copied = estimate(3, CFG, FLAT, [0.5], cache, phase2_start=0.5)
    hosted = estimate(3, CFG, host, [0.5], cache, phase2_start=0.5)
    landed = 0.5 * 4e-3 / 10e-3  # experts the link lands during phase II and III
    assert hosted.stall_s == pytest.approx((copied.io_s / 10e-3 - landed) * 2e-3)
    assert hosted.stall_s < copied.stall_s
    slow_host = dataclasses.replace(FLAT, host_s=1.0)  # slower than a copy: never used
    assert estimate(3, CFG, slow_host, [0.5], cache, 0.5) == copied


def test_a_governed_speq_whose_draft_does_not_fit_runs_without_it():
    """A budget below the draft plus the smallest cache: the governor's only split is no draft
    (its misses computed on the host where faster), not an error; a fixed k still errs."""
    model = tiny_model(torch.float64, num_layers=3)
    prompt = torch.tensor([[5, 17, 3, 42, 8, 1]])
    m = speq.compile(model, speq.CompileOptions(policy="speq", draft_memory="separate", k=1)).memory
    budget = m.non_expert_bytes + m.kv_bytes + 3 * m.expert_bytes
    assert budget < m.non_expert_bytes + m.kv_bytes + m.draft_bytes + 2 * m.expert_bytes
    cm = speq.compile(
        model,
        speq.CompileOptions(
            policy="speq", draft_memory="separate", device_memory=budget, backend="sim"
        ),
    )
    assert cm.governed is None and cm.draft_bytes == 0 and cm.memory.slots > 0
    assert torch.equal(cm.generate(prompt, 12), speq.compile(model).generate(prompt, 12))
    assert cm.metrics["cycles"] is None and cm.metrics["draft_bytes"] is None
    with pytest.raises(BudgetError, match="quantized draft experts"):
        speq.compile(
            model,
            speq.CompileOptions(policy="speq", draft_memory="separate", k=2, device_memory=budget),
        )
