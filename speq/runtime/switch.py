"""The mid-run switch to the draft.

The governor splits device memory once, on a calibration prompt, whose routing may reuse experts
far more than the text decoded later. A run that decodes one token at a time without the draft
(the governor gave its bytes to the expert cache) watches the seconds its misses cost a token
(copies, and experts computed on the host) and the experts a layer its tokens were routed over; past ``SWITCH_WARMUP`` tokens (which fill the cache from the
prompt's experts) it re-weighs the split on the last ``SWITCH_WINDOW`` of them
(`speq.cost.switch_to_draft`). When speculating is predicted to save more than switching costs,
the cache is freed, the draft comes over the link while the compute waits, the smaller pool is
allocated, and the run goes on speculating.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from speq.cost import CacheModel, Governor, Policy, switch_to_draft
from speq.runtime.link import VirtualLink
from speq.runtime.offload import OffloadRuntime
from speq.runtime.sampling import SamplingParams
from speq.runtime.session import Session
from speq.runtime.speculative import Speq

if TYPE_CHECKING:
    from speq.runtime.engine import Engine

SWITCH_WARMUP = 4
SWITCH_WINDOW = 8


class MidRunSwitch:
    """The switch of one engine: `prepare` before a run, `watch` during it."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.switched_after: int | None = None  # new tokens decoded before the last run switched

    def watch(self, rt: OffloadRuntime) -> Watch:
        return Watch(self, rt)

    def cost_s(self) -> float:
        """Seconds a switch costs: the draft's upload, and copying a cache's worth of experts
        again into the smaller cache. Under shared draft memory the switch is not made (its
        INT4 slots start from a cache filled at load), so its cost is infinite."""
        engine = self.engine
        if engine.draft.shared:
            return math.inf
        link = VirtualLink(*engine.link_params)
        return link.cost(engine.draft.nbytes) + engine.calibrator.draft_slots * link.cost(
            engine.memory.expert_bytes
        )

    def switch(
        self,
        session: Session,
        policy: Policy,
        out: list[int],
        remaining: int,
        sampling: SamplingParams,
        gen: torch.Generator | None,
    ) -> Speq:
        """Give the cache's memory back to the draft, which comes over the link while the
        compute waits, and speculate under ``policy`` with the smaller cache (it starts empty:
        the old slots are freed before the draft and the new pool are allocated) for the
        ``remaining`` tokens after ``out``. Under perfect prediction the windows from here on
        are recorded first (not timed), from the sampling generator's current state."""
        engine, rt = self.engine, session.runtime
        rt.quiesce()
        rt.pool = engine.pool = None
        engine.draft.upload(rt, session.backend.copies_weights)
        session.params.update(engine.draft.params)
        engine.replan()
        host = engine.options.host_compute
        speq = Speq(policy.spec, Governor(policy, engine.config), host=host)
        if engine.options.predictor == "oracle":
            state = None if gen is None else torch.Generator().set_state(gen.get_state())
            prompt = torch.tensor(out)
            windows = engine.record_windows(speq, prompt, remaining, sampling, state)
            speq = Speq(policy.spec, Governor(policy, engine.config), windows, host)
        rt.rebind(engine.cache(speq, engine.memory.slots), engine.pool, speq)
        return speq


class Watch:
    """One run's seconds waited for misses, kept after each new token."""

    def __init__(self, switch: MidRunSwitch, rt: OffloadRuntime) -> None:
        self.switch, self.rt = switch, rt
        self.marks = [(self.waited(), len(rt.needs_log))]  # after each token

    def waited(self) -> float:
        """Seconds the run's misses so far cost by the governor's hardware model: each expert
        copied a copy's time, each computed on the host its host time."""
        c = self.rt.counters
        return self.switch.engine.governed.hardware.wait_s(c.experts_moved, c.host_expert_runs)

    def after_token(
        self,
        done: int,
        remaining: int,
        session: Session,
        out: list[int],
        sampling: SamplingParams,
        gen: torch.Generator | None,
    ) -> Speq | None:
        """After the ``done``-th new token (``out`` so far), ``remaining`` to go: the
        speculative policy to go on with if the run switches now, else None."""
        rt = self.rt
        self.marks.append((self.waited(), len(rt.needs_log)))
        if not (done >= SWITCH_WARMUP + SWITCH_WINDOW and remaining > 0):
            return None
        (waited0, log0), (waited1, log1) = self.marks[-1 - SWITCH_WINDOW], self.marks[-1]
        experts: dict[int, set[int]] = {}
        for layer, chosen in rt.needs_log[log0:log1]:
            experts.setdefault(layer, set()).update(chosen)
        per_layer = sum(map(len, experts.values())) / max(len(experts), 1)
        engine = self.switch.engine
        pool = CacheModel.observed_pool(engine.config, per_layer, SWITCH_WINDOW)
        io_s = (waited1 - waited0) / SWITCH_WINDOW
        policy = switch_to_draft(
            engine.governed, engine.config, io_s, pool, remaining, self.switch.cost_s()
        )
        if policy is None:
            return None
        self.switch.switched_after = done
        return self.switch.switch(session, policy, out, remaining, sampling, gen)
