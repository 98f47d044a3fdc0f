"""The compilation pipeline: the passes in order, one line each with why.

Every pass is a pure function ``Program -> Program``; `run_passes` times each one, records the
program it returned, and runs the verifier after it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

from speq.ir.graph import Graph
from speq.ir.program import Program
from speq.ir.verifier import verify
from speq.passes.fuse_moe import fuse_moe
from speq.passes.history import Pass, PassHistory, PassRecord
from speq.passes.insert_prefetch import insert_prefetch
from speq.passes.lower import lower
from speq.passes.make_draft import make_draft
from speq.runtime.execute import BACKENDS as EXEC_IMPLS  # the implementation sets that run

log = logging.getLogger("speq.passes")


def each_graph(fn: Callable[[Graph], Graph]) -> Pass:
    """A graph pass applied to every graph of the program."""

    def apply(program: Program) -> Program:
        return program.map(fn)

    return apply


def run_passes(
    captured: Program, passes: Sequence[tuple[str, Pass]], capture_seconds: float = 0.0
) -> PassHistory:
    records = [PassRecord("capture", verify(captured), capture_seconds, True)]
    program = captured
    for name, fn in passes:
        t0 = time.perf_counter()
        new = verify(fn(program))
        records.append(PassRecord(name, new, time.perf_counter() - t0, new is not program))
        log.debug("after %s:\n%s", name, new)
        program = new
    return PassHistory(records)


def default_passes(options) -> list[tuple[str, Pass]]:
    """The passes `speq.compile` runs after capture, for ``options`` (a `CompileOptions`)."""
    passes: list[tuple[str, Pass]] = [
        # one kernel per routed-expert block: gather, both GEMMs, SwiGLU and combine fused
        ("fuse_moe", each_graph(fuse_moe)),
    ]
    if options.policy == "speq":
        # the draft: the fused step with quantized, resident experts (before WAITs exist)
        passes.append(("make_draft", make_draft(options.draft_bits, options.draft_group_size)))
    passes += [
        # where experts must be resident (WAIT) and where copies start early (PREFETCH)
        ("insert_prefetch", insert_prefetch(options.policy)),
        # streams, replay regions between host syncs, and the kernel of every node
        ("lower", lower(EXEC_IMPLS)),
    ]
    return passes
