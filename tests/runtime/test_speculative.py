"""Speculative quantized decoding: lossless greedy output, distribution-preserving sampling,
metrics, and budget errors."""

import dataclasses

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
from speq.runtime.speculative import SpecPolicy, greedy_accept, speculative_accept

PROMPT = torch.tensor([[5, 17, 3, 42, 8, 1]])
N = 14

CONFIGS = {
    "top1": VARIANTS["top1"],
    "shared_expert": dict(shared_expert_intermediate_size=16),
    "dense_first": VARIANTS["dense_first_topk_softmax"],
    "top4_of_6": dict(num_experts=6, top_k=4),
    "qwen_like": VARIANTS["qwen_gated_headnorm"],
    "deepseek_v3_like": VARIANTS["deepseek_v3_sigmoid"],
    "sinks_window": VARIANTS["sinks_sliding_window"],
    "oai_experts": VARIANTS["oai_expert_biases"],
}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def case(request):
    model = tiny_model(torch.float64, **CONFIGS[request.param])
    return model, speq.compile(model).generate(PROMPT, N)


@pytest.mark.parametrize("backend", ["cpu", "sim"])
def test_greedy_is_lossless_for_every_k(case, backend):
    model, expected = case
    budget = speq_budget(model, model.config.top_k + 2)
    for k in (*range(1, 9), 16):  # 16: a window longer than the output (clipped to it)
        opts = speq.CompileOptions(
            policy="speq", k=k, backend=backend, device_memory=budget, link_gbps=8.0
        )
        cm = speq.compile(model, opts)
        out = cm.generate(PROMPT, N)
        assert torch.equal(out, expected), f"k={k}"
        m = cm.metrics
        assert m.tokens == N and 0.0 <= m["acceptance_rate"] <= 1.0
        assert max(m["k_per_cycle"]) <= k


def test_int8_draft_is_lossless_too(case):
    model, expected = case
    cm = speq.compile(model, speq.CompileOptions(policy="speq", k=3, draft_bits=8, backend="sim"))
    assert torch.equal(cm.generate(PROMPT, N), expected)


def test_exact_draft_is_always_accepted_and_predicts_every_expert():
    """INT8 with one scale per weight represents the target almost exactly: the draft then
    proposes the target's own tokens and routes like it."""
    model = tiny_model(torch.float64, num_layers=3)
    opts = speq.CompileOptions(policy="speq", k=4, draft_bits=8, draft_group_size=1, backend="sim")
    cm = speq.compile(model, opts)
    cm.generate(PROMPT, 20)
    m = cm.metrics
    assert m["acceptance_rate"] == 1.0
    assert m["elb_recall"] == 1.0 and m["elb_precision"] == 1.0
    assert m["tokens_per_cycle"] == pytest.approx(20 / m["cycles"])
    assert set(m["elb_recall_by_layer"]) == {0, 1, 2}


def test_speculation_metrics_are_consistent():
    model = tiny_model(torch.float64, num_layers=3)
    cm = speq.compile(
        model, speq.CompileOptions(policy="speq", draft_memory="separate", k=4, backend="sim")
    )
    cm.generate(PROMPT, 24)
    m = cm.metrics
    assert sum(m["k_per_cycle"]) >= m["cycles"]
    drafted = sum(m["k_per_cycle"])
    accepted = round(m["acceptance_rate"] * drafted)
    assert accepted + m["cycles"] == 24  # every cycle commits its accepted drafts plus one
    assert len(m["acceptance_by_position"]) <= 4
    assert m["draft_bytes"] > 0 and m["draft_ms"] > 0 and m["verify_ms"] > 0
    assert 0 < m["elb_recall"] <= 1 and 0 < m["elb_precision"] <= 1


def test_greedy_accept_rule():
    logits = torch.eye(5)[[2, 4, 1, 3]] * 3.0  # the target's argmax at each position: 2, 4, 1, 3
    assert greedy_accept([2, 4, 1], logits) == (3, 3)
    assert greedy_accept([2, 0, 1], logits) == (1, 4)
    assert greedy_accept([0, 4, 1], logits) == (0, 2)


def test_speculative_accept_keeps_the_target_distribution():
    """Draws through the accept/resample rule follow p, not the draft's q (which the test would
    reject: it has power)."""
    gen = torch.Generator().manual_seed(0)
    p = torch.tensor([[0.05, 0.4, 0.1, 0.3, 0.15], [0.2, 0.2, 0.2, 0.2, 0.2]], dtype=torch.float64)
    q = torch.tensor([0.3, 0.1, 0.3, 0.2, 0.1], dtype=torch.float64)
    counts, draft_counts = torch.zeros(5), torch.zeros(5)
    for _ in range(6000):
        d = int(torch.multinomial(q, 1, generator=gen))
        n, tok = speculative_accept([d], [q], p, gen)
        counts[d if n == 1 else tok] += 1
        draft_counts[d] += 1
    assert chi_square_p(counts, p[0]) > 1e-3
    assert chi_square_p(draft_counts, p[0]) < 1e-6


def test_first_sampled_token_follows_the_targets_softmax():
    """End to end on a 7-token vocabulary: the first token of speculative sampling, over many
    seeds, is distributed as the target's softmax at the prompt."""
    model, prompt, probs = sampling_case()
    assert chi_square_p(first_sampled_counts(model, prompt, 7), probs) > 1e-3


def test_sampling_is_reproducible_per_seed():
    model = tiny_model(torch.float64)
    cm = speq.compile(model, speq.CompileOptions(policy="speq", k=3, backend="sim"))
    a = cm.generate(PROMPT, 12, do_sample=True, seed=5)
    assert torch.equal(a, cm.generate(PROMPT, 12, do_sample=True, seed=5))


def test_draft_that_does_not_fit_names_the_sizes():
    """At a fixed k (a governed speq runs without the draft instead: test_governor)."""
    model = tiny_model(torch.float64)
    budget = speq_budget(model, model.config.top_k) - 1
    with pytest.raises(ValueError, match=r"quantized draft experts [0-9,]+ bytes") as e:
        speq.compile(
            model,
            speq.CompileOptions(policy="speq", draft_memory="separate", k=2, device_memory=budget),
        )
    assert "below the minimum" in str(e.value)


def test_spec_policy_phases():
    p = SpecPolicy(k=4, phase2_start=0.2, phase3_start=0.6, phase2_width=1)
    assert [p.phase(s, 4) for s in range(5)] == [1, 2, 2, 3, 3]
    late = SpecPolicy(k=1, phase2_start=0.6, phase3_start=1.0)
    assert [late.phase(s, 1) for s in range(2)] == [1, 3]  # the last pass is always phase III
    with pytest.raises(ValueError, match="phase boundaries"):
        SpecPolicy(phase2_start=0.8, phase3_start=0.5)
    with pytest.raises(ValueError, match="k must be"):
        SpecPolicy(k=0)


def test_perfect_prediction_holds_exactly_what_each_window_verifies():
    """``predictor="oracle"`` records the run's verification windows in a first speculative pass
    (rejected drafts included): each window's experts equal the reference model's routing of
    that window's tokens; in the measured run the ELB holds exactly them, so with a draft whose
    acceptance is well below 1 its precision and recall are both 1.0, on sim and cpu, and the
    output is still the target's."""
    from speq.models.functional import route
    from speq.runtime.sampling import SamplingParams
    from speq.runtime.speculative import SpecPolicy, Speq

    model = tiny_model(torch.float64, **VARIANTS["top1"])
    cfg = model.config
    expected = speq.compile(model).generate(PROMPT, N)
    opts = dict(
        policy="speq",
        draft_memory="separate",
        k=3,
        predictor="oracle",
        device_memory=speq_budget(model, 3),
    )
    cm = speq.compile(model, speq.CompileOptions(backend="sim", **opts))
    windows = cm.engine.record_windows(Speq(SpecPolicy(k=3)), PROMPT[0], N, SamplingParams())
    rejected = 0
    for w in windows:
        truth = {}

        def hook(layer, truth=truth):
            def record(module, args):
                ids, _ = route(args[0][0] @ module.router.t(), cfg.top_k, cfg.router_mode)
                for pos, row in enumerate(ids.tolist()):
                    truth[(pos, layer)] = tuple(row)

            return record

        blocks = [(i, b.mlp) for i, b in enumerate(model.layers) if cfg.is_moe_layer(i)]
        handles = [b.register_forward_pre_hook(hook(i)) for i, b in blocks]
        window = torch.tensor([[*expected[0, : w.position].tolist(), *w.tokens]])
        with torch.no_grad():
            model(window)
        for h in handles:
            h.remove()
        assert w.experts == {
            (pos - w.position, layer): row
            for (pos, layer), row in truth.items()
            if pos >= w.position
        }
        rejected += w.tokens[1:] != tuple(
            expected[0, w.position + 1 : w.position + 1 + w.k].tolist()
        )
    assert rejected > 0  # the windows hold drafts the target rejected
    for backend in ("sim", "cpu"):
        cm = speq.compile(model, speq.CompileOptions(backend=backend, link_gbps=0.05, **opts))
        assert torch.equal(cm.generate(PROMPT, N), expected)
        m = cm.metrics
        assert m["acceptance_rate"] < 0.8
        assert m["elb_precision"] == m["elb_recall"] == 1.0


def test_verification_counts_split_hits_in_flight_copies_and_demand_misses():
    model = tiny_model(torch.float64, num_layers=3)
    opts = speq.CompileOptions(
        policy="speq", k=4, device_memory=speq_budget(model, 4), link_gbps=0.05, backend="sim"
    )
    cm = speq.compile(model, opts)
    cm.generate(PROMPT, 16)
    m = cm.metrics
    hit, covered = m["verify_hit_rate"], m["verify_covered_rate"]
    assert 0 <= hit <= covered <= 1 and hit == pytest.approx(1 - m["verify_miss_rate"])
    assert 0 < m["verify_new_rate"] <= 1
    assert m.covered_rate >= m.hit_rate


def test_a_window_larger_than_the_cache_streams_through_it_prefetched(monkeypatch):
    """The cache holds any one layer's experts but not a window's: past each window's first
    layer, verification never needs an expert whose copy was not already issued, as each
    layer's experts, once used, make room for the next layers' predicted ones while
    verification runs (an exact draft: every expert predicted). At the first layer an expert
    can still miss: the phase II copies chosen by confidence may hold the slots."""
    from speq.runtime.speculative import Speq
    from speq.runtime.store import ExpertKey

    model = tiny_model(torch.float64, num_layers=3)
    expected = speq.compile(model).generate(PROMPT, 20)
    exact = speq.CompileOptions(
        policy="speq", draft_memory="separate", k=8, draft_bits=8, draft_group_size=1
    )
    m = speq.compile(model, exact).memory
    slots = model.config.num_experts
    budget = m.non_expert_bytes + m.kv_bytes + m.draft_bytes + slots * m.expert_bytes
    opts = dataclasses.replace(
        exact, device_memory=budget, link_gbps=0.05, backend="sim", host_compute=False
    )  # misses copied: prefetching streams every predicted expert through the cache
    cm = speq.compile(model, opts)
    uncovered = []
    on_need = Speq.on_need

    def spy(self, rt, layer, experts):
        if self.verifying:
            uncovered.extend(layer for e in experts if ExpertKey(layer, e) not in rt.cache)
        on_need(self, rt, layer, experts)

    monkeypatch.setattr(Speq, "on_need", spy)
    assert torch.equal(cm.generate(PROMPT, 20), expected)
    m = cm.metrics
    assert m["elb_recall"] == 1.0
    assert m["verify_needs"] / m["cycles"] > m.cache_slots  # windows overflow the cache
    assert set(uncovered) <= {0}
    assert m["verify_covered_rate"] == 1 - len(uncovered) / m["verify_needs"]


def test_a_layer_larger_than_the_cache_computes_what_is_resident_first():
    """A layer that needs more experts than its slots runs in chunks; the experts already
    resident form the first chunk, so none of them is evicted to make room for another."""
    from speq.frontend.reference import from_reference
    from speq.runtime.cache import ExpertCache
    from speq.runtime.link import VirtualLink
    from speq.runtime.offload import OffloadPolicy, OffloadRuntime
    from speq.runtime.store import ExpertKey, ExpertStore

    model = tiny_model(torch.float64, num_layers=1, num_experts=5)
    spec, params = from_reference(model, torch.float64)
    store = ExpertStore(spec, params)
    cache = ExpertCache(2, store.layers, 5)
    rt = OffloadRuntime(store, cache, VirtualLink(1.0, 0.0), None, OffloadPolicy())
    layer = store.layers[0]
    rt.prefetch(layer, [3, 4])
    rt.link.wait([cache.get(ExpertKey(layer, e)).copy for e in (3, 4)])
    residency = rt.need(layer, torch.tensor([[0, 3], [4, 1]]))
    assert residency.chunks == [[3, 4], [0, 1]]
    assert rt.counters.hits == 2 and rt.counters.demand_fetches == 0


def test_token_hit_rate_counts_every_routing_verification_serves():
    """A copy at verification serves every token of the window routed to its expert: the token
    hit rate charges it once against all the routings the verification passes made (counted
    here from the routers' own outputs), and stalls per token charge it to the new tokens."""
    from speq.runtime.offload import OffloadRuntime

    model = tiny_model(torch.float64, num_layers=3)
    opts = speq.CompileOptions(
        policy="speq",
        k=6,
        device_memory=speq_budget(model, 4),
        link_gbps=0.05,
        backend="sim",
        host_compute=False,  # misses copied: the copies the compute waits for are the subject
    )
    cm = speq.compile(model, opts)
    seen = []
    need = OffloadRuntime.need

    def spy(self, layer, ids):
        seen.append(ids.numel())
        return need(self, layer, ids)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(OffloadRuntime, "need", spy)
        cm.generate(PROMPT, N)
    m = cm.metrics
    prefill_routings = (PROMPT.shape[1] - 1) * 3 * model.config.top_k
    routings = sum(seen) - prefill_routings
    stalls = m.needs - m.hits - m["host_expert_runs"]
    assert stalls > 0 and routings > m.needs  # windows share experts across their tokens
    assert m.token_hit_rate == pytest.approx(1 - stalls / routings)
    assert m.stalls_per_token == pytest.approx(stalls / N)
    assert m.token_hit_rate > m.hit_rate


def test_router_choices_read_at_the_end_of_their_draft_pass_fill_the_same_elb(monkeypatch):
    """On a device the draft's router choices reach the host by non-blocking copies and are
    read once their copy is done, at the latest when their draft pass ends. Read that late, the
    ELB holds the same rows and the output is unchanged."""
    from speq.runtime import speculative

    model = tiny_model(torch.float64, num_layers=3)
    expected = speq.compile(model).generate(PROMPT, N)
    opts = speq.CompileOptions(
        policy="speq",
        draft_memory="separate",
        k=4,
        device_memory=speq_budget(model, 4),
        link_gbps=0.05,
        backend="sim",
    )
    queued, rows = [], []
    schedule, record = speculative.Speq.schedule, speculative.ExpertLookaheadBuffer.record

    def spy_schedule(self, r):
        queued.append(len(self.pending))  # rows still waiting behind this one
        schedule(self, r)

    def spy_record(self, s, layer, ids, weights):
        rows.append((s, layer, tuple(ids), tuple(weights)))
        record(self, s, layer, ids, weights)

    monkeypatch.setattr(speculative.Speq, "schedule", spy_schedule)
    monkeypatch.setattr(speculative.ExpertLookaheadBuffer, "record", spy_record)
    at_once = speq.compile(model, opts)
    assert torch.equal(at_once.generate(PROMPT, N), expected)
    assert max(queued) == 0  # host tensors: each row is read as it arrives
    rows_at_once, m_at_once = list(rows), at_once.metrics
    queued.clear(), rows.clear()

    monkeypatch.setattr(speculative.PendingRoute, "ready", lambda self: False)  # copies in flight
    late = speq.compile(model, opts)
    assert torch.equal(late.generate(PROMPT, N), expected)
    assert max(queued) == 3 - 1  # a pass's rows, read together when it ends
    assert rows == rows_at_once
    assert late.metrics["elb_recall"] == m_at_once["elb_recall"]
    assert late.metrics["elb_precision"] == m_at_once["elb_precision"]
