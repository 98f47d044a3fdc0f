"""The README's "Use" example runs as written (it is read from the README, not copied), and
every metric it prints exists for whatever policy the governor chose."""

import contextlib
import io
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.mark.slow
def test_the_use_example_runs_as_written():
    text = README.read_text()
    use = text[text.index("## Use") :]
    code = re.search(r"```python\n(.*?)```", use, re.S).group(1)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md (Use)", "exec"), {})
    lines = out.getvalue().strip().splitlines()
    tpot, hit_rate, acceptance = lines[-1].split()
    assert float(tpot) > 0 and 0 <= float(hit_rate) <= 1
    assert acceptance == "None" or 0 <= float(acceptance) <= 1


def test_every_metric_is_documented_and_present_for_every_policy():
    import torch

    import speq
    from helpers import speq_budget, tiny_model
    from speq.runtime.metrics import FIELDS

    model = tiny_model(torch.float64)
    prompt = torch.tensor([[5, 17, 3]])
    keys = None
    for policy, k in [("resident", None), ("ondemand", None), ("nextgate", None),
                      ("oracle", None), ("speq", 2), ("speq", None)]:  # fmt: skip
        budget = None if policy == "resident" else speq_budget(model, 3)
        opts = speq.CompileOptions(policy=policy, k=k, device_memory=budget, backend="sim")
        cm = speq.compile(model, opts)
        cm.generate(prompt, 4)
        assert cm.metrics.keys() == list(FIELDS) == list(cm.metrics.as_dict())
        keys = keys or cm.metrics.keys()
        assert cm.metrics.keys() == keys
    assert all(len(unit) and len(meaning) > 10 for unit, meaning in FIELDS.values())
