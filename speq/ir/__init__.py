"""speq's graph IR, as data: ops with tags, immutable nodes and graphs, the op schemas, the
printer, the verifier, and a run loop that executes a graph with the implementations a backend
gives it (the IR itself implements no op)."""

from speq.ir.graph import Graph, Node, Value
from speq.ir.ops import TAGS, Op, Tag, has_tag
from speq.ir.printer import format_graph
from speq.ir.program import Program
from speq.ir.run import ImplTable, RunContext, run_graph
from speq.ir.schema import SCHEMAS, Schema, bind
from speq.ir.verifier import VerificationError, verify

__all__ = [
    "SCHEMAS",
    "TAGS",
    "Graph",
    "ImplTable",
    "Node",
    "Op",
    "Program",
    "RunContext",
    "Schema",
    "Tag",
    "Value",
    "VerificationError",
    "bind",
    "format_graph",
    "has_tag",
    "run_graph",
    "verify",
]
