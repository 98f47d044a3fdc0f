"""The runtime that executes compiled programs: the `Engine` (speq.runtime.engine), its backends
and policies (registries), the offloading runtime, the speculative loop, sampling and metrics."""

from speq.runtime.sampling import SamplingParams

__all__ = ["SamplingParams"]
