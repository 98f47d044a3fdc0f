"""Golden-text comparison: ``SPEQ_UPDATE_GOLDEN=1 pytest`` rewrites the files after a reviewed change."""

from __future__ import annotations

import difflib
import os
from pathlib import Path

GOLDEN_DIR = Path(__file__).parent / "ir" / "golden"


def check_golden(name: str, text: str) -> None:
    path = GOLDEN_DIR / f"{name}.txt"
    if os.environ.get("SPEQ_UPDATE_GOLDEN"):
        path.write_text(text + "\n")
        return
    assert path.exists(), f"{path} missing: run with SPEQ_UPDATE_GOLDEN=1 to create it"
    expected = path.read_text().rstrip("\n")
    if text != expected:
        diff = "\n".join(
            difflib.unified_diff(
                expected.splitlines(), text.splitlines(), "golden", "got", lineterm=""
            )
        )
        raise AssertionError(f"IR differs from {path}:\n{diff}")
