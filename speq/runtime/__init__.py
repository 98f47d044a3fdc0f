"""The runtime that executes compiled graphs: sampling, and (as it grows) expert offloading."""

from speq.runtime.sampling import SamplingParams

__all__ = ["SamplingParams"]
