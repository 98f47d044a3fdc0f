"""The sim backend's metrics for a fixed set of runs (every policy, the demo model, two budgets)
equal the numbers recorded in tests/runtime/data/sim_metrics.json (see sim_runs.py): a change
that only reorganises code must leave every one of them as it was."""

import json
import math

import pytest
from sim_runs import RECORDED, run_all


def _same(got, want, path: str) -> list[str]:
    if isinstance(want, dict):
        if set(got) != set(want):
            return [f"{path}: keys {sorted(got)} != recorded {sorted(want)}"]
        return [p for k in want for p in _same(got[k], want[k], f"{path}/{k}")]
    if isinstance(want, list):
        if len(got) != len(want):
            return [f"{path}: {got} != recorded {want}"]
        return [p for i, (g, w) in enumerate(zip(got, want)) for p in _same(g, w, f"{path}[{i}]")]
    if isinstance(want, float) and isinstance(got, float):
        # summation order may change in a reorganisation; the values may not
        return (
            []
            if math.isclose(got, want, rel_tol=1e-9, abs_tol=1e-12)
            else [f"{path}: {got} != {want}"]
        )
    return [] if got == want and type(got) is type(want) else [f"{path}: {got!r} != {want!r}"]


@pytest.mark.slow
def test_sim_metrics_equal_the_recorded_ones():
    recorded = json.loads(RECORDED.read_text())
    got = json.loads(json.dumps(run_all()))  # the same JSON round trip as the recording
    problems = _same(got, recorded, "")
    assert not problems, "\n".join(problems[:20])


@pytest.mark.parametrize("budget", ["tight", "medium"])
def test_speq_on_sim_is_at_least_as_fast_as_every_alternative(budget):
    """On the deterministic sim backend, governed speq (host compute "auto") decodes the demo
    model at least as fast as speq without host compute, fiddler, hostcompute and ondemand at
    the recorded budgets (the recording is the live runs', by the test above)."""
    recorded = json.loads(RECORDED.read_text())
    tpot = {
        name.split("/")[1]: run["metrics"]["tpot_ms"]
        for name, run in recorded.items()
        if name.startswith(f"{budget}/")
    }
    rivals = ("speq-governed-no-host", "fiddler", "hostcompute", "ondemand")
    assert tpot["speq-governed"] <= min(tpot[r] for r in rivals)
