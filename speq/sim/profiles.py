"""Hardware profiles: the few numbers of a device and its host link that the cost model needs.

Numbers come from vendor spec sheets unless a comment says otherwise. Spec-sheet bandwidths and
TFLOP/s are peaks; the roofline scales both by ``efficiency``. The link bandwidth is used as is
(no efficiency factor), so each profile says whether its link number is nominal or measured.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from types import MappingProxyType


@dataclass(frozen=True)
class HardwareProfile:
    """One accelerator and its host link. 1 GB = 1e9 bytes; 1 TFLOP/s = 1e12 flop/s."""

    name: str
    peak_tflops: float  # dense bf16/fp16 tensor-core peak, no structured sparsity
    hbm_gbps: float  # device memory bandwidth
    link_gbps: float  # host -> device copy bandwidth (pinned memory), one direction
    link_latency_us: float  # fixed cost of one host -> device copy
    launch_us: float  # fixed cost of one kernel on the device (launch and tail)
    device_memory_gb: float
    efficiency: float = 0.7  # fraction of peak compute and memory bandwidth the roofline assumes
    # The host's side (experts computed in host memory, speq.runtime.host): effective rates, not
    # peaks. Defaults: one socket of a server CPU beside the accelerator (see _SERVER_HOST).
    host_gbps: float = 100.0  # host memory bandwidth one expert's batch-1 product reaches
    host_tflops: float = 2.0  # host compute rate on those products (fp32 FMA)
    host_latency_us: float = 30.0  # per layer sent to the host: dispatch, activations both ways

    def __post_init__(self) -> None:
        for field in (
            "peak_tflops",
            "hbm_gbps",
            "link_gbps",
            "device_memory_gb",
            "host_gbps",
            "host_tflops",
        ):
            if not getattr(self, field) > 0:
                raise ValueError(f"HardwareProfile.{field} must be > 0, got {getattr(self, field)}")
        for field in ("link_latency_us", "launch_us", "host_latency_us"):
            if not getattr(self, field) >= 0:
                raise ValueError(
                    f"HardwareProfile.{field} must be >= 0, got {getattr(self, field)}"
                )
        if not 0 < self.efficiency <= 1:
            raise ValueError(f"HardwareProfile.efficiency must be in (0, 1], got {self.efficiency}")

    @property
    def device_memory_bytes(self) -> int:
        return int(self.device_memory_gb * 1e9)


# The host beside a data-centre accelerator (_SERVER_HOST, the defaults above), assumed rather than
# measured: one socket of an AMD EPYC 7763 / Xeon 8380-class CPU with 8 channels of DDR4-3200
# (204.8 GB/s nominal; STREAM triad reaches about 140-160 GB/s per socket). A batch-1 bf16 expert
# product converted to fp32 on every core reaches less: 100 GB/s is assumed. Compute: 64 cores x
# 2.45 GHz x 32 fp32 flop/cycle = 5 TFLOP/s peak, 2 assumed. Latency: waking the host worker
# plus the activations' device -> host and results' host -> device copies (each a link latency).
# Latency and launch costs are rough, not measured here: a cudaMemcpyAsync from pinned memory costs
# on the order of 10 us before bytes flow, and an eagerly launched kernel a few us (less under
# CUDA-graph replay, which speq uses between host syncs).
# A100 40GB PCIe (NVIDIA A100 datasheet): 312 TFLOP/s bf16 dense, 1555 GB/s HBM2, 40 GB.
# PCIe 4.0 x16 is 31.5 GB/s per direction nominal (about 25 GB/s measured with pinned memory);
# the MoE-SpeQ paper states 16 GB/s each way for its A100 testbed, and this profile exists to
# reproduce the paper, so it uses the paper's 16 GB/s.
_A100_PCIE4 = HardwareProfile(
    name="a100-40g-pcie4",
    peak_tflops=312.0,
    hbm_gbps=1555.0,
    link_gbps=16.0,
    link_latency_us=10.0,
    launch_us=4.0,
    device_memory_gb=40.0,
)

_PROFILES = (
    _A100_PCIE4,
    # The same A100-class compute with a hypothetical PCIe 3.0 or 5.0 link (an A100 has no PCIe 5.0
    # variant), kept for the link sweep of bench/bench_e2e.py. They follow the pcie4 profile's
    # convention: the paper's effective 16 GB/s is about half of PCIe 4.0's nominal 31.5, so
    # PCIe 3.0 x16 (15.75 nominal) -> 8 GB/s and PCIe 5.0 x16 (63 nominal) -> 32 GB/s.
    replace(_A100_PCIE4, name="a100-40g-pcie3", link_gbps=8.0),
    replace(_A100_PCIE4, name="a100-40g-pcie5", link_gbps=32.0),
    # GeForce RTX 4090 (Ada whitepaper): 165.2 TFLOP/s fp16/bf16 dense with fp32 accumulate,
    # 1008 GB/s GDDR6X, 24 GB. Link: PCIe 4.0 x16, 31.5 GB/s per direction nominal.
    HardwareProfile(
        name="rtx4090-pcie4",
        peak_tflops=165.2,
        hbm_gbps=1008.0,
        link_gbps=31.5,
        link_latency_us=10.0,
        launch_us=3.0,
        device_memory_gb=24.0,
        # A desktop host: dual-channel DDR5-5600 (89.6 GB/s nominal), 50 assumed; a 16-core
        # Ryzen 7950X (about 2.5 TFLOP/s fp32 peak with AVX-512), 1 assumed.
        host_gbps=50.0,
        host_tflops=1.0,
    ),
    # H100 PCIe 80GB (H100 datasheet): 756 TFLOP/s bf16 dense, 2000 GB/s HBM2e, 80 GB.
    # Link: PCIe 5.0 x16, 64 GB/s per direction nominal (measured pinned copies reach ~50-55).
    HardwareProfile(
        name="h100-pcie5",
        peak_tflops=756.0,
        hbm_gbps=2000.0,
        link_gbps=64.0,
        link_latency_us=10.0,
        launch_us=3.0,
        device_memory_gb=80.0,
    ),
    # H200 SXM (H200 datasheet): 989 TFLOP/s bf16 dense, 4800 GB/s HBM3e, 141 GB.
    # Link: PCIe 5.0 x16 to the host, 64 GB/s per direction nominal.
    HardwareProfile(
        name="h200",
        peak_tflops=989.0,
        hbm_gbps=4800.0,
        link_gbps=64.0,
        link_latency_us=10.0,
        launch_us=3.0,
        device_memory_gb=141.0,
    ),
)

PROFILES: Mapping[str, HardwareProfile] = MappingProxyType({p.name: p for p in _PROFILES})


def get_profile(name: str | HardwareProfile) -> HardwareProfile:
    """The named hardware profile (a profile is its own); a ValueError lists the known names."""
    if isinstance(name, HardwareProfile):
        return name
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(
            f"unknown hardware profile {name!r}; known profiles: {', '.join(sorted(PROFILES))}"
        ) from None
