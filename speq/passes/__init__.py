"""Compiler passes over speq's graph IR and the pipeline that orders them."""

from speq.passes.history import PassHistory, PassRecord
from speq.passes.pipeline import PipelineOptions, default_passes, run_pass, run_passes

__all__ = [
    "PassHistory",
    "PassRecord",
    "PipelineOptions",
    "default_passes",
    "run_pass",
    "run_passes",
]
