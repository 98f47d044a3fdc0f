"""Bad input gets one line naming the option or file, the bad value and what is accepted.

The API (speq.load, speq.compile(folder), MoEConfig.load) raises ValueError / FileNotFoundError
with such a message; the command line prints it as ``speq: error: ...`` (exit status 2, no
traceback unless SPEQ_DEBUG=1), and Ctrl-C as ``speq: interrupted`` (130). ``main`` returns 2 for
a command that failed; for a flag argparse refuses it raises SystemExit(2), as argparse does.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import speq
import speq.cli.common
from helpers import VARIANTS, tiny_config
from speq.cli import main
from speq.models import MoEConfig, MoEForCausalLM
from speq.models.checkpoint import expected_shapes
from speq.models.config import _FIELD_TYPES

TINY = tiny_config()  # the tests' smallest model (tests/helpers.py)
SHARD = r"\S*model\.safetensors"  # the shard's path, as an error names it
CORRUPT = rf"corrupt safetensors file {SHARD}"


@pytest.fixture(scope="module")
def valid_checkpoint(tmp_path_factory) -> Path:
    """A valid checkpoint folder of the tiny model, written once; cases damage copies of it."""
    folder = tmp_path_factory.mktemp("valid") / "ckpt"
    MoEForCausalLM(TINY, seed=0).save_pretrained(folder)
    return folder


@pytest.fixture
def checkpoint(valid_checkpoint, tmp_path) -> Path:
    """A fresh copy of the valid checkpoint, for one case to damage."""
    return Path(shutil.copytree(valid_checkpoint, tmp_path / "ckpt"))


# ------------------------------------------------------------------ checkpoint faults
def _state(folder: Path) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in MoEForCausalLM.from_pretrained(folder).state_dict().items()}


def _rewrite_shard(folder: Path, change: Callable[[dict[str, torch.Tensor]], None]) -> None:
    state = _state(folder)
    change(state)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})


def _write(name: str, data: bytes | str) -> Callable[[Path], None]:
    def damage(folder: Path) -> None:
        path = folder / name
        if isinstance(data, str):
            path.write_text(data)
        else:
            path.write_bytes(data)

    return damage


def _edit_config(**changes) -> Callable[[Path], None]:
    def damage(folder: Path) -> None:
        cfg = json.loads((folder / "config.json").read_text())
        cfg.update(changes)
        (folder / "config.json").write_text(json.dumps(cfg))

    return damage


def _shard_bytes(change: Callable[[bytes], bytes]) -> Callable[[Path], None]:
    def damage(folder: Path) -> None:
        shard = folder / "model.safetensors"
        shard.write_bytes(change(shard.read_bytes()))

    return damage


def _drop_config_field(name: str) -> Callable[[Path], None]:
    def damage(folder: Path) -> None:
        cfg = json.loads((folder / "config.json").read_text())
        del cfg[name]
        (folder / "config.json").write_text(json.dumps(cfg))

    return damage


def _replace_folder_with_file(folder: Path) -> None:
    shutil.rmtree(folder)
    folder.write_text("not a folder")


def _wrong_shape(state: dict[str, torch.Tensor]) -> None:
    state["layers.0.attn.wq"] = torch.zeros(16, 32)


# (id, damage, exception, message fragment (a regex)); every one applies to speq.load, to
# speq.compile(folder) and to `speq generate --checkpoint`
CHECKPOINT_FAULTS = [
    ("folder-missing", shutil.rmtree, FileNotFoundError, r"checkpoint folder \S+ does not exist"),
    ("folder-is-a-file", _replace_folder_with_file, ValueError, r"ckpt is not a folder"),
    (
        "config-missing",
        lambda f: (f / "config.json").unlink(),
        FileNotFoundError,
        r"config\.json is missing",
    ),
    (
        "config-empty-object",
        _write("config.json", "{}"),
        ValueError,
        r"config\.json: MoEConfig: missing required field\(s\) vocab_size, hidden_size",
    ),
    (
        "config-missing-one-field",
        _drop_config_field("num_heads"),
        ValueError,
        r"config\.json: MoEConfig: missing required field\(s\) num_heads \(required: ",
    ),
    (
        "config-invalid-json",
        _write("config.json", '{"vocab_size": 61,\n'),
        ValueError,
        r"config\.json is not valid JSON: Expecting property name enclosed in double quotes "
        r"at line 2 column 1",
    ),
    (
        "config-empty-file",
        _write("config.json", ""),
        ValueError,
        r"config\.json is not valid JSON: Expecting value at line 1 column 1",
    ),
    (
        "config-not-utf8",
        _write("config.json", b'{"vocab_size": 6\xff}'),
        ValueError,
        r"config\.json is not UTF-8 text \(byte 0xff at offset 16\)",
    ),
    (
        "config-not-an-object",
        _write("config.json", "[1, 2]"),
        ValueError,
        r"config\.json: MoEConfig: expected a mapping \(a JSON object\).*got an array",
    ),
    (
        "config-wrong-type-str",
        _edit_config(num_layers="four"),
        ValueError,
        r"config\.json: MoEConfig\.num_layers = 'four' has the wrong type: expected an integer, "
        r"got a string",
    ),
    (
        "config-wrong-type-bool",
        _edit_config(num_experts=True),
        ValueError,
        r"MoEConfig\.num_experts = True has the wrong type: expected an integer, got a boolean",
    ),
    (
        "config-wrong-type-float",
        _edit_config(hidden_size=32.0),
        ValueError,
        r"MoEConfig\.hidden_size = 32\.0 has the wrong type: expected an integer, got a float",
    ),
    (
        "config-wrong-type-flag",
        _edit_config(tie_word_embeddings="yes"),
        ValueError,
        r"MoEConfig\.tie_word_embeddings = 'yes' has the wrong type: expected true or false",
    ),
    (
        "config-unknown-field",
        _edit_config(num_expert=4),
        ValueError,
        r"config\.json: MoEConfig: unknown field\(s\) 'num_expert' \(did you mean 'num_experts'\?\)",
    ),
    (
        "config-invalid-value",
        _edit_config(top_k=9),
        ValueError,
        r"config\.json: MoEConfig\.top_k = 9 is invalid: expected <= num_experts \(5\)",
    ),
    (
        "shard-missing",
        lambda f: (f / "model.safetensors").unlink(),
        FileNotFoundError,
        r"model\.safetensors is missing",
    ),
    ("shard-empty", _shard_bytes(lambda b: b""), ValueError, rf"{CORRUPT}.*empty \(0 bytes\)"),
    ("shard-truncated", _shard_bytes(lambda b: b[:-100]), ValueError, CORRUPT),
    ("shard-truncated-in-header", _shard_bytes(lambda b: b[:50]), ValueError, CORRUPT),
    ("shard-shorter-than-8-bytes", _shard_bytes(lambda b: b[:5]), ValueError, CORRUPT),
    (
        "shard-corrupt-header",
        _shard_bytes(lambda b: b[:8] + b"\xff" * 40 + b[48:]),
        ValueError,
        CORRUPT,
    ),
    (
        "shard-huge-header-length",
        _shard_bytes(lambda b: (10**12).to_bytes(8, "little") + b[8:]),
        ValueError,
        CORRUPT,
    ),
    (
        "tensor-missing",
        lambda f: _rewrite_shard(f, lambda s: s.pop("layers.1.mlp.w2")),
        ValueError,
        rf"{SHARD} lacks tensor\(s\) 'layers\.1\.mlp\.w2' that \S*config\.json requires",
    ),
    (
        "tensor-wrong-shape",
        lambda f: _rewrite_shard(f, _wrong_shape),
        ValueError,
        rf"{SHARD}: tensor 'layers\.0\.attn\.wq' has shape \[16, 32\], but \S*config\.json "
        r"requires \[32, 32\]",
    ),
]
FAULT_IDS = [c[0] for c in CHECKPOINT_FAULTS]


@pytest.mark.parametrize(("name", "damage", "error", "fragment"), CHECKPOINT_FAULTS, ids=FAULT_IDS)
@pytest.mark.parametrize("loader", ["speq.load", "speq.compile"])
def test_a_checkpoint_fault_is_named_by_the_api(checkpoint, loader, name, damage, error, fragment):
    damage(checkpoint)
    load = speq.load if loader == "speq.load" else speq.compile
    with pytest.raises(error, match=fragment):
        load(str(checkpoint))


@pytest.mark.parametrize(("name", "damage", "error", "fragment"), CHECKPOINT_FAULTS, ids=FAULT_IDS)
def test_a_checkpoint_fault_is_one_line_on_the_command_line(
    checkpoint, capsys, name, damage, error, fragment
):
    damage(checkpoint)
    args = ["generate", "--checkpoint", str(checkpoint), "--prompt-ids", "1 2"]
    _assert_cli_error(capsys, [*args, "--max-new-tokens", "2"], fragment)


@pytest.mark.parametrize(
    ("name", "damage", "error", "fragment"),
    [c for c in CHECKPOINT_FAULTS if c[0] in ("config-empty-object", "shard-truncated")],
)
def test_explain_names_the_checkpoint_fault_too(checkpoint, capsys, name, damage, error, fragment):
    damage(checkpoint)
    _assert_cli_error(capsys, ["explain", "--checkpoint", str(checkpoint)], fragment)


def test_a_bad_tokenizer_json_is_named(checkpoint, capsys):
    (checkpoint / "tokenizer.json").write_text("{not json")
    argv = ["generate", "--checkpoint", str(checkpoint), "--prompt", "hi", "--max-new-tokens", "2"]
    _assert_cli_error(capsys, argv, r"tokenizer\.json is not a tokenizers tokenizer\.json: ")


@pytest.mark.parametrize(
    ("text", "error", "fragment"),
    [
        ("{}", ValueError, r"c\.json: MoEConfig: missing required field\(s\) vocab_size"),
        ("{\n", ValueError, r"c\.json is not valid JSON: .* at line 2 column 1"),
        ('{"num_expert": 1}', ValueError, r"c\.json: MoEConfig: unknown field\(s\) 'num_expert'"),
        (None, FileNotFoundError, r"c\.json is missing"),
    ],
)
def test_config_load_names_the_file(tmp_path, text, error, fragment):
    if text is not None:
        (tmp_path / "c.json").write_text(text)
    with pytest.raises(error, match=fragment):
        MoEConfig.load(tmp_path / "c.json")


def test_config_from_dict_checks_every_field_type():
    good = TINY.to_dict()
    assert MoEConfig.from_dict(good) == TINY
    assert MoEConfig.from_dict({**good, "rope_theta": 10000}) == TINY  # an int is a number
    for f in dataclasses.fields(MoEConfig):  # every annotation has a JSON type to check against
        assert str(f.type) in _FIELD_TYPES, f.name
    with pytest.raises(ValueError, match=r"MoEConfig\.dense_intermediate_size = 'x'.*or null"):
        MoEConfig.from_dict({**good, "dense_intermediate_size": "x"})
    with pytest.raises(ValueError, match=r"MoEConfig\.rope_theta = \[1\].*a number, got an array"):
        MoEConfig.from_dict({**good, "rope_theta": [1]})


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_the_checked_shapes_are_the_models(variant):
    cfg = tiny_config(**VARIANTS[variant])
    model = MoEForCausalLM(cfg)
    assert expected_shapes(cfg) == {k: tuple(v.shape) for k, v in model.state_dict().items()}


def test_load_refuses_what_is_not_a_path():
    with pytest.raises(TypeError, match=r"speq\.load\(path\): path must be .* got int"):
        speq.load(3)


def test_an_undamaged_checkpoint_still_loads(checkpoint):
    ids = torch.tensor([[3, 1, 4]])
    cm = speq.load(str(checkpoint))
    assert cm.config == TINY
    model = MoEForCausalLM.from_pretrained(checkpoint)
    assert torch.equal(speq.compile(model).generate(ids, 2), cm.generate(ids, 2))


# ------------------------------------------------------------------ flags
def _exit_status(argv: list[str]) -> int:
    """What ``speq ARGV`` exits with: main's return value, or the status of the SystemExit that a
    flag refused by argparse raises (as argparse's own errors do)."""
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


def _assert_cli_error(capsys, argv: list[str], fragment: str) -> str:
    assert _exit_status(argv) == 2
    captured = capsys.readouterr()
    err = captured.err
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("speq: error: "), err
    assert re.search(fragment, lines[0]), f"{fragment!r} not in {lines[0]!r}"
    assert "\r" not in err  # no progress bar came first
    return lines[0]


INVALID_UTF8 = "caf\udce9 \udcff"  # b"caf\xe9 \xff" as Python hands it over (surrogateescape)

# (id, argv, message fragment (a regex)); "CKPT" stands for the tiny checkpoint folder
FLAG_CASES = [
    ("threads-0", ["--threads", "0", "generate", "--random", "--prompt-ids", "1"],
     r"--threads 0: expected an integer >= 1"),
    ("threads-not-int", ["--threads", "two", "generate", "--random", "--prompt-ids", "1"],
     r"--threads two: expected an integer >= 1"),
    ("demo-budget-negative", ["demo", "--budget", "-1"],
     r"--budget -1: expected a number > 0: the fraction of all expert bytes"),
    ("demo-budget-zero", ["demo", "--budget", "0"], r"--budget 0: expected a number > 0"),
    ("demo-budget-nan", ["demo", "--budget", "nan"], r"--budget nan: expected a number > 0"),
    ("demo-budget-inf", ["demo", "--budget", "inf"], r"--budget inf: expected a number > 0"),
    ("demo-budget-text", ["demo", "--budget", "half"], r"--budget half: expected a number > 0"),
    ("demo-max-new-tokens-0", ["demo", "--max-new-tokens", "0"],
     r"--max-new-tokens 0: expected an integer >= 1"),
    ("demo-k-0", ["demo", "--k", "0"], r"--k 0: expected an integer >= 1"),
    ("demo-k-negative", ["demo", "--k", "-3"], r"--k -3: expected an integer >= 1"),
    ("demo-empty-prompt", ["demo", "--prompt", ""], r"--prompt '': the prompt is empty"),
    ("demo-invalid-utf8-prompt", ["demo", "--prompt", INVALID_UTF8],
     r"--prompt b'caf\\xe9 \\xff': not valid UTF-8 text \(byte 0xe9 at character 3\)"),
    ("demo-prompt-too-long", ["demo", "--max-new-tokens", "600"],
     r"--max-new-tokens 600: the prompt \(--prompt, 9 tokens\) \+ 600 new tokens = 609 exceeds "
     r"the model's max_seq_len \(512\); expected at most 503"),
    ("generate-max-new-tokens-negative", ["generate", "--checkpoint", "CKPT", "--prompt-ids", "1",
     "--max-new-tokens", "-1"], r"--max-new-tokens -1: expected an integer >= 0"),
    ("generate-too-many-tokens", ["generate", "--checkpoint", "CKPT", "--prompt-ids", "1 2",
     "--max-new-tokens", "63"],
     r"--max-new-tokens 63: .*2 tokens\) \+ 63 new tokens = 65 exceeds the model's max_seq_len "
     r"\(64\); expected at most 62"),
    ("generate-empty-prompt", ["generate", "--random", "--prompt", ""],
     r"--prompt '': the prompt is empty; expected some text"),
    ("generate-empty-prompt-shipped-model", ["generate", "--prompt", ""],
     r"--prompt '': the prompt is empty"),
    ("generate-invalid-utf8-prompt", ["generate", "--prompt", INVALID_UTF8],
     r"not valid UTF-8 text \(byte 0xe9 at character 3\); expected UTF-8 text"),
    ("generate-text-without-tokenizer", ["generate", "--checkpoint", "CKPT", "--prompt", "hi"],
     r"this model has no tokenizer; give the prompt as --prompt-ids"),
    ("prompt-ids-not-integers", ["generate", "--checkpoint", "CKPT", "--prompt-ids", "1,x"],
     r"--prompt-ids 1,x: 'x' is not an integer; expected token ids \(integers >= 0\)"),
    ("prompt-ids-float", ["generate", "--checkpoint", "CKPT", "--prompt-ids", "1 2.5"],
     r"--prompt-ids '1 2\.5': '2\.5' is not an integer"),
    ("prompt-ids-empty", ["generate", "--checkpoint", "CKPT", "--prompt-ids", " , "],
     r"--prompt-ids ' , ': no token ids given"),
    ("prompt-ids-negative", ["generate", "--checkpoint", "CKPT", "--prompt-ids", "-1"],
     r"--prompt-ids -1: -1 is negative"),
    ("prompt-ids-out-of-vocabulary", ["generate", "--checkpoint", "CKPT", "--prompt-ids", "1 61"],
     r"--prompt-ids: token id 61: expected ids in the vocabulary \[0, 61\)"),
    ("temperature-0", ["generate", "--random", "--prompt-ids", "1", "--sample", "--temperature",
     "0"], r"--temperature 0: expected a number > 0"),
    ("top-k-0", ["generate", "--random", "--prompt-ids", "1", "--top-k", "0"],
     r"--top-k 0: expected an integer >= 1"),
    ("top-p-2", ["generate", "--random", "--prompt-ids", "1", "--top-p", "2"],
     r"--top-p 2: expected a number in \(0, 1\]"),
    ("prompt-required", ["generate", "--random"],
     r"one of the arguments --prompt --prompt-ids is required"),
    ("model-and-random", ["generate", "--random", "--model", "CKPT", "--prompt-ids", "1"],
     r"argument --model/--checkpoint: not allowed with argument --random"),
    ("generate-policy", ["generate", "--random", "--prompt-ids", "1", "--policy", "lru"],
     r"--policy 'lru': expected one of 'speq', 'resident'"),
    ("generate-backend", ["generate", "--random", "--prompt-ids", "1", "--backend", "tpu"],
     r"--backend 'tpu': expected one of 'cpu', 'sim'"),
    ("generate-device-memory", ["generate", "--random", "--prompt-ids", "1", "--device-memory",
     "12 apples"], r"--device-memory '12 apples': expected a positive size, a unit among B, KB"),
    ("generate-device-memory-too-small", ["generate", "--checkpoint", "CKPT", "--prompt-ids", "1",
     "--policy", "ondemand", "--device-memory", "1KB"],
     r"--device-memory 1KB is too small for this model \(expected more\): device_memory 1\.000 KB "
     r".* is below the minimum 76\.928 KB"),
    ("generate-budget-0", ["generate", "--random", "--prompt-ids", "1", "--budget", "0"],
     r"--budget 0: expected a number > 0: the fraction of all expert bytes"),
    ("generate-budget-too-small", ["generate", "--checkpoint", "CKPT", "--prompt-ids", "1",
     "--policy", "ondemand", "--budget", "0.01"],
     r"--budget 0\.01 is too small for this model \(expected more\): device_memory 59,417 bytes "
     r"is below the minimum 76,928 bytes"),
    ("generate-budget-and-device-memory", ["generate", "--random", "--prompt-ids", "1", "--budget",
     "0.5", "--device-memory", "12MB"], r"--device-memory: not allowed with argument --budget"),
    ("generate-link-gbps-0", ["generate", "--random", "--prompt-ids", "1", "--link-gbps", "0"],
     r"--link-gbps 0: expected a number > 0 \(GB/s\)"),
    ("generate-link-gbps-negative", ["generate", "--random", "--prompt-ids", "1", "--link-gbps",
     "-2"], r"--link-gbps -2: expected a number > 0"),
    ("generate-k-without-speq", ["generate", "--random", "--prompt-ids", "1", "--policy",
     "ondemand", "--k", "2"], r"--k 2: applies to --policy speq only, not --policy ondemand"),
    ("generate-k-default-policy", ["generate", "--random", "--prompt-ids", "1", "--k", "2"],
     r"--k 2: applies to --policy speq only, not --policy resident"),
    ("generate-k-0", ["generate", "--random", "--prompt-ids", "1", "--policy", "speq", "--k", "0"],
     r"--k 0: expected an integer >= 1"),
    ("generate-draft-memory-without-speq", ["generate", "--random", "--prompt-ids", "1",
     "--draft-memory", "separate"],
     r"--draft-memory separate: applies to --policy speq only, not --policy resident"),
    ("generate-draft-memory-value", ["generate", "--random", "--prompt-ids", "1",
     "--draft-memory", "both"], r"--draft-memory 'both': expected one of 'shared', 'separate'"),
    ("roofline-acceptance-1.5", ["roofline", "--acceptance", "1.5"],
     r"--acceptance 1\.5: expected a number in \[0, 1\]"),
    ("roofline-miss-rate", ["roofline", "--miss-rate", "-0.1"],
     r"--miss-rate -0\.1: expected a number in \[0, 1\]"),
    ("roofline-model", ["roofline", "--model", "gpt-5"],
     r"--model 'gpt-5': expected one of .*'mixtral-8x7b'.*'demo'"),
    ("roofline-profile", ["roofline", "--profile", "tpu"], r"--profile 'tpu': expected one of "),
    ("roofline-out-folder", ["roofline", "--out", "/nonexistent-speq/r.png"],
     r"--out /nonexistent-speq/r\.png: the folder /nonexistent-speq does not exist"),
    ("explain-policy", ["explain", "--random", "--policy", "lru"],
     r"--policy 'lru': expected one of 'speq', 'resident'"),
    ("explain-backend", ["explain", "--random", "--backend", "tpu"], r"--backend 'tpu': expected"),
    ("explain-k", ["explain", "--random", "--k", "0"], r"--k 0: expected an integer >= 1"),
    ("explain-device-memory", ["explain", "--random", "--device-memory", "lots"],
     r"--device-memory lots: expected a positive size, a unit among B, KB"),
    ("explain-device-memory-too-small", ["explain", "--checkpoint", "CKPT", "--device-memory",
     "1KB"], r"--device-memory 1KB is too small for this model \(expected more\): "
     r"device_memory 1\.000 KB .* is below the minimum"),
    ("tune-shape-incomplete", ["tune", "--E", "4"], r"--E, --N and --K go together"),
    ("tune-top-k", ["tune", "--E", "2", "--N", "8", "--K", "8", "--top-k", "3"],
     r"--top-k 3: expected at most --E \(2\)"),
    ("tune-E-0", ["tune", "--E", "0"], r"--E 0: expected an integer >= 1"),
    ("tune-buckets", ["tune", "--buckets", "1", "0"], r"--buckets 0: expected an integer >= 1"),
    ("unknown-command", ["serve"], r"command 'serve': expected one of 'demo', 'generate'"),
    ("unknown-flag", ["generate", "--random", "--prompt-ids", "1", "--beams", "2"],
     r"unrecognized arguments: --beams 2"),
]  # fmt: skip


@pytest.mark.parametrize(("name", "argv", "fragment"), FLAG_CASES, ids=[c[0] for c in FLAG_CASES])
def test_a_bad_flag_is_one_line_naming_it(valid_checkpoint, capsys, name, argv, fragment):
    argv = [str(valid_checkpoint) if a == "CKPT" else a for a in argv]
    _assert_cli_error(capsys, argv, fragment)


def test_a_refused_flag_exits_2_and_a_failed_command_returns_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--threads", "0", "generate", "--random", "--prompt-ids", "1"])
    assert exc.value.code == 2
    assert main(["generate", "--random", "--prompt", "hi"]) == 2  # no tokenizer: the command's
    assert capsys.readouterr().err.count("speq: error:") == 2


def test_a_budget_too_small_for_the_model_names_the_flag(capsys, monkeypatch):
    """Past validation (the budget is positive) the refusal still names --budget; the budget's
    computation is stubbed with the memory planner's refusal so that no demo runs."""
    import speq.compare

    def refuse(*args, **kwargs):
        raise ValueError("device_memory 3,040,885 bytes is below the minimum 7,593,344 bytes")

    monkeypatch.setattr(speq.compare, "budget_bytes", refuse)
    _assert_cli_error(
        capsys,
        ["demo", "--budget", "0.01"],
        r"--budget 0\.01 is too small for this model \(expected more\): device_memory 3,040,885 bytes",
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="the cuda backend is available here")
def test_the_cuda_backend_without_a_gpu_is_one_line(capsys):
    argv = ["generate", "--random", "--prompt-ids", "1", "--backend", "cuda"]
    _assert_cli_error(capsys, argv, r"--backend cuda: no CUDA device is available; expected one of")


def test_good_flags_still_work(valid_checkpoint, capsys):
    argv = ["generate", "--checkpoint", str(valid_checkpoint), "--prompt-ids", "1, 2"]
    assert main([*argv, "--max-new-tokens", "2", "--sample", "--top-p", "1", "--top-k", "3"]) == 0
    out = capsys.readouterr().out
    assert len(next(x for x in out.splitlines() if x.startswith("tokens:")).split()) == 1 + 4
    assert main([*argv, "--max-new-tokens", "0"]) == 0  # generate accepts 0 new tokens
    assert "0 tokens in" in capsys.readouterr().out


# ------------------------------------------------------------------ SPEQ_DEBUG, Ctrl-C
def test_speq_debug_raises_instead(checkpoint, monkeypatch):
    (checkpoint / "config.json").write_text("{}")
    monkeypatch.setenv("SPEQ_DEBUG", "1")
    with pytest.raises(ValueError, match=r"config\.json: MoEConfig: missing required"):
        main(["generate", "--checkpoint", str(checkpoint), "--prompt-ids", "1"])


def test_a_transfer_error_while_decoding_is_one_line(valid_checkpoint, capsys, monkeypatch):
    """A copy that failed for good ends the command with one line; the bar that was drawn is
    cleared first (on a terminal the error is the only line left)."""

    def fail(*args, **kwargs):
        raise speq.TransferError("expert (0, 1)", 3, OSError("link down"))

    monkeypatch.setattr(speq.CompiledModel, "generate", fail)
    argv = ["generate", "--checkpoint", str(valid_checkpoint), "--prompt-ids", "1"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.replace("\r", "\n").splitlines()[-1] == (
        "speq: error: copy of expert (0, 1) to the device failed 3 times: link down"
    )


def _speq_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("speq") and t.is_alive()]


def test_ctrl_c_before_the_work_is_one_line(valid_checkpoint, capsys, monkeypatch):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(speq, "compile", interrupt)
    argv = ["generate", "--checkpoint", str(valid_checkpoint), "--prompt-ids", "1"]
    assert main(argv) == 130
    assert capsys.readouterr().err == "speq: interrupted\n"
    assert _speq_threads() == []


def test_ctrl_c_while_decoding_closes_the_bar_and_the_link(valid_checkpoint, capsys, monkeypatch):
    bars = []

    class Interrupting(speq.cli.common.tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            bars.append(self)

        def update(self, n=1):
            super().update(n)
            raise KeyboardInterrupt

    monkeypatch.setattr(speq.cli.common, "tqdm", Interrupting)
    argv = ["generate", "--checkpoint", str(valid_checkpoint), "--prompt-ids", "1"]
    assert main([*argv, "--max-new-tokens", "4"]) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.replace("\r", "\n").splitlines()[-1] == "speq: interrupted"
    assert len(bars) == 1 and bars[0].disable  # closed (tqdm disables a bar it closes)
    assert _speq_threads() == []


# ------------------------------------------------------------------ end to end
def _run_speq(args: list, debug: bool = False) -> subprocess.Popen:
    env = {**os.environ, "SPEQ_DEBUG": "1" if debug else ""}
    cmd = [sys.executable, "-m", "speq", *args]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


@pytest.fixture(scope="module")
def end_to_end(tmp_path_factory, valid_checkpoint):
    """`python -m speq` on a few bad inputs, the processes run side by side."""
    broken = tmp_path_factory.mktemp("broken") / "ckpt"
    shutil.copytree(valid_checkpoint, broken)
    shard = broken / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    gen = ["generate", "--checkpoint", str(broken), "--prompt-ids", "1"]
    procs = {
        "truncated-shard": _run_speq(gen),
        "truncated-shard-debug": _run_speq(gen, debug=True),
        "invalid-utf8-prompt": _run_speq(["generate", "--prompt", b"caf\xe9 \xff"]),
        "threads-0": _run_speq(["--threads", "0", "roofline"]),
    }
    return {k: (p.wait(timeout=120), p.communicate()[1].decode()) for k, p in procs.items()}


@pytest.mark.parametrize(
    ("case", "fragment"),
    [
        ("truncated-shard", rf"speq: error: {CORRUPT}"),
        ("invalid-utf8-prompt", r"speq: error: --prompt b'caf\\xe9 \\xff': not valid UTF-8 text"),
        ("threads-0", r"speq: error: --threads 0: expected an integer >= 1"),
    ],
)
def test_python_dash_m_speq_prints_one_line(end_to_end, case, fragment):
    rc, err = end_to_end[case]
    assert rc == 2, err
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert re.match(fragment, err), err


def test_speq_debug_shows_the_traceback(end_to_end):
    rc, err = end_to_end["truncated-shard-debug"]
    assert rc != 0
    assert "Traceback" in err and "ValueError: corrupt safetensors file" in err
