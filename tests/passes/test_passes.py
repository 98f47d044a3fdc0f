import pytest
import torch

import speq
from golden import check_golden
from helpers import tiny_model
from speq.frontend import capture, from_reference
from speq.ir import Graph, Node, Op, Tag, Value, VerificationError, verify
from speq.passes.fuse_moe import fuse_moe
from speq.passes.insert_prefetch import insert_prefetch

GOLDEN_VARIANT = dict(num_layers=3, first_dense_layers=1, dense_intermediate_size=40)


@pytest.fixture(scope="module")
def captured() -> Graph:
    return capture(from_reference(tiny_model(torch.float32, **GOLDEN_VARIANT))[0])


def test_fuse_moe_golden(captured):
    check_golden("fuse_moe", str(verify(fuse_moe(captured))))


def test_fuse_moe_counts(captured):
    fused = fuse_moe(captured)
    assert len(fused.find(Op.FUSED_MOE)) == 2  # one per MoE layer
    assert not fused.with_tag(Tag.MOE_CHAIN)
    assert len(fused) == len(captured) - 2 * 4
    assert fuse_moe(fused) is fused  # nothing left to fuse: the same graph back


def test_fuse_moe_before_expected():
    """Before: x, ids -> gather -> gemm(w13) -> swiglu -> gemm(w2) -> scatter(w). Expected: one node."""
    f = lambda n, *s: Value(n, tuple(s), "f32")
    x, w, w13, w2 = f("x", "T", 8), f("w", "T", 2), f("w13", 4, 6, 8), f("w2", 4, 8, 3)
    ids = Value("ids", ("T", 2), "i64")
    src = [Node(Op.INPUT, (), (v,), {"name": v.name}) for v in (x, ids, w, w13, w2)]
    xs, gu, act, down, y = (
        f("xs", "T*2", 8),
        f("gu", "T*2", 6),
        f("act", "T*2", 3),
        f("down", "T*2", 8),
        f("y", "T", 8),
    )
    before = Graph(
        "g",
        [
            *src,
            Node(Op.GATHER, (x, ids), (xs,)),
            Node(Op.EXPERT_GEMM, (xs, ids, w13), (gu,), {"layer": 0}),
            Node(Op.SWIGLU, (gu,), (act,)),
            Node(Op.EXPERT_GEMM, (act, ids, w2), (down,), {"layer": 0}),
            Node(Op.SCATTER, (down, w), (y,)),
            Node(Op.OUTPUT, (y,), ()),
        ],
    )
    expected = Graph(
        "g",
        [
            *src,
            Node(Op.FUSED_MOE, (x, ids, w, w13, w2), (y,), {"layer": 0}),
            Node(Op.OUTPUT, (y,), ()),
        ],
    )
    assert str(fuse_moe(verify(before))) == str(verify(expected))
    # declined: the SwiGLU output has a second user
    leaky = Graph("g", [*before.nodes[:-1], Node(Op.OUTPUT, (y, act), ())])
    assert fuse_moe(leaky) is leaky


def test_insert_prefetch_nextgate_golden(captured):
    check_golden(
        "insert_prefetch_nextgate", str(verify(insert_prefetch("nextgate")(fuse_moe(captured))))
    )


def test_insert_prefetch_counts(captured):
    fused = fuse_moe(captured)
    for policy in ("resident", "ondemand", "oracle", "nextgate"):
        g = verify(insert_prefetch(policy)(fused))
        assert len(g.find(Op.WAIT)) == 2
        assert all(n.inputs[-1].dtype == "residency" for n in g.find(Op.FUSED_MOE))
        assert len(g.find(Op.PREFETCH)) == (
            1 if policy == "nextgate" else 0
        )  # all MoE layers but the last


def test_insert_prefetch_needs_fuse_moe_first(captured):
    with pytest.raises(VerificationError, match="fuse_moe first"):
        insert_prefetch("ondemand")(captured)


def test_compile_keeps_every_pass():
    cm = speq.compile(tiny_model(torch.float32), speq.CompileOptions(policy="nextgate"))
    assert cm.graphs.names() == ["capture", "fuse_moe", "insert_prefetch"]
    for record in cm.graphs:
        verify(record.graph)
    assert cm.graph is cm.graphs["insert_prefetch"]
