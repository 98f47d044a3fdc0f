"""speq.sim.measure: a profile measured on this machine (here the host stands in for a device)
has every rate positive and says what it measured, and the simulator runs on it."""

import speq
from speq.sim.measure import measure_profile
from speq.sim.trace_gen import REFERENCE_STATS, generate_trace
from speq.simulate import model_config, simulate


def test_a_measured_profile_drives_a_simulation():
    from speq.models.demo import DEMO_CHECKPOINT

    profile = measure_profile(repeats=1)
    assert profile.name.startswith("measured")
    assert profile.peak_tflops > 0 and profile.hbm_gbps > 0 and profile.link_gbps > 0
    assert profile.link_latency_us >= 0 and profile.launch_us >= 0
    cfg = model_config(str(DEMO_CHECKPOINT))
    trace = generate_trace(REFERENCE_STATS, cfg.num_experts, cfg.top_k, len(cfg.moe_layers), 12)
    opts = speq.CompileOptions(policy="ondemand", profile=profile, device_memory="10MB")
    m = simulate(cfg, trace, opts, 8)
    assert m.backend == "trace" and m.tpot_ms > 0 and m.bytes_moved > 0
