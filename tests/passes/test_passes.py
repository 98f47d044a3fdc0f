import pytest
import torch

import speq
from golden import check_golden
from helpers import tiny_model
from speq.frontend import capture, from_reference
from speq.ir import Graph, Node, Op, Program, Tag, Value, VerificationError, verify
from speq.passes.fuse_moe import fuse_moe
from speq.passes.insert_prefetch import insert_prefetch
from speq.passes.lower import lower
from speq.passes.make_draft import make_draft
from speq.runtime.backends import KERNELS
from speq.runtime.policies import get_policy

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
    program = insert_prefetch(next_layer=True)(Program((fuse_moe(captured),)))
    check_golden("insert_prefetch_nextgate", str(verify(program)))


def test_insert_prefetch_counts(captured):
    fused = Program((fuse_moe(captured),))
    for policy in ("resident", "ondemand", "oracle", "nextgate"):
        g = verify(insert_prefetch(get_policy(policy).next_layer_prefetch)(fused)["step"])
        assert len(g.find(Op.WAIT)) == 2
        assert all(n.inputs[-1].dtype == "residency" for n in g.find(Op.FUSED_MOE))
        # nextgate: a PREFETCH for every MoE layer but the first, issued one layer early
        assert len(g.find(Op.PREFETCH)) == (1 if policy == "nextgate" else 0)


def test_insert_prefetch_needs_fuse_moe_first(captured):
    with pytest.raises(VerificationError, match="fuse_moe first"):
        insert_prefetch()(Program((captured,)))


def test_make_draft_and_elb_prefetch_golden(captured):
    program = make_draft(4, 128)(Program((fuse_moe(captured),)))
    assert program.names() == ["step", "draft"]
    program = verify(insert_prefetch()(program))
    check_golden("speq_draft", str(program["draft"]))
    draft = program["draft"]
    assert not draft.find(Op.WAIT)  # the draft's experts are resident
    assert len(draft.find(Op.PREFETCH)) == 2  # one ELB record per MoE layer
    quantized = [n for n in draft.find(Op.PARAM) if "bits" in n.attrs]
    assert len(quantized) == 4 and all(n.out.dtype == "i4" for n in quantized)
    assert all(n.attrs["name"].startswith("draft.") for n in quantized)
    # every other weight is the target's own tensor
    target_params = {n.attrs["name"] for n in program["step"].find(Op.PARAM)}
    assert {n.attrs["name"] for n in draft.find(Op.PARAM) if "bits" not in n.attrs} <= target_params


def test_make_draft_needs_its_place_in_the_pipeline(captured):
    with pytest.raises(VerificationError, match="after fuse_moe and before insert_prefetch"):
        make_draft(4, 128)(Program((captured,)))


@pytest.mark.parametrize(
    ("policy", "names"),
    [
        ("nextgate", ["capture", "fuse_moe", "insert_prefetch", "lower"]),
        ("speq", ["capture", "fuse_moe", "make_draft", "insert_prefetch", "lower", "governor"]),
    ],
)
def test_compile_keeps_every_pass(policy, names):
    cm = speq.compile(tiny_model(torch.float32), speq.CompileOptions(policy=policy, backend="sim"))
    assert cm.graphs.names() == names
    for record in cm.graphs:
        verify(record.program)
    # the program that runs holds the lowered graphs; the governor only annotates it
    assert cm.program is cm.graphs[-1]
    assert all(a is b for a, b in zip(cm.program, cm.graphs["lower"], strict=True))
    assert ("policy" in cm.program.annotations) == (policy == "speq")
    assert cm.graph is cm.program["step"]


def test_lower_places_every_node(captured):
    program = insert_prefetch(next_layer=True)(Program((fuse_moe(captured),)))
    lowered = verify(lower(KERNELS)(program))["step"]
    check_golden("lower_nextgate", str(lowered))
    work = [n for n in lowered if n.op not in (Op.INPUT, Op.PARAM, Op.OUTPUT)]
    # every meta key lower writes is read by an executor: the kernel by the run loop, the region
    # by the replayer (copies go on the link's stream, not a node's)
    assert all("kernel" in n.meta and set(n.meta) <= {"kernel", "region"} for n in work)
    for n in lowered.find(Op.WAIT) + lowered.find(Op.PREFETCH):
        assert "region" not in n.meta
    assert lowered.find(Op.FUSED_MOE)[0].meta["kernel"] == "offload:fused_moe"
    assert lowered.find(Op.RMSNORM)[0].meta["kernel"] == "eager:rmsnorm"
    # regions are runs of compute between host syncs: layer 1's PREFETCH, WAIT and FUSED_MOE
    # (which reads the WAIT's host-side residency) stand together, layer 2's split again: three
    regions = [n.meta["region"] for n in work if "region" in n.meta]
    assert regions == sorted(regions) and len(set(regions)) == 3
    for n in lowered.find(Op.FUSED_MOE):
        assert "region" not in n.meta
    with pytest.raises(ValueError, match="after insert_prefetch"):
        lower(KERNELS)(Program((fuse_moe(captured),)))


def test_insert_prefetch_before_expected():
    """Before: router -> fused_moe. Expected: a WAIT on the routing ids right before the
    FUSED_MOE, which takes the WAIT's residency as its last input."""
    f = lambda n, *s: Value(n, tuple(s), "f32")
    x, lg, w13, w2, y = (
        f("x", "T", 8),
        f("logits", "T", 4),
        f("w13", 4, 6, 8),
        f("w2", 4, 8, 3),
        f("y", "T", 8),
    )
    ids, w = Value("ids", ("T", 2), "i64"), f("w", "T", 2)
    src = [Node(Op.INPUT, (), (v,), {"name": v.name}) for v in (x, lg, w13, w2)]
    router = Node(
        Op.ROUTER,
        (lg,),
        (ids, w),
        {"k": 2, "layer": 0, "mode": "softmax_topk", "renormalize": True},
    )
    moe = Node(Op.FUSED_MOE, (x, ids, w, w13, w2), (y,), {"layer": 0})
    before = Graph("step", [*src, router, moe, Node(Op.OUTPUT, (y,), ())])
    ready = Value("l0.resident", (), "residency")
    expected = Graph(
        "step",
        [
            *src,
            router,
            Node(Op.WAIT, (ids,), (ready,), {"layer": 0}),
            moe.replace(inputs=(x, ids, w, w13, w2, ready)),
            Node(Op.OUTPUT, (y,), ()),
        ],
    )
    got = insert_prefetch()(Program((verify(before),)))["step"]
    assert str(verify(got)) == str(verify(expected))


@pytest.mark.parametrize("shared", [False, True])
def test_a_shared_drafts_moe_runs_outside_replay_regions(captured, shared):
    """Under shared draft memory the draft's expert PARAMs are host values (each expert is read
    at the precision the host's tables say), so lower keeps the draft's FUSED_MOE out of every
    replay region; a separate draft's resident INT4 experts stay inside one."""
    program = make_draft(4, 128, shared)(Program((fuse_moe(captured),)))
    draft = verify(lower(KERNELS)(insert_prefetch()(program)))["draft"]
    quantized = [n for n in draft.find(Op.PARAM) if "bits" in n.attrs]
    assert len(quantized) == 4 and all(n.attrs.get("shared", False) is shared for n in quantized)
    moes = draft.find(Op.FUSED_MOE)
    assert len(moes) == 2 and all(("region" in n.meta) is not shared for n in moes)
    # the verifier refuses a shared draft's FUSED_MOE placed inside a region
    if shared:
        moe = moes[0]
        inside = draft.replace_nodes([n.annotate(region=0) if n is moe else n for n in draft.nodes])
        with pytest.raises(VerificationError, match="reads a host value"):
            verify(inside)
