"""speq's graph IR: ops with tags, immutable nodes and graphs, printer, verifier, interpreter."""

from speq.ir.graph import Graph, Node, Value
from speq.ir.interpreter import RunContext, register, run_graph
from speq.ir.ops import TAGS, Op, Tag, has_tag
from speq.ir.printer import format_graph
from speq.ir.program import Program
from speq.ir.verifier import VerificationError, verify

__all__ = [
    "TAGS",
    "Graph",
    "Node",
    "Op",
    "Program",
    "RunContext",
    "Tag",
    "Value",
    "VerificationError",
    "format_graph",
    "has_tag",
    "register",
    "run_graph",
    "verify",
]
