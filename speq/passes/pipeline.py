"""The compilation pipeline: the passes in order, one line each with why.

Every pass is a pure function ``Program -> Program``; `run_passes` times each one, records the
program it returned, and runs the verifier after it. The governor pass runs last, once the
engine has measured the backend (speq.compiler).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from speq.frontend.capture import ATTRIBUTE_DOMAINS
from speq.ir.graph import Graph
from speq.ir.program import Program
from speq.ir.run import ImplTable
from speq.ir.verifier import verify
from speq.passes.fuse_moe import fuse_moe
from speq.passes.history import Pass, PassHistory, PassRecord
from speq.passes.insert_prefetch import insert_prefetch
from speq.passes.lower import lower
from speq.passes.make_draft import make_draft

log = logging.getLogger("speq.passes")


@dataclass(frozen=True)
class PipelineOptions:
    """What the passes need to know of the run: ``kernels``, the backend's op implementations;
    ``draft``, the (bits, group size) of the draft's quantized experts, None for no draft;
    ``shared_draft``, whether they share the experts' device memory (read at the precision
    resident); ``next_layer_prefetch``, prefetch from the next layer's router (the ``nextgate``
    policy)."""

    kernels: ImplTable
    draft: tuple[int, int] | None = None
    shared_draft: bool = False
    next_layer_prefetch: bool = False


def each_graph(fn: Callable[[Graph], Graph]) -> Pass:
    """A graph pass applied to every graph of the program."""

    def apply(program: Program) -> Program:
        return program.map(fn)

    return apply


def run_pass(
    history: PassHistory, name: str, fn: Pass, note: Callable[[Program], str] | None = None
) -> PassHistory:
    """``history`` with ``fn`` run on its last program (verified, timed, recorded, with
    ``note(program)`` saying what it decided)."""
    t0 = time.perf_counter()
    program = history.final
    new = verify(fn(program), ATTRIBUTE_DOMAINS)
    log.debug("after %s:\n%s", name, new)
    said = "" if note is None else note(new)
    record = PassRecord(name, new, time.perf_counter() - t0, new is not program, said)
    return PassHistory([*history.records, record])


def run_passes(
    captured: Program, passes: Sequence[tuple[str, Pass]], capture_seconds: float = 0.0
) -> PassHistory:
    history = PassHistory(
        [PassRecord("capture", verify(captured, ATTRIBUTE_DOMAINS), capture_seconds, True)]
    )
    for name, fn in passes:
        history = run_pass(history, name, fn)
    return history


def default_passes(options: PipelineOptions) -> list[tuple[str, Pass]]:
    """The passes `speq.compile` runs after capture."""
    passes: list[tuple[str, Pass]] = [
        # one kernel per routed-expert block: gather, both GEMMs, SwiGLU and combine fused
        ("fuse_moe", each_graph(fuse_moe)),
    ]
    if options.draft is not None:
        # the draft: the fused step with quantized, resident experts (before WAITs exist)
        passes.append(("make_draft", make_draft(*options.draft, options.shared_draft)))
    passes += [
        # where experts must be resident (WAIT) and where copies start early (PREFETCH)
        ("insert_prefetch", insert_prefetch(options.next_layer_prefetch)),
        # replay regions between host syncs, and the kernel of every node
        ("lower", lower(options.kernels)),
    ]
    return passes
