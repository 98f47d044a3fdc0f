import torch

from helpers import tiny_model
from speq.cli import main


def test_demo_runs_and_says_the_model_is_random(capsys):
    assert main(["demo", "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert "randomly initialised" in out and "ms/token" in out


def test_generate_from_a_checkpoint(tmp_path, capsys):
    model = tiny_model(torch.float32)
    model.save_pretrained(tmp_path)
    assert (
        main(
            [
                "generate",
                "--checkpoint",
                str(tmp_path),
                "--prompt-ids",
                "1 2 3",
                "--max-new-tokens",
                "4",
            ]
        )
        == 0
    )
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("tokens:"))
    assert len(line.split()) == 1 + 7


def test_generate_reports_errors_cleanly(tmp_path, capsys):
    assert main(["generate", "--checkpoint", str(tmp_path), "--prompt-ids", "1"]) == 2
    assert "config.json" in capsys.readouterr().err


def test_explain_prints_the_ir(capsys):
    assert main(["explain"]) == 0
    assert "# after capture" in capsys.readouterr().out
