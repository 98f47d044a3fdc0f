import pytest
import torch

from helpers import tiny_model
from speq.frontend import capture, from_reference
from speq.ir import Graph, Node, Op, Value, VerificationError, verify


@pytest.fixture(scope="module")
def graph() -> Graph:
    return capture(from_reference(tiny_model(torch.float32))[0])


def _swap(graph: Graph, op: Op, fn) -> Graph:
    nodes = list(graph.nodes)
    i = next(i for i, n in enumerate(nodes) if n.op is op)
    nodes[i] = fn(nodes[i])
    return Graph(graph.name, nodes)


def test_captured_graph_verifies(graph):
    assert verify(graph) is graph


def test_use_before_definition(graph):
    nodes = list(graph.nodes)
    i = next(i for i, n in enumerate(nodes) if n.op is Op.EMBED)
    nodes.insert(0, nodes.pop(i))
    with pytest.raises(VerificationError, match=r"embed uses %tokens before it is defined") as e:
        verify(Graph(graph.name, nodes))
    assert ">> %x: f32[T, 32] = embed(%tokens, %embed)" in str(e.value)


def test_type_mismatch(graph):
    bad = _swap(
        graph,
        Op.ADD,
        lambda n: n.replace(inputs=(Value(n.inputs[0].name, ("T", 33), "f32"), n.inputs[1])),
    )
    with pytest.raises(
        VerificationError, match=r"add uses %x as f32\[T, 33\] but it was defined as f32\[T, 32\]"
    ):
        verify(bad)


def test_redefinition(graph):
    bad = _swap(graph, Op.ADD, lambda n: n.replace(outputs=(Value("x", ("T", 32), "f32"),)))
    with pytest.raises(VerificationError, match="redefines %x"):
        verify(bad)


def test_wrong_input_dtype_class(graph):
    def f(n: Node) -> Node:
        logits = n.inputs[0]
        return n.replace(inputs=(Value(logits.name, logits.shape, logits.dtype),))

    # router ids fed into a float slot: gather's second input must be int
    def g(n: Node) -> Node:
        return n.replace(inputs=(n.inputs[0], n.inputs[0]))

    with pytest.raises(
        VerificationError, match=r"gather input 1 \(%l0.mlp_in\) must be int, got f32"
    ):
        verify(_swap(_swap(graph, Op.ROUTER, f), Op.GATHER, g))


def test_missing_attribute(graph):
    bad = _swap(
        graph, Op.ROUTER, lambda n: n.replace(attrs={"k": 2, "layer": 0, "mode": "softmax_topk"})
    )
    with pytest.raises(
        VerificationError, match=r"router is missing attribute\(s\) \['renormalize'\]"
    ):
        verify(bad)


def test_wrong_arity(graph):
    bad = _swap(graph, Op.LINEAR, lambda n: n.replace(inputs=n.inputs[:1]))
    with pytest.raises(VerificationError, match="linear takes 2 to 3 inputs, got 1"):
        verify(bad)


def test_output_must_be_last_and_unique(graph):
    with pytest.raises(VerificationError, match="0 output nodes"):
        verify(Graph(graph.name, graph.nodes[:-1]))
    extra = Node(Op.PARAM, (), (Value("extra", (2,), "f32"),), {"name": "extra"})
    nodes = [*graph.nodes, extra]
    with pytest.raises(VerificationError, match="output must be the last node"):
        verify(Graph(graph.name, nodes))


def test_data_dependent_node_inside_replay_region(graph):
    bad = _swap(graph, Op.EXPERT_GEMM, lambda n: n.annotate(region=0))
    with pytest.raises(VerificationError, match="DATA_DEPENDENT but sits inside replay region 0"):
        verify(bad)


def test_host_value_reader_inside_replay_region(graph):
    from speq.ir.program import Program
    from speq.passes.fuse_moe import fuse_moe
    from speq.passes.insert_prefetch import insert_prefetch

    step = insert_prefetch()(Program((fuse_moe(graph),)))["step"]
    bad = _swap(step, Op.FUSED_MOE, lambda n: n.annotate(region=2))
    with pytest.raises(
        VerificationError,
        match=r"reads a host value \(l0\.resident\) but sits inside replay region 2",
    ):
        verify(bad)


def test_node_replace_returns_self_when_nothing_changes(graph):
    n = graph.nodes[5]
    assert n.replace(op=n.op, inputs=n.inputs, attrs=dict(n.attrs)) is n
    assert n.replace(attrs={"eps": 1.0}) is not n
    assert graph.replace_nodes(list(graph.nodes)) is graph
