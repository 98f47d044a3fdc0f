"""The cuda backend: copy streams, events, pinned host memory, Triton kernels (GPU tier)."""

import dataclasses

import pytest
import torch

import speq
from helpers import speq_budget, tiny_model

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

PROMPT = torch.tensor([[5, 17, 3, 42, 8, 1]])


@pytest.mark.parametrize("policy", ["resident", "ondemand", "nextgate", "oracle"])
def test_cuda_policies_equal_cpu_resident_output(policy):
    # float64 (the torch path of the kernels on CUDA) so that the comparison can be exact
    model = tiny_model(torch.float64, num_layers=3, num_experts=7)
    cpu = speq.compile(model)
    m = cpu.memory
    budget = None if policy == "resident" else m.non_expert_bytes + m.kv_bytes + 4 * m.expert_bytes
    cm = speq.compile(
        model, speq.CompileOptions(policy=policy, backend="cuda", device_memory=budget)
    )
    assert torch.equal(cm.generate(PROMPT, 16), cpu.generate(PROMPT, 16))
    assert cm.metrics.needs > 0


def test_cuda_ondemand_moves_what_the_sim_backend_moves():
    model = tiny_model(torch.float32, num_layers=3, num_experts=7)
    m = speq.compile(model).memory
    budget = m.non_expert_bytes + m.kv_bytes + 4 * m.expert_bytes
    runs = {}
    for backend in ("cuda", "sim"):
        cm = speq.compile(
            model, speq.CompileOptions(policy="ondemand", backend=backend, device_memory=budget)
        )
        cm.generate(PROMPT, 12)
        runs[backend] = cm.metrics
    assert runs["cuda"].bytes_moved == runs["sim"].bytes_moved
    assert runs["cuda"].hits == runs["sim"].hits


@pytest.mark.parametrize("policy,k", [("ondemand", None), ("speq", 3)])
def test_cuda_graph_replay_equals_the_same_regions_run_eagerly(policy, k):
    """Replay regions captured as CUDA graphs give the tokens of the same regions run node by
    node over the same static buffers (capture=False: the same kernels, nothing captured)."""
    from speq.runtime.replay import Replayer

    model = tiny_model(torch.float32, num_layers=3, num_experts=7)
    budget = speq_budget(model, 4)
    opts = speq.CompileOptions(policy=policy, k=k, backend="cuda", device_memory=budget)
    outs = {}
    for capture in (True, False):
        cm = speq.compile(model, opts)
        assert cm.engine.replayer is not None and cm.engine.replayer.capture
        if not capture:
            cm.engine.replayer = Replayer(capture=False)
        outs[capture] = cm.generate(PROMPT, 16)
        stats = cm.engine.replayer.stats
        assert stats.replays > stats.captures > 0
    assert torch.equal(outs[True], outs[False])
    off = speq.compile(model, dataclasses.replace(opts, cuda_graphs=False))
    assert off.engine.replayer is None


def test_the_expert_store_pins_a_models_weights_in_place():
    """Host memory is not doubled: the store's pinned tensors are the model's own."""
    from speq.frontend.reference import from_reference
    from speq.runtime.store import ExpertStore

    model = tiny_model(torch.float32, num_layers=2)
    spec, params = from_reference(model)
    store = ExpertStore(spec, params, pin=True)
    for i in store.layers:
        mine = params[spec.expert_param(i, "w13")]
        assert store.w13[i].is_pinned() and store.w13[i].data_ptr() == mine.data_ptr()


@pytest.mark.parametrize("k", [1, 4, None])
def test_cuda_shared_draft_memory_equals_cpu_resident_output(k):
    """draft_memory="shared" on the GPU, CUDA graphs on: the draft reads each expert at the
    precision resident (two launches outside the replay regions), evicted experts are quantized
    on the device into INT4 slots, and greedy output equals all-resident's (float64)."""
    model = tiny_model(torch.float64, num_layers=3, num_experts=7)
    expected = speq.compile(model).generate(PROMPT, 16)
    opts = speq.CompileOptions(
        policy="speq",
        k=k,
        backend="cuda",
        device_memory=speq_budget(model, 3),
        draft_memory="shared",
        link_gbps=0.05,
    )
    cm = speq.compile(model, opts)
    assert torch.equal(cm.generate(PROMPT, 16).cpu(), expected)
    m = cm.metrics
    if not cm.engine.draft.on_device:  # the governor dropped the draft
        return
    assert m["demotions"] == m.experts_moved > 0  # the cache starts full: each copy demotes
    # every expert held as INT4, demoted on the GPU or copied at the start, holds the draft's
    # own codes and scales, bit for bit
    int4 = cm.engine.int4
    assert int4 is not None and int4.slot
    for key, slot in int4.slot.items():
        for pool, master in zip((int4.w13, int4.w2), int4.master[key.layer]):
            assert torch.equal(pool.data[slot].cpu(), master.data[key.expert])
            assert torch.equal(pool.scales[slot].cpu(), master.scales[key.expert])
