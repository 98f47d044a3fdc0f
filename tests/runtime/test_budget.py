import dataclasses

import pytest
import torch

import speq
from helpers import speq_budget, tiny_model
from speq.runtime.budget import parse_budget


@pytest.mark.parametrize(
    ("text", "nbytes"),
    [
        ("64MB", 64 * 10**6),
        ("1.5 GB", 1_500_000_000),
        ("512MiB", 512 * 2**20),
        ("100", 100),
        (4096, 4096),
    ],
)
def test_parse_budget(text, nbytes):
    assert parse_budget(text).nbytes == nbytes


@pytest.mark.parametrize("bad", ["", "12 parsecs", "-5MB", 0, -1, 3.5, True])
def test_parse_budget_rejects_nonsense(bad):
    with pytest.raises(ValueError, match="device_memory"):
        parse_budget(bad)


def test_budget_below_the_minimum_states_the_minimum_in_the_users_unit():
    model = tiny_model(torch.float32)
    with pytest.raises(ValueError, match=r"below the minimum [0-9.]+ KB \([0-9,]+ bytes\)") as e:
        speq.compile(model, speq.CompileOptions(policy="ondemand", device_memory="10KB"))
    assert "non-expert weights" in str(e.value) and "2 expert slots" in str(e.value)


def test_resident_needs_room_for_every_expert():
    model = tiny_model(torch.float32)
    m = speq.compile(model).memory
    need = m.non_expert_bytes + m.kv_bytes + 10 * m.expert_bytes  # 2 layers x 5 experts
    speq.compile(model, speq.CompileOptions(device_memory=need))
    with pytest.raises(ValueError, match="10 expert slots"):
        speq.compile(model, speq.CompileOptions(device_memory=need - 1))


def test_slots_follow_the_budget():
    model = tiny_model(torch.float32)
    m = speq.compile(model).memory
    budget = m.non_expert_bytes + m.kv_bytes + 3 * m.expert_bytes + m.expert_bytes // 2
    cm = speq.compile(model, speq.CompileOptions(policy="ondemand", device_memory=budget))
    assert cm.memory.slots == 3 and cm.memory.used_bytes <= budget


def test_memory_dtype_counts_weights_as_deployed():
    """A float64 model counted as bf16: weights, KV and slots at a quarter of the bytes, the
    draft's INT4 codes and fp32 scales as they are; the output is unchanged."""
    model = tiny_model(torch.float64)
    f64 = speq.compile(
        model, speq.CompileOptions(policy="speq", draft_memory="separate", k=2)
    ).memory
    opts = speq.CompileOptions(
        policy="speq", draft_memory="separate", k=2, memory_dtype=torch.bfloat16
    )
    bf16 = speq.compile(model, opts).memory
    assert bf16.expert_bytes * 4 == f64.expert_bytes and bf16.kv_bytes * 4 == f64.kv_bytes
    assert bf16.non_expert_bytes * 4 == f64.non_expert_bytes
    assert bf16.draft_bytes == f64.draft_bytes > 0
    budget = bf16.non_expert_bytes + bf16.kv_bytes + bf16.draft_bytes + 5 * bf16.expert_bytes
    cm = speq.compile(model, dataclasses.replace(opts, device_memory=budget))
    assert cm.memory.slots == 5
    prompt = torch.tensor([[3, 1, 4, 1, 5]])
    assert torch.equal(cm.generate(prompt, 6), speq.compile(model).generate(prompt, 6))
    with pytest.raises(ValueError, match="memory_dtype"):
        speq.CompileOptions(memory_dtype=torch.int8)


@pytest.mark.parametrize(
    ("kw", "field"),
    [
        (dict(policy="fastest"), "policy"),
        (dict(backend="tpu"), "backend"),
        (dict(cache_allocation="random"), "cache_allocation"),
        (dict(eviction="fifo"), "eviction"),
        (dict(link_gbps=0), "link_gbps"),
        (dict(link_latency_us=-1), "link_latency_us"),
    ],
)
def test_bad_options_name_the_field(kw, field):
    with pytest.raises(ValueError, match=field):
        speq.CompileOptions(**kw)


def test_cuda_backend_without_cuda_says_so():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(ValueError, match="no CUDA device"):
        speq.CompileOptions(backend="cuda")


def test_every_byte_on_the_link_counts_in_the_deployment_dtype(monkeypatch):
    """A float64 model deployed as bf16 (memory_dtype): each expert copy moves the bf16 expert's
    bytes, and the draft's upload (INT4 codes and fp32 scales, the same size everywhere) moves
    its own, so the two cost on the link what they would on a GPU."""
    import dataclasses

    from speq.cost import Calibration, Estimate

    model = tiny_model(torch.float64, num_layers=3)
    prompt = torch.tensor([[5, 17, 3, 42, 8, 1]])
    bf16 = dict(memory_dtype=torch.bfloat16, backend="sim", link_gbps=0.01)
    cm = speq.compile(model, speq.CompileOptions(policy="ondemand", device_memory="60KB", **bf16))
    cm.generate(prompt, 12)
    expert = cm.memory.expert_bytes
    assert expert * 4 == cm.store.expert_bytes
    assert cm.metrics.bytes_moved == cm.metrics.experts_moved * expert > 0
    # a run that switches to the draft mid-run uploads it: its bytes at their own size
    govern = Calibration.govern

    def misjudged(self, cfg):  # calibration says one-token decoding copies nothing and the
        # draft is always accepted: the run drops the draft, then switches back to it
        free = Estimate(0, 1.0, 1e-6, 0.0, 0.0, 0.0, 1e-6)
        sure = dataclasses.replace(self, acceptance=tuple(1.0 for _ in self.acceptance))
        return dataclasses.replace(govern(sure, cfg), plain=free)

    monkeypatch.setattr(Calibration, "govern", misjudged)
    plan = speq.compile(
        model, speq.CompileOptions(policy="speq", draft_memory="separate", k=1, **bf16)
    ).memory
    budget = plan.non_expert_bytes + plan.kv_bytes + plan.draft_bytes + 4 * plan.expert_bytes
    opts = speq.CompileOptions(
        policy="speq", draft_memory="separate", device_memory=budget, host_compute=False, **bf16
    )
    sp = speq.compile(model, opts)  # misses copied (the host would take them off this link)
    sp.generate(prompt, 24)
    m = sp.metrics
    assert m["switched_to_draft_after"] is not None
    assert m.bytes_moved == m.experts_moved * expert + sp.draft_bytes


def test_a_workspace_is_set_aside_from_the_budget():
    model = tiny_model(torch.float64)
    budget = speq_budget(model, 6)
    plain = speq.compile(model, speq.CompileOptions(policy="ondemand", device_memory=budget))
    expert = plain.memory.expert_bytes
    opts = speq.CompileOptions(policy="ondemand", device_memory=budget, workspace_memory=2 * expert)
    reserved = speq.compile(model, opts)
    assert plain.memory.workspace_bytes == 0  # cpu: the budget counts weights and the KV cache
    assert reserved.memory.workspace_bytes == 2 * expert
    assert reserved.memory.slots == plain.memory.slots - 2
    assert reserved.memory.used_bytes <= budget
    with pytest.raises(ValueError, match="workspace_memory"):
        speq.CompileOptions(workspace_memory="lots")


def test_the_gpu_workspace_estimate_grows_with_the_window_and_the_context():
    from speq.runtime.budget import LIBRARY_WORKSPACE_BYTES, workspace_estimate
    from speq.sim.presets import get_preset

    cfg = get_preset("mixtral-8x7b")
    base = workspace_estimate(cfg, 2)
    assert LIBRARY_WORKSPACE_BYTES < base < 2 * 2**30 and base % 2**20 == 0
    assert workspace_estimate(cfg, 2, tokens=33) > base
    longer = dataclasses.replace(cfg, max_seq_len=2 * cfg.max_seq_len)
    assert workspace_estimate(longer, 2) > base
