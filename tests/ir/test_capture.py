import pytest
import torch

from golden import check_golden
from helpers import VARIANTS, tiny_model
from speq.frontend import capture, from_reference
from speq.ir import Op, RunContext, run_graph
from speq.runtime.ops_eager import EAGER_TABLE

GOLDEN_VARIANT = dict(
    num_layers=2,
    first_dense_layers=1,
    dense_intermediate_size=40,
    shared_expert_intermediate_size=16,
)


def test_captured_graph_matches_golden_text():
    spec, _ = from_reference(tiny_model(torch.float32, **GOLDEN_VARIANT))
    check_golden("capture", str(capture(spec)))


def test_capture_is_deterministic():
    spec, _ = from_reference(tiny_model(torch.float32))
    assert str(capture(spec)) == str(capture(spec))


def test_capture_counts():
    cfg_model = tiny_model(
        torch.float32, num_layers=3, first_dense_layers=1, dense_intermediate_size=8
    )
    g = capture(from_reference(cfg_model)[0])
    assert len(g.find(Op.ROUTER)) == 2  # one per MoE layer
    assert len(g.find(Op.EXPERT_GEMM)) == 4
    assert len(g.find(Op.KV_WRITE)) == len(g.find(Op.ATTENTION)) == 3
    assert [v.name for v in g.inputs] == ["tokens", "pos"]
    assert [v.name for v in g.outputs] == ["logits"]


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_interpreter_equals_eager_model(variant):
    model = tiny_model(torch.float32, **VARIANTS[variant])
    spec, params = from_reference(model)
    graph = capture(spec)
    ids = torch.randint(
        0, spec.config.vocab_size, (13,), generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        ref = model(ids[None])[0]
        cache = model.new_cache()
        (prefill,) = run_graph(
            graph, {"tokens": ids[:9], "pos": 0}, RunContext(params, cache, 0), EAGER_TABLE
        )
        steps = [prefill]
        for p in range(9, 13):
            (logits,) = run_graph(
                graph,
                {"tokens": ids[p : p + 1], "pos": p},
                RunContext(params, cache, p),
                EAGER_TABLE,
            )
            steps.append(logits)
    got = torch.cat(steps)
    rel = (got - ref).abs().max() / ref.abs().max()
    assert rel < 1e-5, f"relative error {rel:.2e}"
