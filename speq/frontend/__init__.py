"""Frontends: turn a model into a `ModelSpec` (speq.models.spec), its weights, and the captured
step graph."""

from speq.frontend.capture import capture
from speq.frontend.checkpoint import from_checkpoint
from speq.frontend.reference import from_reference

__all__ = ["capture", "from_checkpoint", "from_reference"]
