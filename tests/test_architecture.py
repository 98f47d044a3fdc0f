"""The architecture is a test: the layer and import contracts in pyproject.toml
([tool.importlinter]) hold. A change that breaks one moves the code, never the contract."""

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_are_kept():
    lint = shutil.which("lint-imports") or str(Path(sys.executable).parent / "lint-imports")
    out = subprocess.run([lint], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "0 broken" in out.stdout


def test_the_facade_and_the_files_stay_small():
    """CompiledModel only assembles (the engine runs); no module grows past ~450 lines."""
    import inspect

    from speq.compiler import CompiledModel

    assert len(inspect.getsource(CompiledModel).splitlines()) <= 200
    sizes = {p: len(p.read_text().splitlines()) for p in (ROOT / "speq").rglob("*.py")}
    assert not {str(p.relative_to(ROOT)): n for p, n in sizes.items() if n > 450}
