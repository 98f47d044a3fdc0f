import pytest
import torch

import speq
from helpers import VARIANTS, eager_greedy, tiny_model


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_greedy_generate_equals_eager_greedy(variant):
    model = tiny_model(torch.float64, **VARIANTS[variant])
    ids = torch.tensor([[5, 17, 3, 42, 8]])
    out = speq.compile(model).generate(ids, max_new_tokens=24)
    assert out.dtype == torch.int64 and out.shape == (1, 29)
    assert torch.equal(out, eager_greedy(model, ids, 24))


def test_one_token_prompt_and_zero_new_tokens():
    model = tiny_model(torch.float64)
    cm = speq.compile(model)
    assert torch.equal(cm.generate(torch.tensor([7]), 0), torch.tensor([[7]]))
    assert torch.equal(
        cm.generate(torch.tensor([[7]]), 5), eager_greedy(model, torch.tensor([[7]]), 5)
    )


def test_compile_with_a_different_compute_dtype():
    model = tiny_model(torch.float32)
    cm = speq.compile(model, speq.CompileOptions(dtype=torch.float64))
    assert cm.spec.dtype == torch.float64
    assert cm.graph.find(speq.ir.Op.EMBED)[0].out.dtype == "f64"


def test_sampling_is_reproducible_and_follows_the_seed():
    cm = speq.compile(tiny_model(torch.float64))
    ids = torch.tensor([[1, 2, 3]])
    a = cm.generate(ids, 30, do_sample=True, temperature=1.5, seed=11)
    b = cm.generate(ids, 30, do_sample=True, temperature=1.5, seed=11)
    c = cm.generate(ids, 30, do_sample=True, temperature=1.5, seed=12)
    assert torch.equal(a, b) and not torch.equal(a, c)
    # top_k=1 sampling is greedy
    greedy = cm.generate(ids, 10)
    assert torch.equal(cm.generate(ids, 10, do_sample=True, top_k=1, seed=3), greedy)
    # a tiny top_p keeps only the most likely token: greedy again
    assert torch.equal(cm.generate(ids, 10, do_sample=True, top_p=1e-9, seed=3), greedy)


def test_graphs_print_as_canonical_text():
    cm = speq.compile(tiny_model(torch.float32))
    text = str(cm.graphs)
    assert text.startswith("# after capture")
    assert str(cm.graphs["capture"]) in text
    assert cm.graphs.names()[0] == "capture"


@pytest.mark.parametrize(
    ("ids", "kwargs", "message"),
    [
        (torch.tensor([[1.0, 2.0]]), {}, "int64"),
        (torch.tensor([[1, 2], [3, 4]]), {}, r"shape \[1, T\] or \[T\]"),
        (torch.tensor([1, 61]), {}, r"\[0, 61\)"),
        (torch.tensor([], dtype=torch.int64), {}, "empty"),
        (
            torch.tensor([1, 2]),
            {"max_new_tokens": 63},
            r"65 exceeds the model's max_seq_len \(64, the context it was compiled for",
        ),
        (torch.tensor([1, 2]), {"max_new_tokens": -1}, "max_new_tokens"),
        (torch.tensor([1, 2]), {"do_sample": True, "temperature": 0.0}, "temperature"),
        (torch.tensor([1, 2]), {"do_sample": True, "top_p": 1.5}, "top_p"),
    ],
)
def test_bad_input_says_what_was_expected(ids, kwargs, message):
    cm = speq.compile(tiny_model(torch.float32))
    with pytest.raises(ValueError, match=message):
        cm.generate(ids, **{"max_new_tokens": 4, **kwargs})


def test_compile_rejects_what_it_cannot_compile():
    with pytest.raises(TypeError, match="MoEForCausalLM"):
        speq.compile(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="CompileOptions"):
        speq.compile(tiny_model(), {"policy": "speq"})


def test_importing_speq_leaves_triton_unimported():
    """Triton reads TRITON_INTERPRET when a kernel is decorated, and importing Triton decorates
    its own triton.language helpers, so ``import speq`` imports neither Triton nor speq's
    ``@triton.jit`` modules (the kernel tests set the variable after): setting the variable after
    ``import speq`` still runs a kernel in the interpreter."""
    import subprocess
    import sys

    code = (
        "import sys, speq; "
        "print(sorted(m for m in sys.modules if m.startswith('triton') or m.endswith('_kernels')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    code = (
        "import os, torch, speq; from speq.kernels import route_topk; "
        "os.environ['TRITON_INTERPRET'] = '1'; "
        "ids, w = route_topk(torch.randn(3, 8), 2, backend='triton'); print(ids.tolist())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and len(eval(out.stdout)) == 3, out.stderr


def test_the_kv_cache_holds_the_compiled_context():
    """A model declaring a long context gets a KV cache of DEFAULT_MAX_SEQ_LEN tokens unless
    CompileOptions.max_seq_len asks for another (never more than the model's own)."""
    from speq.runtime.options import DEFAULT_MAX_SEQ_LEN

    model = tiny_model(torch.float64, max_seq_len=8192)
    assert speq.compile(model).config.max_seq_len == DEFAULT_MAX_SEQ_LEN
    cm = speq.compile(model, speq.CompileOptions(max_seq_len=32))
    assert cm.config.max_seq_len == 32 and cm.memory.kv_bytes < speq.compile(model).memory.kv_bytes
    ids = torch.tensor([[1, 2, 3]])
    assert torch.equal(cm.generate(ids, 8), eager_greedy(model, ids, 8))
    with pytest.raises(ValueError, match=r"max_seq_len \(32, the context it was compiled for"):
        cm.generate(ids, 30)
    with pytest.raises(ValueError, match=r"max_seq_len = 9000 exceeds the model's context \(8192"):
        speq.compile(model, speq.CompileOptions(max_seq_len=9000))
    with pytest.raises(ValueError, match=r"CompileOptions.max_seq_len must be an int >= 1"):
        speq.CompileOptions(max_seq_len=0)
