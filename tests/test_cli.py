import pytest
import torch

from helpers import tiny_model
from speq.cli import main


def test_demo_runs_every_policy_and_prints_the_table(capsys):
    assert main(["demo", "--max-new-tokens", "3", "--k", "2"]) == 0
    out = capsys.readouterr().out
    assert "TPOT (ms)" in out and "emulated link" in out
    for label in ("speq k=2", "ondemand", "nextgate", "oracle", "resident"):
        assert label in out
    assert "NO" not in out.split("TPOT (ms)")[1]  # every policy produced the resident tokens


def test_generate_text_with_the_shipped_model(capsys):
    assert main(["generate", "--prompt", "In the beginning", "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert "shipped demo MoE" in out and "In the beginning" in out


def test_generate_from_a_checkpoint_with_token_ids(tmp_path, capsys):
    model = tiny_model(torch.float32)
    model.save_pretrained(tmp_path)
    args = [
        "generate",
        "--checkpoint",
        str(tmp_path),
        "--prompt-ids",
        "1 2 3",
        "--max-new-tokens",
        "4",
    ]
    assert main(args) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("tokens:"))
    assert len(line.split()) == 1 + 7


def test_text_prompt_without_a_tokenizer_is_refused(capsys):
    assert main(["generate", "--random", "--prompt", "hello", "--max-new-tokens", "2"]) == 2
    assert "no tokenizer" in capsys.readouterr().err


def test_generate_reports_errors_cleanly(tmp_path, capsys):
    assert main(["generate", "--checkpoint", str(tmp_path), "--prompt-ids", "1"]) == 2
    assert "config.json" in capsys.readouterr().err


def test_explain_prints_the_ir_after_every_pass(capsys):
    assert main(["explain", "--random"]) == 0
    out = capsys.readouterr().out
    assert "# after capture" in out and "# after fuse_moe" in out and "fused_moe(" in out


def test_tune_without_a_gpu_says_so(capsys):
    if torch.cuda.is_available():
        return
    assert main(["tune"]) == 0
    assert "CUDA" in capsys.readouterr().out


def test_tune_help_lists_its_flags(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["tune", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--model", "--E", "--top-k", "--dtype", "--bits", "--buckets", "--out"):
        assert flag in out
