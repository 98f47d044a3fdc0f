"""The routing-trace generator reproduces the statistics it was fitted on: fit on a trace (one
built here with known structure, one recorded from a real speculative run), generate a long
trace, refit, and compare each statistic within a stated tolerance, at the fitted shape and at
another one (where the shape-free forms must carry over)."""

import math
import random

import pytest
import torch

import speq
from helpers import tiny_model
from speq.sim import (
    DEFAULT_ACCEPTANCE,
    DEFAULT_AGREEMENT,
    TraceStats,
    compare_stats,
    fit_stats,
    generate_trace,
    measure_stats,
    trace_stats_table,
    with_draft,
)
from speq.sim.routing_trace import RoutingTrace
from speq.simulate import record_trace

# |refit - fitted| allowed per statistic and layer. The rates are steered to their targets, so
# they come out far closer than sampling noise; acceptance is an unsteered Markov chain whose
# standard error over 2000 positions is about 0.02 (0.03 for the conditional rate).
TOL = {
    "entropy": 0.02,
    "reuse": 0.02,
    "coupling": 0.03,
    "agreement": 0.02,
    "accept": 0.06,
    "accept_after_accept": 0.08,
}
# the same, for averages over layers of the shape-free forms at another shape
TRANSFER_TOL = {"entropy": 0.02, "reuse_excess": 0.03, "coupling_excess": 0.04,
                "agreement_excess": 0.03, "accept": 0.06, "accept_after_accept": 0.08}  # fmt: skip


def known_trace(positions=1500, E=8, k=2, L=6, seed=0) -> RoutingTrace:
    """Skewed popularity, the previous position's top expert kept 30% of the time, the top
    expert of layer l+1 the successor (top + 3) % E of layer l's 40% of the time, a draft that
    keeps each target expert 80% of the time, and acceptance a Markov chain (0.7, 0.85)."""
    rng = random.Random(seed)
    weights = [8, 6, 4, 3, 2, 2, 1, 1][:E] + [1] * (E - 8)

    def draw(chosen):
        while (e := rng.choices(range(E), weights)[0]) in chosen:
            pass
        return e

    target, draft, accept, state = {}, {}, {}, True
    for p in range(positions):
        rows = []
        for layer in range(L):
            if layer and rng.random() < 0.4:
                row = [(rows[-1][0] + 3) % E]
            elif p and rng.random() < 0.3:
                row = [target[p - 1][layer][0]]
            else:
                row = [draw([])]
            while len(row) < k:
                row.append(draw(row))
            rows.append(row)
        target[p] = rows
        draft[p] = [[e if rng.random() < 0.8 else draw(r) for e in r] for r in rows]
        draft[p] = [d if len(set(d)) == k else r for d, r in zip(draft[p], rows)]
        if p:
            accept[p] = state
            state = rng.random() < (0.85 if state else 0.35)
    return RoutingTrace(E, k, L, 1, target, draft, accept)


@pytest.fixture(scope="module")
def known() -> TraceStats:
    return measure_stats(known_trace())


@pytest.fixture(scope="module")
def recorded() -> RoutingTrace:
    """A real speculative run (k = 3) of a tiny random model: 4 MoE layers of 8 experts."""
    model = tiny_model(torch.float64, num_layers=4, num_experts=8, max_seq_len=128)
    cm = speq.compile(model, speq.CompileOptions(policy="speq", k=3, backend="sim"))
    prompt = torch.tensor([[5, 17, 3, 42, 8, 1, 9, 30]])
    return record_trace(cm, prompt, 100)


def assert_close(fitted: TraceStats, refit: TraceStats, tol=TOL):
    pairs = compare_stats(fitted, refit)
    for name, limit in tol.items():
        keys = [key for key in pairs if key == name or key.startswith(f"{name}[")]
        assert keys, name
        for key in keys:
            a, b = pairs[key]
            assert abs(a - b) <= limit, f"{key}: fitted {a:.3f}, generated {b:.3f}\n{refit}"


def test_statistics_of_handmade_traces_are_exact():
    """Constant routing: reuse 1, coupling 1, 2 of 4 experts used; alternating: reuse 0; a
    draft with one of two experts right; acceptance T T F T T T F."""
    same = {p: [[0, 1], [2, 3]] for p in range(8)}
    half = {p: [[0, 3], [2, 0]] for p in range(8)}
    acc = dict(enumerate([True, True, False, True, True, True, False], start=1))
    s = fit_stats([RoutingTrace(4, 2, 2, 1, same, half, acc)])
    n = 16  # choices per layer
    assert s.entropy[0] == pytest.approx((1 + 1 / (2 * n * math.log(2))) / 2)
    assert s.reuse == (1.0, 1.0) and s.coupling == (1.0,) and s.agreement == (0.5, 0.5)
    assert s.accept == pytest.approx(5 / 7)
    assert s.accept_after_accept == pytest.approx(3 / 5)  # after 1, 2, 4, 5, 6: T F T T F
    alternating = {p: [[0, 1], [2, 3]] if p % 2 else [[2, 3], [0, 1]] for p in range(8)}
    s = measure_stats(RoutingTrace(4, 2, 2, 1, alternating))
    assert s.reuse == (0.0, 0.0) and s.entropy[0] == pytest.approx(1.0)
    assert s.agreement is None and s.accept is None and s.accept_after_accept is None
    assert s.excess("reuse") == (-1.0, -1.0) and s.excess("coupling") == (1.0,)


def test_the_known_structure_is_what_is_fitted(known):
    assert all(0.85 < h < 0.97 for h in known.entropy)  # skewed: 8 6 4 3 2 2 1 1
    assert all(r > 0.35 for r in known.reuse[1:])  # 30% kept top + chance (k/E = 0.25)
    assert all(0.4 < c < 0.6 for c in known.coupling)  # 40% linked + chance
    assert all(0.8 < a < 0.9 for a in known.agreement)
    assert known.accept == pytest.approx(0.7, abs=0.05)
    assert known.accept_after_accept == pytest.approx(0.85, abs=0.05)
    table = trace_stats_table(known)
    assert str(known) == table and len(table.splitlines()) == 2 + known.moe_layers + 1


def test_a_generated_trace_has_the_statistics_it_was_fitted_on(known):
    trace = generate_trace(known, 8, 2, 6, tokens=2000, seed=1)
    assert_close(known, measure_stats(trace))


def test_a_recorded_run_is_reproduced(recorded):
    fitted = measure_stats(recorded)
    assert fitted.agreement is not None and fitted.accept is not None
    trace = generate_trace(fitted, 8, 2, 4, tokens=2000, prompt_len=recorded.prompt_len)
    assert_close(fitted, measure_stats(trace))


@pytest.mark.parametrize("shape", [(16, 2, 12), (32, 4, 3)], ids=["E16", "E32_top4"])
def test_the_shape_free_statistics_transfer_to_another_shape(known, shape):
    refit = measure_stats(generate_trace(known, *shape, tokens=2000, seed=2))
    assert (refit.num_experts, refit.top_k, refit.moe_layers) == shape
    pairs = compare_stats(known, refit)
    assert "reuse" not in pairs and "reuse_excess[0]" not in pairs  # other E, other layers
    for name, limit in TRANSFER_TOL.items():
        a, b = pairs[name]
        assert abs(a - b) <= limit, f"{name}: fitted {a:.3f}, at {shape} {b:.3f}"


@pytest.mark.parametrize(
    "E,k,L,tokens,prompt_len",
    [(8, 1, 4, 30, 1), (8, 8, 2, 30, 1), (1, 1, 1, 1, 1), (16, 2, 3, 1, 5), (5, 2, 1, 30, 3)],
    ids=["top1", "topE", "one_expert", "one_token", "one_layer"],
)
def test_edge_shapes_give_well_formed_traces(known, E, k, L, tokens, prompt_len):
    trace = generate_trace(known, E, k, L, tokens, prompt_len)
    n = prompt_len + tokens
    assert (trace.num_experts, trace.top_k, trace.moe_layers) == (E, k, L)
    assert trace.positions == n and trace.prompt_len == prompt_len
    assert sorted(trace.draft) == sorted(trace.target) == list(range(n))
    assert sorted(trace.accept) == list(range(prompt_len, n))
    for table in (trace.target, trace.draft):
        for rows in table.values():
            assert len(rows) == L
            assert all(len(set(r)) == k and all(0 <= e < E for e in r) for r in rows)
    assert RoutingTrace.from_json(trace.to_json()) == trace


def test_generation_is_deterministic_in_the_seed(known):
    a, b = (generate_trace(known, 8, 2, 6, tokens=50, seed=7) for _ in range(2))
    assert a == b
    assert generate_trace(known, 8, 2, 6, tokens=50, seed=8).target != a.target


def test_overrides_and_defaults_for_draft_and_acceptance(known):
    trace = generate_trace(known, 8, 2, 6, 2000, agreement=0.5, acceptance=0.6)
    s = measure_stats(trace)
    assert all(abs(a - 0.5) <= TOL["agreement"] for a in s.agreement)
    assert s.accept == pytest.approx(0.6, abs=TOL["accept"])
    assert s.accept_after_accept == pytest.approx(0.6, abs=TOL["accept_after_accept"])
    target_only = TraceStats(8, 2, 100, known.entropy, known.reuse, known.coupling)
    s = measure_stats(generate_trace(target_only, 8, 2, 6, 2000, agreement=[0.3] * 6))
    assert all(abs(a - 0.3) <= TOL["agreement"] for a in s.agreement)
    assert s.accept == pytest.approx(DEFAULT_ACCEPTANCE[0], abs=TOL["accept"])
    s = measure_stats(generate_trace(target_only, 8, 2, 6, 2000))
    assert all(abs(a - DEFAULT_AGREEMENT) <= TOL["agreement"] for a in s.agreement)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(top_k=9), "exceeds num_experts"),
        (dict(tokens=0), "tokens must be at least 1"),
        (dict(num_experts=0), "num_experts must be at least 1"),
        (dict(moe_layers=0), "moe_layers must be at least 1"),
        (dict(prompt_len=0), "prompt_len must be at least 1"),
        (dict(agreement=1.5), "agreement must be"),
        (dict(agreement=-0.1), "agreement must be"),
        (dict(agreement=[0.5, 0.5]), "agreement must be"),
        (dict(acceptance=(0.5, 1.2)), "acceptance rates"),
        (dict(acceptance=-0.5), "acceptance rates"),
    ],
)
def test_bad_inputs_are_refused(known, kwargs, match):
    args = dict(num_experts=8, top_k=2, moe_layers=6, tokens=10) | kwargs
    with pytest.raises(ValueError, match=match):
        generate_trace(known, **args)


def test_fit_refuses_no_traces_and_mixed_shapes():
    with pytest.raises(ValueError, match="at least one trace"):
        fit_stats([])
    a = RoutingTrace(4, 2, 1, 1, {0: [[0, 1]]})
    with pytest.raises(ValueError, match="differ in shape"):
        fit_stats([a, RoutingTrace(8, 2, 1, 1, {0: [[0, 1]]})])
    with pytest.raises(ValueError, match="outside"):
        fit_stats([RoutingTrace(4, 2, 1, 1, {0: [[0, 4]]})])


def test_a_target_only_trace_gets_a_draft_with_the_asked_agreement():
    full = known_trace(positions=1200)
    target_only = RoutingTrace(full.num_experts, full.top_k, full.moe_layers, 1, full.target)
    drafted = with_draft(target_only, seed=3, agreement=0.8, acceptance=(0.7, 0.85))
    assert drafted.target == full.target and with_draft(target_only, seed=3) == with_draft(
        target_only, seed=3
    )
    stats = measure_stats(drafted)
    assert all(abs(a - 0.8) < 0.02 for a in stats.agreement)
    assert abs(stats.accept - 0.7) < 0.06 and abs(stats.accept_after_accept - 0.85) < 0.08
    assert sorted(drafted.accept) == list(range(1, 1200))
    with pytest.raises(ValueError, match=r"positions 0\.\.n-1"):
        with_draft(RoutingTrace(8, 2, 1, 1, {1: [[0, 1]]}))
