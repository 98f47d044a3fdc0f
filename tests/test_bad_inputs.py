"""Every bad input is refused before any work with one error that names the option or argument,
the bad value and what is accepted: a ValueError, or a TypeError for a wrong type. (The command
line's and the checkpoint folder's bad inputs are in test_errors_cli.py.)"""

import pytest
import torch

import speq
from helpers import tiny_model

OPTIONS = [  # (CompileOptions fields, error type, message fragment)
    (dict(policy="fastest"), ValueError, r"policy = 'fastest': expected one of \('speq'"),
    (dict(policy=None), ValueError, r"policy = None"),
    (dict(backend="tpu"), ValueError, r"backend = 'tpu': expected one of \('cpu', 'sim'"),
    (dict(profile="a100"), ValueError, r"profile = 'a100': expected one of"),
    (dict(cache_allocation="lru"), ValueError, r"cache_allocation = 'lru'"),
    (dict(eviction="fifo"), ValueError, r"eviction = 'fifo': expected one of"),
    (dict(policy="ondemand", eviction="lookahead"), ValueError, "knows the future"),
    (dict(link_gbps="fast"), TypeError, r"link_gbps must be a number \(GB/s\) or None, got 'fast'"),
    (dict(link_gbps=0), ValueError, r"link_gbps must be > 0 \(GB/s\), got 0"),
    (dict(link_gbps=float("inf")), ValueError, r"link_gbps must be > 0"),
    (dict(link_gbps=True), TypeError, r"link_gbps must be a number"),
    (dict(link_latency_us=-1), ValueError, r"link_latency_us must be >= 0 \(microseconds\)"),
    (dict(link_latency_us="1us"), TypeError, r"link_latency_us must be a number"),
    (dict(ttft_budget_ms=-5), ValueError, r"ttft_budget_ms must be > 0 \(milliseconds\), got -5"),
    (dict(ttft_budget_ms="500"), TypeError, r"ttft_budget_ms must be a number"),
    (dict(device_memory=-1), ValueError, "device_memory must be positive"),
    (dict(device_memory="12 parsecs"), ValueError, "cannot read device_memory '12 parsecs'"),
    (dict(device_memory=1.5e9), ValueError, "device_memory must be bytes"),
    (dict(policy="speq", k=0), ValueError, r"k must be an int >= 1, got 0"),
    (dict(policy="speq", k=2.0), ValueError, r"k must be an int >= 1, got 2.0"),
    (dict(policy="ondemand", k=2), ValueError, "k applies to policy='speq' only"),
    (dict(predictor="psychic"), ValueError, r"predictor = 'psychic'"),
    (dict(policy="ondemand", predictor="oracle"), ValueError, "predictor applies to policy='speq'"),
    (dict(draft_bits=3), ValueError, r"draft_bits must be 4 or 8, got 3"),
    (dict(draft_group_size=0), ValueError, r"draft_group_size must be an int >= 1, got 0"),
    (dict(dtype="float32"), TypeError, r"dtype must be a floating torch.dtype or None"),
    (dict(memory_dtype=torch.int8), ValueError, r"memory_dtype must be a floating torch.dtype"),
    (dict(cuda_graphs="yes"), TypeError, r"cuda_graphs must be a bool"),
    (dict(trace_path="/no/such/folder/trace.json"), ValueError, r"folder '/no/such/folder'"),
    (dict(trace_path=3), TypeError, r"trace_path must be a path or None"),
]


@pytest.mark.parametrize(("fields", "error", "message"), OPTIONS)
def test_compile_options_name_the_bad_value(fields, error, message):
    with pytest.raises(error, match=message):
        speq.CompileOptions(**fields)


def test_a_read_only_trace_folder_is_refused_before_any_work(tmp_path, monkeypatch):
    """(Root writes into any folder, so the folder's permission is what os.access reports.)"""
    import speq.runtime.options as options

    monkeypatch.setattr(options.os, "access", lambda path, mode: False)
    with pytest.raises(ValueError, match="is not writable"):
        speq.CompileOptions(trace_path=str(tmp_path / "trace.json"))


GENERATE = [  # (input_ids, generate keyword arguments, error type, message fragment)
    ([1, 2], {}, ValueError, "input_ids must be a torch.Tensor, got list"),
    (torch.tensor([1, 2]), {"max_new_tokens": 2.5}, TypeError, r"max_new_tokens must be an int"),
    (torch.tensor([1, 2]), {"max_new_tokens": True}, TypeError, r"max_new_tokens must be an int"),
    (torch.tensor([1, 2]), {"do_sample": "yes"}, TypeError, "do_sample must be a bool"),
    (torch.tensor([1, 2]), {"do_sample": True, "temperature": "hot"}, TypeError, "temperature"),
    (
        torch.tensor([1, 2]),
        {"do_sample": True, "temperature": float("nan")},
        ValueError,
        "temperature must be > 0",
    ),
    (torch.tensor([1, 2]), {"do_sample": True, "top_k": 0}, ValueError, "top_k must be >= 1"),
    (torch.tensor([1, 2]), {"do_sample": True, "top_k": 2.5}, TypeError, "top_k must be an int"),
    (torch.tensor([1, 2]), {"do_sample": True, "seed": "x"}, TypeError, "seed must be an int"),
    (torch.tensor([1, 2]), {"callback": 3}, TypeError, "callback must be callable"),
    (torch.tensor([-1, 2]), {}, ValueError, r"must lie in \[0, 61\)"),
]


@pytest.mark.parametrize(("ids", "kwargs", "error", "message"), GENERATE)
def test_generate_names_the_bad_argument(ids, kwargs, error, message):
    cm = speq.compile(tiny_model(torch.float32))
    with pytest.raises(error, match=message):
        cm.generate(ids, **{"max_new_tokens": 4, **kwargs})
    assert cm.metrics is None  # refused before any work


def test_a_trace_is_written_where_asked(tmp_path):
    path = tmp_path / "trace.json"
    opts = speq.CompileOptions(policy="ondemand", trace_path=str(path), backend="sim")
    speq.compile(tiny_model(torch.float64), opts).generate(torch.tensor([[1, 2, 3]]), 3)
    assert path.stat().st_size > 0
