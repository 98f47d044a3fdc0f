"""Frontends: turn a model into a `ModelSpec`, its weights, and the captured step graph."""

from speq.frontend.capture import capture
from speq.frontend.checkpoint import from_checkpoint
from speq.frontend.reference import from_reference
from speq.frontend.spec import ModelSpec

__all__ = ["ModelSpec", "capture", "from_checkpoint", "from_reference"]
