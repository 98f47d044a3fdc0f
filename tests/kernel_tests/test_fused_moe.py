"""fused_moe (Triton and the CPU torch path) against the fp32 reference, on a case table of
edge cases, plus the buffer contract (padding rows untouched) and the slot table."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from speq.kernels import KernelConfig, align_experts, fused_moe, fused_moe_torch
from speq.kernels.activation import Activation
from speq.kernels.fused_moe import _check_inputs, _fused_moe_triton

from .kernel_cases import TRITON_DEVICE, MoECase, assert_close, make_inputs, params, supports

F16, BF16, F64 = torch.float16, torch.bfloat16, torch.float64
# one tile at these sizes (fast to interpret), and several tiles and K steps:
WIDE = KernelConfig(block_m=16, block_n=64, block_k=64)
SMALL = KernelConfig(block_m=16, block_n=16, block_k=16)

CASES = [
    MoECase("t1-decode-direct", T=1, H=33, I=40, E=5, k=2, config=WIDE),
    MoECase("t1-sorted-fp16", T=1, H=33, I=40, E=5, k=2, dtype=F16, config=WIDE),
    MoECase("t2-prime-E7-k1-fp16", T=2, H=24, I=20, E=7, k=1, dtype=F16),
    MoECase("t3-k-eq-E", T=3, H=20, I=24, E=3, k=3, config=WIDE),
    MoECase("t7-empty-expert-pool", T=7, H=33, I=40, E=5, k=2, routing="skip:2", pool=3, permute=True),
    MoECase("t16-all-to-one-expert", T=16, H=32, I=32, E=4, k=1, routing="one"),
    MoECase("t33-one-expert-3-blocks-fp16", T=33, H=17, I=18, E=3, k=1, routing="one", dtype=F16),
    MoECase(
        "t33-small-tiles-group-m", T=33, H=47, I=36, E=7, k=2, dtype=F16, pool=4, permute=True,
        config=dataclasses.replace(SMALL, group_m=4),
    ),
    MoECase("t7-split-k", T=7, H=33, I=48, E=5, k=2, config=dataclasses.replace(SMALL, split_k=2)),
    MoECase("t7-deterministic", T=7, H=33, I=40, E=5, k=2, pool=2, permute=True, deterministic=True),
    MoECase(
        "t16-deterministic-bm32-fp16", T=16, H=24, I=40, E=5, k=3, dtype=F16, deterministic=True,
        config=KernelConfig(block_m=32, block_n=64, block_k=64),
    ),
    # bf16 runs in the interpreter with the dot operands upcast (see _fused_moe_kernels.py)
    MoECase("t7-bf16", T=7, H=33, I=40, E=5, k=2, dtype=BF16, pool=1, permute=True),
    MoECase(
        "t7-deterministic-bf16", T=7, H=33, I=40, E=5, k=2, dtype=BF16, pool=2, permute=True,
        deterministic=True,
    ),
    MoECase("t7-fp64", T=7, H=33, I=40, E=5, k=2, dtype=F64, pool=1, permute=True),
    MoECase("t33-fp64-k-eq-E", T=33, H=9, I=11, E=3, k=3, dtype=F64),
    # weight-only quantized: (bits w13, bits w2, group size)
    MoECase(
        "int4-g16-scale-after-dot", T=7, H=33, I=40, E=5, k=2, quant=(4, 4, 16),
        config=KernelConfig(block_m=16, block_n=64, block_k=16),
    ),
    MoECase(
        "int4-g16-split-k", T=2, H=20, I=64, E=3, k=2, quant=(4, 4, 16),
        config=KernelConfig(block_m=16, block_n=32, block_k=16, split_k=2),
    ),
    MoECase("int8-g8-per-element-fp16", T=3, H=33, I=40, E=5, k=2, dtype=F16, quant=(8, 8, 8)),
    MoECase("int4-g7-odd-sizes", T=2, H=33, I=21, E=3, k=2, quant=(4, 4, 7), pool=2, permute=True),
    MoECase("int4-w13-only-g128", T=16, H=48, I=40, E=5, k=2, quant=(4, 0, 128)),
    MoECase(
        "int4-t1-direct-fp16", T=1, H=64, I=32, E=4, k=2, dtype=F16, quant=(4, 4, 32),
        config=KernelConfig(block_m=16, block_n=32, block_k=32, align="direct"),
    ),
    MoECase("int8-w2-only-bf16", T=7, H=33, I=40, E=5, k=2, dtype=BF16, quant=(0, 8, 16)),
    MoECase(
        "int4-g16-split-k-bf16", T=5, H=33, I=40, E=4, k=2, dtype=BF16, quant=(4, 4, 16),
        config=KernelConfig(block_m=16, block_n=32, block_k=16, split_k=2),
    ),
    MoECase("int4-fp64", T=3, H=33, I=21, E=3, k=2, dtype=F64, quant=(4, 4, 8)),
]  # fmt: skip


def _run(case: MoECase, backend: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    inputs = make_inputs(case, device)
    ref = fused_moe_torch(**inputs)
    out = fused_moe(**inputs, deterministic=case.deterministic, config=case.config, backend=backend)
    return out, ref


@pytest.mark.parametrize("case", params(CASES, "triton"))
def test_triton_matches_reference(case: MoECase) -> None:
    out, ref = _run(case, "triton", TRITON_DEVICE)
    assert out.dtype == case.dtype and out.shape == (case.T, case.H)
    assert_close(out, ref, case.dtype)


@pytest.mark.parametrize("case", params(CASES, "torch"))
def test_torch_path_matches_reference(case: MoECase) -> None:
    out, ref = _run(case, "torch", torch.device("cpu"))
    assert out.dtype == case.dtype and out.shape == (case.T, case.H)
    assert_close(out, ref, case.dtype)


def test_reference_matches_dense_formula() -> None:
    """The reference itself against the formula written out per (token, choice)."""
    case = MoECase("formula", T=3, H=5, I=4, E=4, k=2, dtype=F64, pool=2, permute=True)
    inp = make_inputs(case, torch.device("cpu"))
    x, w13, w2 = inp["hidden"], inp["w13"], inp["w2"]
    expected = torch.zeros(case.T, case.H, dtype=F64)
    for t in range(case.T):
        for j in range(case.k):
            s = int(inp["slot_of_expert"][int(inp["topk_ids"][t, j])])
            gate, up = w13[s, : case.I] @ x[t], w13[s, case.I :] @ x[t]
            y = w2[s] @ (gate * torch.sigmoid(gate) * up)
            expected[t] += inp["topk_weights"][t, j].double() * y
    torch.testing.assert_close(fused_moe_torch(**inp), expected, atol=1e-12, rtol=1e-12)


TRITON_ONLY = pytest.mark.skipif(
    supports(MoECase("probe", 1, 1, 1, 1, 1), "triton") is not None,
    reason=str(supports(MoECase("probe", 1, 1, 1, 1, 1), "triton")),
)


@TRITON_ONLY
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
def test_padding_rows_and_columns_never_written(deterministic: bool) -> None:
    """Buffers one row and three columns larger than needed, filled with NaN: the kernels write
    exactly the valid (pair or token) x column region. The extra row is where the padding
    sentinel (pair T*k, token T) would land if a mask were missing."""
    case = MoECase("pad", T=7, H=33, I=40, E=5, k=2, pool=2, permute=True)
    inp = make_inputs(case, TRITON_DEVICE)
    dims = _check_inputs(**inp)
    plan = align_experts(inp["topk_ids"], case.E, WIDE.block_m)
    pairs = case.T * case.k
    assert (plan.sorted_pair_ids == pairs).sum() > 0, "the plan must contain padding rows"
    nan = float("nan")
    inter_buf = torch.full((pairs + 1, case.I + 3), nan, device=TRITON_DEVICE)
    rows = pairs if deterministic else case.T
    acc_buf = torch.full((rows + 1, case.H + 3), nan, device=TRITON_DEVICE)
    if not deterministic:
        acc_buf[: case.T, : case.H] = 0.0
    out = _fused_moe_triton(
        **inp, dims=dims, config=WIDE, deterministic=deterministic, plan=plan,
        intermediate=inter_buf[:, : case.I], accum=acc_buf,
    )  # fmt: skip
    assert_close(out, fused_moe_torch(**inp), case.dtype)
    assert torch.isfinite(inter_buf[:pairs, : case.I]).all()
    assert torch.isnan(inter_buf[pairs]).all() and torch.isnan(inter_buf[:, case.I :]).all()
    assert torch.isfinite(acc_buf[:rows, : case.H]).all()
    assert torch.isnan(acc_buf[rows]).all() and torch.isnan(acc_buf[:, case.H :]).all()


@TRITON_ONLY
def test_slot_table_and_pool_change_in_place() -> None:
    """An expert cache rewrites pool slots and the slot table between calls; the same tensors
    (as a captured graph would hold them) give the new experts' result."""
    case = MoECase("cache", T=5, H=20, I=24, E=4, k=2, pool=2, permute=True)
    inp = make_inputs(case, TRITON_DEVICE)
    first = fused_moe(**inp, config=WIDE, backend="triton")
    assert_close(first, fused_moe_torch(**inp), case.dtype)
    # Move every expert to another slot and put fresh weights where it was.
    w13, w2, slots = inp["w13"], inp["w2"], inp["slot_of_expert"]
    new_slots = torch.roll(slots, 1)
    w13_old, w2_old = w13.clone(), w2.clone()
    w13.normal_().mul_(0.2)
    w2.normal_().mul_(0.2)
    w13[new_slots.long()] = w13_old[slots.long()]
    w2[new_slots.long()] = w2_old[slots.long()]
    slots.copy_(new_slots)
    again = fused_moe(**inp, config=WIDE, backend="triton")
    assert_close(again, first, case.dtype)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_absent_experts_marked_minus_one_are_never_read(backend: str) -> None:
    """An expert cache marks experts that are not resident with slot -1; as long as no pair
    routes to them, the kernels neither read nor reject them."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 16, generator=g)
    w13 = torch.randn(4, 32, 16, generator=g) * 0.1
    w2 = torch.randn(4, 16, 16, generator=g) * 0.1
    ids = torch.tensor([[1, 3], [3, 1], [1, 1], [3, 3], [1, 3]], dtype=torch.int32)
    w = torch.rand(5, 2, generator=g)
    slots = torch.tensor([-1, 2, -1, 0, -1, -1], dtype=torch.int32)
    dev = TRITON_DEVICE if backend == "triton" else "cpu"
    args = [t.to(dev) for t in (x, w13, w2, ids, w, slots)]
    out = fused_moe(*args, config=WIDE, backend=backend)
    assert_close(out.cpu(), fused_moe_torch(x, w13, w2, ids, w, slots), torch.float32)
    if dev == "cpu" or getattr(dev, "type", "") == "cpu":  # values are checked on the CPU only
        with pytest.raises(ValueError, match="every routed expert"):
            fused_moe(*args[:3], args[3].clone().fill_(0), *args[4:], backend=backend)


@TRITON_ONLY
def test_deterministic_combine_is_bitwise_repeatable() -> None:
    case = MoECase("det", T=6, H=20, I=24, E=3, k=3, dtype=torch.float16)
    inp = make_inputs(case, TRITON_DEVICE)
    runs = [fused_moe(**inp, deterministic=True, config=WIDE, backend="triton") for _ in range(2)]
    assert torch.equal(runs[0], runs[1])
    atomic = fused_moe(**inp, config=WIDE, backend="triton")
    assert_close(atomic, runs[0], case.dtype)


def test_auto_backend_on_cpu_is_the_torch_path() -> None:
    case = MoECase("auto", T=4, H=12, I=8, E=3, k=2)
    inp = make_inputs(case, torch.device("cpu"))
    assert torch.equal(fused_moe(**inp), fused_moe(**inp, backend="torch"))


def test_empty_batch() -> None:
    case = MoECase("empty", T=0, H=12, I=8, E=3, k=2)
    inp = make_inputs(case, torch.device("cpu"))
    for backend in ("torch", "auto"):
        assert fused_moe(**inp, backend=backend).shape == (0, 12)
    assert fused_moe_torch(**inp).shape == (0, 12)


def _bad(**changes: object) -> dict[str, object]:
    inp = make_inputs(MoECase("bad", T=3, H=8, I=6, E=4, k=2, pool=1), torch.device("cpu"))
    inp.update(changes)
    return inp


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        (dict(hidden=torch.randn(3, 7)), "w13 must be"),
        (dict(hidden=torch.randn(3, 8, 1)), "hidden must be"),
        (dict(w2=torch.randn(5, 8, 5)), "w2 must be"),
        (dict(w13=torch.randn(5, 12, 8, dtype=torch.float64)), "dtype"),
        (dict(topk_ids=torch.zeros(2, 2, dtype=torch.int32)), "topk_ids must be"),
        (dict(topk_ids=torch.zeros(3, 2)), "int32 or int64"),
        (dict(topk_ids=torch.full((3, 2), 4, dtype=torch.int32)), r"\[0, E=4\)"),
        (dict(topk_weights=torch.ones(3, 3)), "topk_weights must match"),
        (dict(slot_of_expert=torch.tensor([0, 1, 2, 5], dtype=torch.int32)), r"\[0, S=5\)"),
        (dict(slot_of_expert=torch.zeros(4)), "slot_of_expert must be"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_bad_inputs_raise_clear_errors(changes: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        fused_moe(**_bad(**changes), backend="torch")


def test_triton_backend_refuses_float64() -> None:
    inp = make_inputs(MoECase("f64", T=2, H=8, I=6, E=3, k=2, dtype=F64), torch.device("cpu"))
    with pytest.raises(ValueError, match=r"the Triton kernel supports dtypes .* got \['float64'\]"):
        fused_moe(**inp, backend="triton")  # on any device: the dtype is checked first


def test_unknown_backend() -> None:
    with pytest.raises(ValueError, match="backend must be one of"):
        fused_moe(**_bad(), backend="cuda")


# ---------------------------------------------------------------- expert biases, GPT-OSS's activation
OAI = Activation("swiglu_oai", alpha=1.702, limit=0.8)  # a limit the test values cross
BIASED = [
    MoECase("bias-oai-t7", T=7, H=33, I=40, E=5, k=2, pool=2, permute=True, config=WIDE),
    MoECase("bias-oai-split-k", T=7, H=33, I=48, E=5, k=2, config=dataclasses.replace(SMALL, split_k=2)),
    MoECase("bias-oai-int4", T=7, H=33, I=40, E=5, k=2, quant=(4, 4, 16), config=KernelConfig(block_m=16, block_n=64, block_k=16)),
    MoECase("bias-oai-deterministic-fp16", T=5, H=24, I=40, E=4, k=2, dtype=F16, deterministic=True),
    MoECase("bias-oai-fp64", T=7, H=33, I=40, E=5, k=2, dtype=F64, pool=1, permute=True),
]  # fmt: skip


def _biased(case: MoECase, device: torch.device) -> dict:
    inp = make_inputs(case, device)
    gen = torch.Generator().manual_seed(99)
    b13 = torch.randn(case.E, 2 * case.I, generator=gen).to(case.dtype).to(device)
    b2 = torch.randn(case.E, case.H, generator=gen).to(case.dtype).to(device)
    return inp | dict(b13=b13, b2=b2, activation=OAI)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("case", BIASED, ids=str)
def test_expert_biases_and_the_clamped_activation_match_the_reference(case, backend) -> None:
    if reason := supports(case, backend):
        pytest.skip(reason)
    device = TRITON_DEVICE if backend == "triton" else torch.device("cpu")
    inp = _biased(case, device)
    ref = fused_moe_torch(**inp)
    extra = (
        dict(deterministic=case.deterministic, config=case.config) if backend == "triton" else {}
    )
    out = fused_moe(**inp, backend=backend, **extra)
    assert_close(out, ref, case.dtype)


def test_the_biased_reference_is_the_formula() -> None:
    """GPT-OSS's experts written out per (token, choice): biases by expert id (not slot), the gate
    clamped above, the up clamped both ways, and (up + 1)."""
    case = MoECase("formula-oai", T=3, H=5, I=4, E=4, k=2, dtype=F64, pool=2, permute=True)
    inp = _biased(case, torch.device("cpu"))
    x, w13, w2, b13, b2 = (inp[n] for n in ("hidden", "w13", "w2", "b13", "b2"))
    expected = torch.zeros(case.T, case.H, dtype=F64)
    for t in range(case.T):
        for j in range(case.k):
            e = int(inp["topk_ids"][t, j])
            s = int(inp["slot_of_expert"][e])
            gate = (w13[s, : case.I] @ x[t] + b13[e, : case.I]).clamp(max=0.8)
            up = (w13[s, case.I :] @ x[t] + b13[e, case.I :]).clamp(-0.8, 0.8)
            y = w2[s] @ (gate * torch.sigmoid(1.702 * gate) * (up + 1)) + b2[e]
            expected[t] += inp["topk_weights"][t, j].double() * y
    torch.testing.assert_close(fused_moe_torch(**inp), expected, atol=1e-12, rtol=1e-12)
    plain = fused_moe_torch(
        **{k: v for k, v in inp.items() if k not in ("b13", "b2", "activation")}
    )
    assert not torch.allclose(plain, expected)
