import pytest

from speq.cli import main
from speq.cost import K_MAX
from speq.passes.governor import modelled_hardware, roofline
from speq.sim import get_preset, get_profile


def test_modelled_hardware_orders_its_times():
    cfg, prof = get_preset("phi-3.5-moe"), get_profile("a100-40g-pcie4")
    hw = modelled_hardware(cfg, prof)
    assert 0 < hw.draft_pass_s < hw.verify(1) < hw.verify(9)  # INT4 experts: a cheaper pass
    assert hw.copy_s == pytest.approx(10e-6 + 3 * 4096 * 6400 * 2 / 16e9)


def test_roofline_policy_and_png(tmp_path):
    policy = roofline(get_preset("mixtral-8x7b"), get_profile("h100-pcie5"), 0.9, 0.3)
    assert 1 <= policy.spec.k <= K_MAX
    out = tmp_path / "r.png"
    assert main(["roofline", "--model", "qwen1.5-moe-a2.7b", "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
