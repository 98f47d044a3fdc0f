"""KernelConfig, the analytic default, the JSON config files and lookup, the tuner's search
space, and ``speq tune``'s command line on a machine without CUDA."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from speq.cli import main
from speq.kernels import PRESETS, KernelConfig, MoEShape, default_config, get_config
from speq.kernels._triton import TRITON_VERSION
from speq.kernels.autotune import (
    DEFAULT_BUCKETS,
    config_path,
    load_configs,
    nearest_bucket,
    weight_format,
    write_configs,
)
from speq.kernels.shapes import get_shape
from speq.kernels.tuner import search_space


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
def test_tune_without_cuda(capsys) -> None:
    threads = str(torch.get_num_threads())  # main sets torch's threads: keep them for later tests
    assert main(["--threads", threads, "tune", "--model", "mixtral-8x7b"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "CUDA" in out[0]


@pytest.mark.parametrize("argv", [["--E", "8"], ["--model", "nope"]])
def test_tune_rejects_bad_arguments(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["tune", *argv])
    assert exc.value.code == 2  # argparse's usage error


def test_tune_writes_what_the_tuner_found(tmp_path, monkeypatch, capsys) -> None:
    """The command's GPU path on the CPU: a stand-in tuner, the real file writing and lookup."""
    import speq.kernels.tuner as tuner

    found = {1: (KernelConfig(split_k=2, align="direct"), 12.5), 64: (KernelConfig(), 80.0)}
    seen = {}

    def fake_tune_shape(shape, dtype, buckets, **kw):
        seen.update(shape=shape, dtype=dtype, buckets=buckets, **kw)
        return found

    monkeypatch.setattr(tuner, "tuning_available", lambda: True)
    monkeypatch.setattr(tuner, "tune_shape", fake_tune_shape)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Fake GPU")
    threads = str(torch.get_num_threads())
    argv = ["--threads", threads, "tune", "--E", "8", "--N", "64", "--K", "32", "--top-k", "2"]
    argv += ["--dtype", "fp16", "--bits", "4", "--group-size", "32", "--buckets", "1", "64"]
    assert main([*argv, "--max-candidates", "5", "--out", str(tmp_path)]) == 0
    assert seen["shape"] == MoEShape("custom", num_experts=8, top_k=2, hidden=32, intermediate=64)
    assert seen["dtype"] == torch.float16 and seen["buckets"] == [1, 64]
    assert (seen["bits"], seen["group_size"], seen["max_candidates"]) == (4, 32, 5)
    path = config_path(8, 64, 32, "float16-int4g32", "Fake GPU", TRITON_VERSION, tmp_path)
    assert load_configs(path) == {t: cfg for t, (cfg, _) in found.items()}
    meta = json.loads(path.read_text())["meta"]
    assert meta["model"] == "custom" and meta["us"] == {"1": 12.5, "64": 80.0}
    (line,) = capsys.readouterr().out.strip().splitlines()
    assert line.startswith("custom: 2 buckets in ") and line.endswith(f"-> {path}")
