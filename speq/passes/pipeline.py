"""The compilation pipeline: the passes in order, one line each with why.

Every pass is a pure function ``Graph -> Graph``; `run_passes` times each one, records the graph
it returned, and runs the verifier after it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

from speq.ir.graph import Graph
from speq.ir.verifier import verify
from speq.passes.fuse_moe import fuse_moe
from speq.passes.history import Pass, PassHistory, PassRecord
from speq.passes.insert_prefetch import insert_prefetch

log = logging.getLogger("speq.passes")


def run_passes(
    captured: Graph, passes: Sequence[tuple[str, Pass]], capture_seconds: float = 0.0
) -> PassHistory:
    records = [PassRecord("capture", verify(captured), capture_seconds, True)]
    graph = captured
    for name, fn in passes:
        t0 = time.perf_counter()
        new = verify(fn(graph))
        records.append(PassRecord(name, new, time.perf_counter() - t0, new is not graph))
        log.debug("after %s:\n%s", name, new)
        graph = new
    return PassHistory(records)


def default_passes(options) -> list[tuple[str, Pass]]:
    """The passes `speq.compile` runs after capture, for ``options`` (a `CompileOptions`)."""
    return [
        # one kernel per routed-expert block: gather, both GEMMs, SwiGLU and combine fused
        ("fuse_moe", fuse_moe),
        # where experts must be resident (WAIT) and where copies start early (PREFETCH)
        ("insert_prefetch", insert_prefetch(options.policy)),
    ]
