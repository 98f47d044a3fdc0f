import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import tiny_model
from speq.frontend import capture, from_reference
from speq.ir import Node, Op, Value
from speq.models.spec import ModelSpec
from speq.sim import (
    NodeCost,
    active_params,
    expected_distinct_experts,
    expert_bytes,
    get_preset,
    get_profile,
    node_cost,
    node_seconds,
    resolve_dim,
    step_breakdown,
    step_cost,
    step_seconds,
)
from speq.sim import cost as cost_module

A100 = get_profile("a100-40g-pcie4")
TINY_SPEC, _ = from_reference(
    tiny_model(
        torch.float32,
        shared_expert_intermediate_size=16,
        num_layers=3,
        first_dense_layers=1,
        dense_intermediate_size=40,
    )
)
TINY = capture(TINY_SPEC)
MIXTRAL = get_preset("mixtral-8x7b")


def fused_moe_node(cfg, dt="bf16", layer=0):
    """A FUSED_MOE node as the fuse_moe pass writes it: (x, ids, weights, w13, w2) -> y."""
    h, i, e, k = cfg.hidden_size, cfg.expert_intermediate_size, cfg.num_experts, cfg.top_k
    ins = (
        Value("x", ("T", h), dt),
        Value("ids", ("T", k), "i64"),
        Value("w", ("T", k), "f32"),
        Value("w13", (e, 2 * i, h), dt),
        Value("w2", (e, h, i), dt),
    )
    return Node(Op.FUSED_MOE, ins, (Value("y", ("T", h), dt),), {"layer": layer})


@pytest.mark.parametrize(
    "dim, tokens, size", [(7, 3, 7), ("T", 3, 3), ("T*2", 3, 6), ("2*T", 5, 10), ("T*8", 1, 8)]
)
def test_resolve_dim(dim, tokens, size):
    assert resolve_dim(dim, tokens) == size


def test_unresolvable_dim_is_an_error():
    with pytest.raises(ValueError, match="'S'"):
        resolve_dim("S", 1)


def test_expected_distinct_experts_edges():
    assert expected_distinct_experts(8, 2, 1) == pytest.approx(2)  # one token: its k experts
    assert expected_distinct_experts(8, 8, 5) == pytest.approx(8)  # k = E: all of them
    assert expected_distinct_experts(8, 1, 1000) == pytest.approx(8)  # many tokens saturate
    counts = [expected_distinct_experts(60, 4, t) for t in range(1, 20)]
    assert counts == sorted(counts) and counts[-1] < 60


def test_every_op_has_a_cost():
    assert set(Op) <= set(cost_module.COSTS)


def test_zero_cost_nodes_launch_nothing():
    for node in TINY:
        if node.op in (Op.INPUT, Op.PARAM, Op.OUTPUT):
            cost = node_cost(node, TINY_SPEC, 4, 16)
            assert cost == NodeCost(0.0, 0.0)
            assert node_seconds(cost, A100) == 0.0


def test_node_seconds_is_launch_plus_roofline():
    mem_bound = NodeCost(flops=1.0, bytes=1e9)
    assert node_seconds(mem_bound, A100) == pytest.approx(4e-6 + 1e9 / (1555e9 * 0.7))
    compute_bound = NodeCost(flops=1e12, bytes=1.0)
    assert node_seconds(compute_bound, A100) == pytest.approx(4e-6 + 1e12 / (312e12 * 0.7))


def test_linear_and_attention_formulas():
    cfg = TINY_SPEC.config
    h, d = cfg.hidden_size, cfg.head_dim
    q = next(n for n in TINY.find(Op.LINEAR) if n.out.name == "l0.q")
    c = node_cost(q, TINY_SPEC, tokens=5, context=9, dtype_bytes=2)
    assert c.flops == 2 * 5 * h * h
    assert c.bytes == 2 * (h * h + 5 * h + 5 * h)  # weights + input + output, bf16
    att = TINY.find(Op.ATTENTION)[0]
    c = node_cost(att, TINY_SPEC, tokens=5, context=9, dtype_bytes=2)
    assert c.flops == 4 * 5 * 9 * cfg.num_heads * d
    kv = 9 * cfg.num_kv_heads * d * 2 * 2
    assert c.bytes == kv + 2 * (5 * h) * 2


def test_floats_are_costed_at_dtype_bytes_whatever_the_captured_dtype():
    bf16 = capture(ModelSpec(TINY_SPEC.config, torch.bfloat16))
    for dtype_bytes in (2, 4):
        a = step_cost(TINY, TINY_SPEC, 3, 10, dtype_bytes)
        b = step_cost(bf16, TINY_SPEC, 3, 10, dtype_bytes)
        assert a == b


def test_fused_moe_at_one_token_reads_top_k_experts():
    cfg = MIXTRAL
    h, i, k = cfg.hidden_size, cfg.expert_intermediate_size, cfg.top_k
    c = node_cost(fused_moe_node(cfg), cfg, tokens=1, context=100)
    # activations: x and y rows (bf16), ids (i64), routing weights (f32), and the [k, I] rows
    # written by the gate/up GEMM and read by the down GEMM
    activations = 2 * h * 2 + k * 8 + k * 4 + 2 * k * i * 2
    assert c.bytes == pytest.approx(k * expert_bytes(cfg) + activations)
    assert c.flops == 2 * k * (2 * i) * h + 2 * k * h * i
    # the optional residency input (the WAIT that made the experts resident) costs nothing
    node = fused_moe_node(cfg)
    waited = node.replace(inputs=(*node.inputs, Value("ready", (), "residency")))
    assert node_cost(waited, cfg, tokens=1, context=100) == c


def test_experts_touched_overrides_the_expectation():
    cfg = MIXTRAL
    node = fused_moe_node(cfg)
    lo = node_cost(node, cfg, 4, 100, experts_touched=2)
    hi = node_cost(node, cfg, 4, 100, experts_touched=8)
    assert hi.bytes - lo.bytes == pytest.approx(6 * expert_bytes(cfg))
    assert hi.flops == lo.flops  # the work per pair does not depend on which experts
    with pytest.raises(ValueError, match="experts_touched"):
        node_cost(node, cfg, 4, 100, experts_touched=9)


def test_fused_moe_does_the_unfused_chain_s_gemm_work_with_less_traffic():
    cfg = TINY_SPEC.config
    layer = cfg.moe_layers[0]
    chain = [n for n in TINY if n.op in (Op.GATHER, Op.SWIGLU, Op.SCATTER, Op.EXPERT_GEMM)]
    chain = [n for n in chain if f"l{layer}." in n.out.name and "shared" not in n.out.name]
    assert [n.op for n in chain] == [
        Op.GATHER,
        Op.EXPERT_GEMM,
        Op.SWIGLU,
        Op.EXPERT_GEMM,
        Op.SCATTER,
    ]
    fused = fused_moe_node(cfg, dt="f32", layer=layer)
    for tokens in (1, 3, 16):
        gemms = sum(
            (node_cost(n, cfg, tokens, 32) for n in chain if n.op is Op.EXPERT_GEMM),
            NodeCost(0.0, 0.0),
        )
        f = node_cost(fused, cfg, tokens, 32)
        assert f.flops == gemms.flops
        unfused_bytes = sum(node_cost(n, cfg, tokens, 32).bytes for n in chain)
        assert f.bytes < unfused_bytes


def test_per_layer_experts_touched_in_a_step():
    cfg = TINY_SPEC.config
    (l1, l2) = cfg.moe_layers
    base = step_cost(TINY, cfg, 3, 8, experts_touched={l1: 1, l2: 1})
    more = step_cost(TINY, cfg, 3, 8, experts_touched={l1: 1, l2: 4})
    one_expert = 3 * cfg.hidden_size * cfg.expert_intermediate_size * 2
    assert more.bytes - base.bytes == pytest.approx(3 * one_expert)
    # layers missing from the mapping use the expectation
    partial = step_cost(TINY, cfg, 3, 8, experts_touched={l1: 1})
    expected = expected_distinct_experts(cfg.num_experts, cfg.top_k, 3)
    assert partial.bytes - base.bytes == pytest.approx((expected - 1) * one_expert)


@settings(max_examples=30, deadline=None)
@given(
    tokens=st.integers(1, 64),
    context=st.integers(0, 4096),
    dt=st.integers(1, 64),
    dc=st.integers(1, 4096),
)
def test_cost_is_monotonic_in_tokens_and_context(tokens, context, dt, dc):
    for node in TINY:
        c = node_cost(node, TINY_SPEC, tokens, context)
        more_t = node_cost(node, TINY_SPEC, tokens + dt, context)
        more_c = node_cost(node, TINY_SPEC, tokens, context + dc)
        assert more_t.flops >= c.flops and more_t.bytes >= c.bytes
        assert more_c.flops >= c.flops and more_c.bytes >= c.bytes
    s = step_seconds(TINY, TINY_SPEC, tokens, context, A100)
    assert step_seconds(TINY, TINY_SPEC, tokens + dt, context, A100) >= s
    assert step_seconds(TINY, TINY_SPEC, tokens, context + dc, A100) >= s


def test_tiny_model_end_to_end():
    s = step_seconds(TINY, TINY_SPEC, 1, 16, A100)
    breakdown = step_breakdown(TINY, TINY_SPEC, 1, 16, A100)
    assert s > 0
    assert sum(breakdown.values()) == pytest.approx(s)
    assert "param" not in breakdown and "input" not in breakdown
    assert {"linear", "attention", "expert_gemm", "router"} <= set(breakdown)
    # at this size every kernel is launch-bound
    kernels = sum(1 for n in TINY if not node_cost(n, TINY_SPEC, 1, 16).is_zero)
    assert s == pytest.approx(kernels * A100.launch_us * 1e-6, rel=0.01)


def test_bad_arguments():
    node = TINY.find(Op.LINEAR)[0]
    with pytest.raises(ValueError, match="tokens"):
        node_cost(node, TINY_SPEC, 0, 4)
    with pytest.raises(ValueError, match="context"):
        node_cost(node, TINY_SPEC, 1, -1)
    with pytest.raises(TypeError, match="ModelSpec or MoEConfig"):
        node_cost(node, {"hidden_size": 4}, 1, 4)


def test_mixtral_decode_on_a100_is_memory_bound_at_active_weights():
    graph = capture(ModelSpec(MIXTRAL, torch.bfloat16))
    # all weights resident: ~12.9B active parameters * 2 bytes at 1555 GB/s * 0.7 -> ~24 ms
    s = step_seconds(graph, MIXTRAL, tokens=1, context=512, profile=A100)
    assert 0.015 < s < 0.040
    breakdown = step_breakdown(graph, MIXTRAL, 1, 512, A100)
    assert max(breakdown, key=breakdown.get) == "expert_gemm"
    # bytes: the active weights minus the embedding table (only one row of it is read)
    cost = step_cost(graph, MIXTRAL, 1, 512)
    weights = 2 * (active_params(MIXTRAL) - MIXTRAL.vocab_size * MIXTRAL.hidden_size)
    assert cost.bytes == pytest.approx(weights, rel=0.01)
    # verifying k + 1 = 5 tokens touches more experts, so costs more but less than 5 decodes
    s5 = step_seconds(graph, MIXTRAL, tokens=5, context=512, profile=A100)
    assert s < s5 < 5 * s
