"""Compiler passes over speq's graph IR and the pipeline that orders them."""

from speq.passes.history import PassHistory, PassRecord
from speq.passes.pipeline import default_passes, run_passes

__all__ = ["PassHistory", "PassRecord", "default_passes", "run_passes"]
