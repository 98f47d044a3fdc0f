"""KernelConfig, the analytic default, the JSON config files and lookup, and ``speq tune``'s
entry point on a machine without CUDA."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from speq.kernels import PRESETS, KernelConfig, default_config, get_config
from speq.kernels._triton import TRITON_VERSION
from speq.kernels.autotune import (
    DEFAULT_BUCKETS,
    config_path,
    load_configs,
    nearest_bucket,
    search_space,
    tune_main,
    weight_format,
    write_configs,
)
from speq.kernels.shapes import get_shape


@pytest.mark.parametrize("name", list(PRESETS))
def test_default_config_is_valid_and_pure(name: str) -> None:
    s = PRESETS[name]
    for t in DEFAULT_BUCKETS:
        args = (t, s.num_experts, s.top_k, s.intermediate, s.hidden)
        cfg = default_config(*args)
        assert cfg == default_config(*args)  # a pure function of its arguments
        assert cfg.block_m <= 128 and cfg.split_k >= 1
        assert cfg.align == ("direct" if t == 1 else "sorted")
    decode = default_config(1, s.num_experts, s.top_k, s.intermediate, s.hidden)
    prefill = default_config(4096, s.num_experts, s.top_k, s.intermediate, s.hidden)
    assert decode.block_m == 16 and prefill.block_m > decode.block_m


def test_default_config_fits_small_and_quantized_shapes() -> None:
    cfg = default_config(3, 5, 2, 40, 33)
    assert cfg.block_n <= 64 and cfg.block_k <= 64 and cfg.split_k == 1
    assert default_config(1, 8, 2, 14336, 4096, group_size=32).block_k == 32


@pytest.mark.parametrize(
    "bad",
    [dict(block_m=24), dict(block_n=8), dict(split_k=0), dict(align="x"), dict(num_warps=3)],
)
def test_config_validation(bad: dict) -> None:
    with pytest.raises(ValueError):
        KernelConfig(**bad)


def test_search_space() -> None:
    tiny = search_space(1, 2)
    big = search_space(1024, 2)
    assert tiny and big and len(set(tiny)) == len(tiny)
    assert {c.split_k for c in tiny} > {1} and {c.split_k for c in big} == {1}
    assert {c.align for c in tiny} == {"sorted", "direct"}
    assert max(c.block_m for c in tiny) == 16 and max(c.block_m for c in big) == 128
    assert all(c.block_k <= 64 for c in search_space(8, 2, group_size=64))


def test_nearest_bucket() -> None:
    assert nearest_bucket([1, 2, 4, 8, 16, 64], 5) == 4
    assert nearest_bucket([1, 2, 4, 8, 16, 64], 6) == 4  # tie: the smaller bucket
    assert nearest_bucket([1, 2, 4, 8, 16, 64], 1000) == 64
    assert nearest_bucket([16], 1) == 16


def test_json_round_trip_and_lookup(tmp_path) -> None:
    tuned = {
        1: KernelConfig(block_m=16, block_n=32, block_k=128, split_k=4, align="direct"),
        64: KernelConfig(block_m=64, block_n=128, block_k=64, group_m=8, num_stages=4),
    }
    fmt = weight_format(torch.bfloat16)
    path = config_path(8, 14336, 4096, fmt, "NVIDIA H100 80GB HBM3", TRITON_VERSION, tmp_path)
    assert path.name == (
        f"E=8,N=14336,K=4096,dtype=bfloat16,device=NVIDIA_H100_80GB_HBM3,triton={TRITON_VERSION}.json"
    )
    write_configs(path, tuned, {"model": "mixtral-8x7b"})
    assert json.loads(path.read_text())["meta"]["model"] == "mixtral-8x7b"
    assert load_configs(path) == tuned
    assert load_configs(tmp_path / "missing.json") == {}

    def lookup(t: int, **kw) -> KernelConfig:
        return get_config(
            t, 8, 2, 14336, 4096, torch.bfloat16, device_name="NVIDIA H100 80GB HBM3",
            config_dir=tmp_path, **kw,
        )  # fmt: skip

    assert lookup(2) == tuned[1] and lookup(40) == tuned[64]
    assert lookup(40, overrides={"split_k": 2}) == dataclasses.replace(tuned[64], split_k=2)
    other_device = get_config(2, 8, 2, 14336, 4096, torch.bfloat16, device_name="other")
    assert other_device == default_config(2, 8, 2, 14336, 4096)


def test_weight_format() -> None:
    assert weight_format(torch.float16) == "float16"
    assert weight_format(torch.bfloat16, 4, 128) == "bfloat16-int4g128"


def test_shapes_table() -> None:
    assert get_shape("Mixtral-8x7B").intermediate == 14336
    assert {s.top_k for s in PRESETS.values()} == {2, 4, 6}
    with pytest.raises(ValueError, match="known:"):
        get_shape("gpt-4")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message printed without CUDA")
def test_tune_main_without_cuda(capsys) -> None:
    assert tune_main(["--model", "mixtral-8x7b"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "CUDA" in out[0]


@pytest.mark.parametrize("argv", [["--E", "8"], ["--model", "nope"]])
def test_tune_main_rejects_bad_arguments(argv: list[str]) -> None:
    with pytest.raises(SystemExit):
        tune_main(argv)
