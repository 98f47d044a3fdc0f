import dataclasses

import pytest

from speq.sim import PROFILES, HardwareProfile, get_profile, link_seconds

NAMES = ("a100-40g-pcie4", "rtx4090-pcie4", "h100-pcie5", "h200")


@pytest.mark.parametrize("name", NAMES)
def test_named_profiles_resolve(name):
    p = get_profile(name)
    assert p is PROFILES[name] and p.name == name
    assert 0 < p.efficiency <= 1
    assert p.device_memory_bytes == int(p.device_memory_gb * 1e9)


def test_unknown_profile_lists_known_names():
    with pytest.raises(ValueError, match="unknown hardware profile 'tpu'") as err:
        get_profile("tpu")
    for name in NAMES:
        assert name in str(err.value)


def test_a100_profile_matches_the_paper_testbed():
    p = get_profile("a100-40g-pcie4")
    assert (p.link_gbps, p.device_memory_gb, p.hbm_gbps, p.peak_tflops) == (16, 40, 1555, 312)


def test_profiles_are_frozen_and_read_only():
    p = get_profile("h200")
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.hbm_gbps = 1.0
    with pytest.raises(TypeError):
        PROFILES["mine"] = p


BAD_FIELDS = [
    dict(efficiency=0.0),
    dict(efficiency=1.5),
    dict(hbm_gbps=0.0),
    dict(link_gbps=-1.0),
    dict(peak_tflops=0.0),
    dict(launch_us=-1.0),
    dict(link_latency_us=-0.1),
]


@pytest.mark.parametrize("bad", BAD_FIELDS, ids=lambda d: next(iter(d)))
def test_invalid_profile_is_rejected_naming_the_field(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        dataclasses.replace(get_profile("h200"), **bad)


def test_link_seconds_is_latency_plus_bytes_over_bandwidth():
    p = get_profile("a100-40g-pcie4")
    expert = 3 * 4096 * 14336 * 2  # one Mixtral-8x7B expert in bf16, ~352 MB
    assert link_seconds(expert, p) == pytest.approx(10e-6 + expert / 16e9)
    assert link_seconds(expert, p) == pytest.approx(0.0220, abs=2e-4)
    assert link_seconds(0, p) == 0.0  # no copy, no latency
    with pytest.raises(ValueError):
        link_seconds(-1, p)


def test_custom_profile_defaults_efficiency():
    p = HardwareProfile("x", 100.0, 1000.0, 10.0, 5.0, 2.0, 16.0)
    assert p.efficiency == 0.7
