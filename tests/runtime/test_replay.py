"""Replay regions run as units over static buffers (the CPU half of CUDA-graph replay): the
position as a device tensor, inputs copied in, outputs read back; greedy output unchanged."""

import pytest
import torch

import speq
from helpers import speq_budget, tiny_model
from speq.ir.ops import Op
from speq.ir.run import run_graph
from speq.models.kv_cache import KVCache
from speq.runtime.backends import KERNELS
from speq.runtime.replay import Replayer, segments
from speq.runtime.speculative import SpecPolicy, Speq

PROMPT = torch.tensor([[5, 17, 3, 42, 8, 1]])


def test_segments_read_from_outside_and_feed_what_comes_after():
    model = tiny_model(
        torch.float64, num_layers=3, first_dense_layers=1, dense_intermediate_size=40
    )
    cm = speq.compile(model, speq.CompileOptions(policy="speq", k=2))
    for name in ("step", "draft"):
        graph = cm.program[name]
        segs = segments(graph)
        order = [n for s in segs for n in s.nodes]
        assert sorted(map(id, order)) == sorted(map(id, graph.nodes))
        defined = set()
        for n in order:  # still a topological order
            assert all(v.name in defined for v in n.inputs)
            defined |= {v.name for v in n.outputs}
        regions = [s for s in segs if s.region is not None]
        assert len({s.region for s in regions}) == len(regions) > 1
        for seg in regions:
            made = {v.name for n in seg.nodes for v in n.outputs}
            read = {v.name for n in seg.nodes for v in n.inputs}
            assert set(seg.inputs) == read - made and set(seg.outputs) <= made
            assert not any(v.dtype == "residency" for n in seg.nodes for v in n.inputs)
            assert seg.params <= set(seg.inputs) and "tokens" not in seg.params
        # what the host-side nodes and the graph's OUTPUT read from a region leaves it
        in_region = {v.name for s in regions for n in s.nodes for v in n.outputs}
        outputs = {x for s in regions for x in s.outputs}
        readers = [n for n in graph if n.op in (Op.PREFETCH, Op.WAIT, Op.OUTPUT)]
        read = {v.name for n in readers for v in n.inputs} & in_region
        assert read and read <= outputs


@pytest.mark.parametrize("policy,k", [("ondemand", None), ("nextgate", None), ("speq", 3)])
def test_replayed_regions_keep_greedy_output(policy, k):
    model = tiny_model(torch.float64, num_layers=3)
    expected = speq.compile(model).generate(PROMPT, 12)
    opts = speq.CompileOptions(policy=policy, k=k, device_memory=speq_budget(model, 4))
    cm = speq.compile(model, opts)
    cm.engine.replayer = Replayer(capture=False)
    assert torch.equal(cm.generate(PROMPT, 12), expected)
    stats = cm.engine.replayer.stats
    assert stats.replays > stats.captures > 0 and stats.eager_nodes > 0
    captures, replays = stats.captures, stats.replays
    assert torch.equal(cm.generate(PROMPT, 12), expected)  # the same KV cache: no new capture
    assert stats.captures == captures and stats.replays > replays


def test_one_step_equals_the_interpreter_at_any_position():
    """A region kept from one position serves the next: the position is a tensor input."""
    model = tiny_model(torch.float64, num_layers=2)
    cm = speq.compile(
        model, speq.CompileOptions(policy="ondemand", device_memory=speq_budget(model, 3))
    )
    graph = cm.program["step"]
    session = cm.engine.session(Speq(SpecPolicy(k=1)), virtual=True)
    caches = [KVCache(cm.config, 1, torch.float64) for _ in range(2)]
    replayer = Replayer(capture=False)
    tokens = PROMPT[0]
    for pos in range(len(tokens)):
        x = tokens[pos : pos + 1]
        ref = run_graph(
            graph, {"tokens": x, "pos": pos}, session.context(caches[0], pos, 1), KERNELS
        )
        ctx = session.context(caches[1], pos, 1)
        got = replayer.run(graph, {"tokens": x, "pos": torch.tensor(pos)}, ctx, KERNELS)
        torch.testing.assert_close(got[0], ref[0], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(caches[1].k[:, :, : pos + 1], caches[0].k[:, :, : pos + 1])
    assert replayer.stats.captures == len(segments(graph)) - sum(
        s.region is None for s in segments(graph)
    )
    captures = replayer.stats.captures
    replayer.run(
        graph,
        {"tokens": tokens[:1], "pos": torch.tensor(0)},
        session.context(KVCache(cm.config, 1, torch.float64), 0, 1),
        KERNELS,
    )
    assert replayer.stats.captures == 2 * captures  # a new KV cache: captured again


def test_capture_needs_cuda():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(ValueError, match="needs a CUDA device"):
        Replayer(capture=True)


def test_dropping_the_draft_leaves_no_capture_holding_its_weights():
    """Captures hold the weights they read (and on CUDA their graphs' memory): a drop must let
    the draft's device memory go, so the larger pool is not allocated beside the old draft."""
    model = tiny_model(torch.float64, num_layers=3)
    opts = speq.CompileOptions(
        policy="speq", draft_memory="separate", k=2, device_memory=speq_budget(model, 4)
    )
    cm = speq.compile(model, opts)
    engine = cm.engine
    engine.replayer = Replayer(capture=False)
    cm.generate(PROMPT, 8)
    draft = [t for q in engine.draft.params.values() for t in (q.data, q.scales)]
    assert draft and any(engine.replayer.holds(t) for t in draft)  # the test can fail
    slots = engine.memory.slots
    engine.drop_draft()
    assert not engine.draft.on_device and engine.memory.slots > slots
    assert not any(engine.replayer.holds(t) for t in draft)
    assert engine.pool is not None and engine.pool.w13.shape[0] == engine.memory.slots
