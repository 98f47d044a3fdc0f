"""Shared draft memory (``CompileOptions.draft_memory="shared"``): each expert is held once, at
full precision while cached and as INT4 otherwise. Demotion reproduces the draft's INT4 codes
bit for bit, every expert is readable at one precision at every moment, the budget holds more
experts at full precision than a separate draft, and decoding stays lossless."""

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
from speq.kernels import quantize_experts
from speq.kernels.fused_moe import MoEDims, fused_moe_torch
from speq.kernels.moe_cpu import grouped_by_source
from speq.runtime.budget import Budget, BudgetError, SharedDraft, plan_memory
from speq.runtime.draft import DraftWeights
from speq.runtime.draft_slots import fused_moe_by_precision
from speq.runtime.store import ExpertKey

PROMPT = torch.tensor([[5, 17, 3, 42, 8, 1]])
N = 12


def _shared(model, slots: int, **extra) -> speq.CompiledModel:
    opts = dict(policy="speq", device_memory=speq_budget(model, slots), draft_memory="shared")
    return speq.compile(model, speq.CompileOptions(**{**opts, **extra}))


@pytest.mark.parametrize(
    "shape",
    [
        dict(hidden_size=64, expert_intermediate_size=32),  # torch's CPU INT4 layout
        dict(hidden_size=40, expert_intermediate_size=24),  # N not a multiple of 16: codes
    ],
)
def test_a_demoted_expert_holds_the_drafts_int4_bytes(shape):
    """Quantizing a cached expert's full-precision weights into an INT4 slot gives exactly the
    bytes the draft's INT4 copy of that expert holds, in the layout the draft reads."""
    model = tiny_model(torch.float64, num_layers=2, num_experts=4, **shape)
    cm = _shared(model, 2, k=2)
    draft = cm.engine.draft
    assert isinstance(draft, DraftWeights) and draft.shared
    store = cm.engine.store
    slots = draft.slots(3, torch.device("cpu"))
    slots.reset(set(store.keys()))  # every expert at full precision: every slot free
    for key in (ExpertKey(store.layers[0], 1), ExpertKey(store.layers[-1], 3)):
        slots.demote(key, store.w13[key.layer][key.expert], store.w2[key.layer][key.expert])
        s = slots.slot[key]
        for got, want in zip((slots.w13, slots.w2), draft.host[key.layer].values()):
            assert type(got) is type(want)
            assert torch.equal(got.data[s], want.data[key.expert])
            assert torch.equal(got.scales[s], want.scales[key.expert])
        every = store.keys()
        slots.check({k for k in every if k != key} - set(slots.slot))


@pytest.mark.parametrize("variant", ["top2_gqa", "top1", "mha_shared", "deepseek_v2_mla"])
@pytest.mark.parametrize("backend", ["cpu", "sim"])
def test_shared_draft_memory_is_lossless(variant, backend):
    """Greedy output identical to all-resident for fixed k, the governor, and host compute."""
    model = tiny_model(torch.float64, **VARIANTS[variant])
    expected = speq.compile(model).generate(PROMPT, N)
    slots = model.config.top_k + 1
    for extra in (dict(k=1), dict(k=4, host_compute=False), dict()):
        cm = _shared(model, slots, backend=backend, link_gbps=0.05, **extra)
        assert torch.equal(cm.generate(PROMPT, N), expected), extra
        m = cm.metrics
        assert m["full_precision_slots"] <= m.cache_slots
        if cm.engine.draft.on_device:  # the cache starts full: each copy evicts and demotes
            assert m["demotions"] == m.experts_moved, extra


def test_every_expert_stays_readable_at_one_precision():
    """After every token of a run that turns its cache over (a slow link, prefetching and
    demand copies), each expert is in an INT4 slot or loaded at full precision, and the
    cache's own tables hold."""
    model = tiny_model(torch.float64, num_layers=3, num_experts=8, top_k=2)
    cm = _shared(model, 3, k=3, backend="sim", link_gbps=0.02, host_compute=False)
    engine = cm.engine
    from speq.runtime.policies import get_policy

    session = engine.session(get_policy("speq").for_run(engine, PROMPT[0], N, None))
    rt = session.runtime

    def check(_token: int) -> None:
        rt.settle()
        rt.cache.check_invariants()
        loaded = {k for k, e in rt.cache.entries.items() if not e.loading}
        rt.int4.check(loaded)

    from speq.runtime.sampling import SamplingParams

    engine.decode(PROMPT[0], N, SamplingParams(), session, check)
    m = session.finish("speq", PROMPT.shape[1], N)
    assert m["demotions"] > 0 and m.experts_moved > 0


def test_shared_memory_holds_more_experts_at_full_precision():
    """At the same device_memory (counted in bf16, where an INT4 expert is 27% of one at full
    precision), shared draft memory leaves more full-precision slots than a separate draft once
    the cache holds enough experts whose INT4 copies it need not keep, and its plan fits the
    budget; below the minimum the error names the INT4 experts."""
    model = tiny_model(torch.float64, num_layers=4, num_experts=8, top_k=2, hidden_size=64)
    bf16 = dict(policy="speq", k=2, memory_dtype=torch.bfloat16)
    full = speq.compile(model, speq.CompileOptions(**bf16, draft_memory="separate")).memory
    int4 = speq.compile(model, speq.CompileOptions(**bf16, draft_memory="shared")).engine.draft
    for slots in (2, 4, 8, 16):
        budget = (
            full.non_expert_bytes + full.kv_bytes + full.draft_bytes + slots * full.expert_bytes
        )
        separate = speq.compile(
            model, speq.CompileOptions(**bf16, device_memory=budget, draft_memory="separate")
        )
        shared = speq.compile(model, speq.CompileOptions(**bf16, device_memory=budget))
        assert separate.memory.slots == slots
        # every slot past the first saves one INT4 expert: (slots - 1) * int4 more bytes
        saved = (slots - 1) * int4.expert_int4_bytes
        gained = saved // (full.expert_bytes - int4.expert_int4_bytes)
        assert shared.memory.slots == slots + gained and (gained > 0) == (slots >= 4)
        assert shared.memory.used_bytes <= budget
        assert shared.memory.int4_slots == 32 - shared.memory.slots + 1  # + the spare
        assert shared.draft_bytes == shared.memory.int4_slots * int4.expert_int4_bytes
    kwargs = dict(non_expert_bytes=1000, kv_bytes=1000, draft_bytes=0, expert_bytes=1000)
    kwargs.update(min_slots=2, max_slots=32, shared=SharedDraft(250, 32))
    # each full-precision slot costs 1000 - 250: (19500 - 2000 - (32 + 1) * 250) // 750 = 12
    plan = plan_memory(Budget(19_500), **kwargs)
    assert (plan.slots, plan.int4_slots, plan.used_bytes) == (12, 21, 19_250)
    # the minimum: 2000 + 2 * 1000 + (32 - 2 + 1) * 250 = 11750
    with pytest.raises(BudgetError, match="INT4 draft experts"):
        plan_memory(Budget(11_749), **kwargs)
    assert plan_memory(Budget(11_750), **kwargs).slots == 2


def test_the_plan_with_shared_memory_fits_and_maximises_full_slots():
    shared = SharedDraft(250, 32)
    kwargs = dict(non_expert_bytes=1000, kv_bytes=1000, draft_bytes=0, expert_bytes=1000)
    for nbytes in range(12_000, 40_000, 977):
        plan = plan_memory(Budget(nbytes), **kwargs, min_slots=2, max_slots=32, shared=shared)
        assert plan.used_bytes <= nbytes
        assert plan.draft_bytes == shared.slots(plan.slots) * 250
        if plan.slots < 32:  # one more full-precision slot would not fit
            more = 2000 + (plan.slots + 1) * 1000 + shared.slots(plan.slots + 1) * 250
            assert more > nbytes


def test_sampling_with_shared_draft_memory_keeps_the_targets_distribution():
    model, prompt, probs = sampling_case()
    opts = speq.CompileOptions(
        policy="speq",
        k=1,
        backend="sim",
        device_memory=speq_budget(model, model.config.top_k),
        draft_memory="shared",
        link_gbps=0.05,
    )
    assert chi_square_p(first_sampled_counts(model, prompt, 7, options=opts), probs) > 1e-3


@pytest.mark.parametrize(
    "options, error",
    [
        (dict(policy="speq", draft_memory="both"), "draft_memory = 'both'"),
        (dict(policy="speq", draft_memory=None), "draft_memory = None"),
        (dict(policy="ondemand", draft_memory="separate"), "applies to policy='speq' only"),
        (
            dict(policy="speq", draft_memory="shared", predictor="oracle"),
            "predictor = 'oracle' needs draft_memory = 'separate'",
        ),
    ],
)
def test_bad_draft_memory_options_are_refused(options, error):
    with pytest.raises(ValueError, match=error):
        speq.CompileOptions(**options)


def test_shared_draft_memory_is_the_default_and_policies_without_a_draft_ignore_it():
    assert speq.CompileOptions().draft_memory == speq.CompileOptions(policy="speq").draft_memory
    assert speq.CompileOptions(policy="speq").draft_memory == "shared"
    model = tiny_model(torch.float64)
    budget = speq_budget(model, 4)
    ondemand = speq.compile(model, speq.CompileOptions(policy="ondemand", device_memory=budget))
    assert ondemand.draft_bytes == 0 and ondemand.memory.int4_slots == 0


def test_shared_draft_memory_simulates_at_paper_scale():
    """The trace backend runs shared draft memory on a paper-scale model in seconds: with the
    draft on at the same budget, more experts at full precision than a separate draft, each
    copy's victim demoted, and the draft's full-precision reads timed."""
    from speq.sim.presets import get_preset
    from speq.simulate import routing_for, simulated_model

    cfg = get_preset("qwen1.5-moe-a2.7b")
    trace, n, _ = routing_for(cfg, 8)
    runs = {}
    for memory in ("separate", "shared"):
        opts = speq.CompileOptions(
            policy="speq",
            k=2,
            device_memory=20 * 10**9,
            profile="a100-40g-pcie4",
            dtype=torch.bfloat16,
            draft_memory=memory,
            host_compute=False,
        )
        cm = simulated_model(cfg, trace, opts)
        cm.generate(torch.zeros(trace.prompt_len, dtype=torch.int64), n)
        runs[memory] = cm
    separate, shared = runs["separate"], runs["shared"]
    assert shared.memory.slots > separate.memory.slots
    assert shared.memory.used_bytes <= 20 * 10**9
    m = shared.metrics
    assert m["demotions"] == m.experts_moved > 0 and m["full_precision_slots"] <= m.cache_slots


@pytest.mark.parametrize("at_full", [(), (0, 1, 2, 3, 4, 5), (1, 4), (0, 2, 3)])
@pytest.mark.parametrize("tokens", [1, 4])
@pytest.mark.parametrize("path", ["one pass (cpu)", "a launch per precision (gpu)"])
def test_the_draft_reads_each_expert_at_its_precision(path, tokens, at_full):
    """The shared draft's MoE, either way it runs, equals the reference over one dense pool that
    holds each expert at its precision (full, or its INT4 codes dequantized): every expert read
    from its own pool at its own slot, none twice, none missed."""
    e, h, i, top_k = 6, 64, 32, 2
    gen = torch.Generator().manual_seed(4)
    full = (torch.randn(e, 2 * i, h, generator=gen, dtype=torch.float64),)
    full += (torch.randn(e, h, i, generator=gen, dtype=torch.float64),)
    quant = tuple(
        quantize_experts(torch.randn(e, *s, generator=gen), 4, 32)
        for s in (full[0].shape[1:], full[1].shape[1:])
    )
    full_slot = {x: s for s, x in enumerate(reversed(at_full))}  # slots in another order
    int4_slot = {x: e - 1 - x for x in range(e) if x not in at_full}  # than the ids
    x = torch.randn(tokens, h, generator=gen, dtype=torch.float64)
    ids = torch.stack([torch.randperm(e, generator=gen)[:top_k] for _ in range(tokens)])
    ids = ids.to(torch.int32)
    weights = torch.softmax(torch.randn(tokens, top_k, generator=gen, dtype=torch.float64), -1)
    routed = set(ids.reshape(-1).tolist())
    if path.startswith("one pass"):

        def source(expert):
            if expert in at_full:
                return (*full, full_slot[expert])
            return (*quant, int4_slot[expert])

        got = grouped_by_source(x, ids, weights, source, MoEDims(tokens, h, i, e, top_k, 0))
    else:
        split = (routed & set(at_full), routed - set(at_full))
        tables = [
            torch.tensor([t.get(x, -1) for x in range(e)], dtype=torch.int32)
            for t in (full_slot, int4_slot)
        ]
        got = fused_moe_by_precision(x, ids, weights, split, (*full, tables[0]), quant, tables[1])

    def held(w: int, expert: int) -> torch.Tensor:  # the weight the expert is read as
        if expert in at_full:
            return full[w][full_slot[expert]]
        return quant[w].select(int4_slot[expert]).dequantize(torch.float64)

    mixed = [torch.stack([held(w, expert) for expert in range(e)]) for w in (0, 1)]
    want = fused_moe_torch(x, *mixed, ids, weights)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_a_launch_per_precision_decodes_losslessly_too(monkeypatch):
    """The GPU's way of running the shared draft's MoE (`fused_moe_by_precision`: two fused
    launches through the pool's and the INT4 slots' tables), run on the CPU's pool: greedy
    output still identical to all-resident, evicted experts demoted."""
    from speq.runtime import draft_slots

    monkeypatch.setattr(draft_slots, "ONE_PASS_DEVICES", ())
    calls = []
    two_launches = draft_slots.fused_moe_by_precision
    monkeypatch.setattr(
        draft_slots,
        "fused_moe_by_precision",
        lambda *a, **kw: calls.append(1) or two_launches(*a, **kw),
    )
    model = tiny_model(torch.float64, num_layers=3, num_experts=8, top_k=2)
    expected = speq.compile(model).generate(PROMPT, N)
    cm = _shared(model, 3, k=3, backend="cpu", link_gbps=0.05)
    assert torch.equal(cm.generate(PROMPT, N), expected)
    assert cm.metrics["demotions"] == cm.metrics.experts_moved > 0 and calls
