"""Copy faults and interrupts: a failed host → device copy is retried a bounded number of times
and never leaves an expert marked resident (the injected fault fills the slot with garbage, so
reading it would change the output); a copy that always fails ends the run with TransferError
within seconds; an interrupted run stops its copy thread; either way the compiled model then
generates again, identically."""

import threading
import time

import pytest
import torch

import speq
from helpers import speq_budget, tiny_model
from speq.testing import inject_copy_faults

PROMPT = torch.tensor([[5, 17, 3, 42, 8, 1]])
N = 12
RUNS = [("resident", None), ("ondemand", None), ("nextgate", None), ("oracle", None),
        ("speq", 3), ("speq", None)]  # fmt: skip


@pytest.fixture(scope="module")
def model():
    return tiny_model(torch.float64, num_layers=3)


@pytest.fixture(scope="module")
def expected(model):
    return speq.compile(model).generate(PROMPT, N)


def _compile(model, policy, k, backend):
    budget = None if policy == "resident" else speq_budget(model, 4)
    opts = speq.CompileOptions(
        policy=policy, k=k, device_memory=budget, backend=backend, link_gbps=0.05
    )
    return speq.compile(model, opts)


def _speq_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("speq")]


@pytest.mark.parametrize("backend", ["sim", "cpu"])
@pytest.mark.parametrize("policy,k", RUNS)
def test_copies_failing_at_20_percent_are_retried_and_the_output_is_unchanged(
    model, expected, policy, k, backend
):
    cm = _compile(model, policy, k, backend)
    with inject_copy_faults(0.2, seed=1) as faults:
        assert torch.equal(cm.generate(PROMPT, N), expected)
    m = cm.metrics
    # faults hit the prefill's copies too, which the decode's metrics do not count
    assert m.copy_retries <= faults.injected and (m.copy_retries > 0) <= (m.experts_moved > 0)
    assert (faults.injected > 0) == (policy != "resident")  # resident copies nothing
    assert not _speq_threads()


@pytest.mark.parametrize("backend", ["sim", "cpu"])
@pytest.mark.parametrize("policy,k", RUNS[1:])
def test_copies_that_always_fail_raise_transfer_error_and_the_model_recovers(
    model, expected, policy, k, backend
):
    cm = _compile(model, policy, k, backend)
    t0 = time.perf_counter()
    with inject_copy_faults(1.0), pytest.raises(speq.TransferError, match=r"layer \d+, expert \d+"):
        cm.generate(PROMPT, N)
    assert time.perf_counter() - t0 < 10
    assert not _speq_threads()
    assert torch.equal(cm.generate(PROMPT, N), expected)


@pytest.mark.parametrize("policy,k", [("ondemand", None), ("speq", 3), ("speq", None)])
def test_an_interrupted_generate_leaves_the_model_usable(model, expected, policy, k):
    cm = _compile(model, policy, k, "cpu")
    seen = []

    def interrupt(token: int) -> None:
        seen.append(token)
        if len(seen) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cm.generate(PROMPT, N, callback=interrupt)
    assert len(seen) == 3 and not _speq_threads()
    assert torch.equal(cm.generate(PROMPT, N), expected)


def test_fault_rates_outside_0_1_are_refused():
    with pytest.raises(ValueError, match=r"\[0, 1\]"), inject_copy_faults(1.5):
        pass
