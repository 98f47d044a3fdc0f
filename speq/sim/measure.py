"""A hardware profile measured on the machine in use (``speq simulate --hardware measured``).

On a CUDA device: a bf16 matmul for the compute rate, a device-to-device copy for the memory
bandwidth, pinned host-to-device copies for the link (rate from a large copy, latency from
small ones), and an empty-kernel launch. The host side (experts computed in host memory): a
one-row product with a 64 MB fp32 matrix for its bandwidth, an fp32 matmul for its rate. Without
an accelerator, the host stands in for the device: an
fp32 matmul, a memory copy, and for the link a copy between two host buffers (there is no link:
an upper bound on what any would move). Each figure is the best of a few repeats.
"""

from __future__ import annotations

import time

import torch

from speq.sim.profiles import HardwareProfile

__all__ = ["measure_profile"]


def measure_profile(repeats: int = 3) -> HardwareProfile:
    """The profile of this machine's first CUDA device, or of its host (module docstring)."""
    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def best(f) -> float:
        f()  # warm up
        times = []
        for _ in range(repeats):
            sync()
            t0 = time.perf_counter()
            f()
            sync()
            times.append(time.perf_counter() - t0)
        return min(times)

    n = 4096 if cuda else 1024
    dtype = torch.bfloat16 if cuda else torch.float32
    a = torch.randn(n, n, device=dev, dtype=dtype)
    tflops = 2 * n**3 / best(lambda: a @ a) / 1e12
    big = torch.empty(2**28 if cuda else 2**26, dtype=torch.uint8, device=dev)
    out = torch.empty_like(big)
    mem_gbps = 2 * big.numel() / best(lambda: out.copy_(big)) / 1e9  # read + write
    host = torch.empty(big.numel(), dtype=torch.uint8, pin_memory=cuda)
    link_gbps = big.numel() / best(lambda: out.copy_(host, non_blocking=cuda)) / 1e9
    small_src = torch.empty(64, dtype=torch.uint8, pin_memory=cuda)
    small_dst = torch.empty(64, dtype=torch.uint8, device=dev)
    latency_us = 1e6 * best(lambda: small_dst.copy_(small_src, non_blocking=cuda))
    tiny = torch.empty(1, device=dev)
    launch_us = 1e6 * best(lambda: tiny.add_(1))
    w = torch.randn(4096, 4096)  # 64 MB: beyond the caches, read once per one-row product
    row = torch.randn(1, 4096)
    host_gbps = w.nbytes / best(lambda: torch.nn.functional.linear(row, w)) / 1e9
    sq = torch.randn(1024, 1024)
    host_tflops = 2 * 1024**3 / best(lambda: sq @ sq) / 1e12
    if cuda:
        memory_gb = torch.cuda.get_device_properties(dev).total_memory / 1e9
        name = f"measured ({torch.cuda.get_device_name(dev)})"
    else:
        import os

        memory_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
        name = "measured (host only: no accelerator, link = host memory copy)"
    return HardwareProfile(
        name=name,
        peak_tflops=tflops,
        hbm_gbps=mem_gbps,
        link_gbps=link_gbps,
        link_latency_us=latency_us,
        launch_us=launch_us,
        device_memory_gb=memory_gb,
        efficiency=1.0,  # measured rates are achieved ones, not peaks
        host_gbps=host_gbps,
        host_tflops=host_tflops,
        host_latency_us=2 * latency_us,  # activations to the host and results back
    )
