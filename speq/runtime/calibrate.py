"""`Calibrator`: measures, on the backend in use, what the governor decides from.

Pass times first (one draft pass and target passes over several token counts, experts read
where they are, no copies: wall clock, or the sim backend's virtual clock), then short
virtual-clock probes: speculation at a fixed k for the acceptance, the routing locality and the
cache's reuse, and one-token decoding with the draft's memory as cache for the copies per token
of the other split. The probes count experts, not time, so the virtual clock serves them without
waiting. The result is a `speq.cost.Calibration`, which the governor pass turns into the policy.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from speq.cost import CacheModel, Calibration, HardwareModel, SpecPolicy
from speq.runtime.link import VirtualLink
from speq.runtime.offload import OffloadPolicy
from speq.runtime.policies import Fiddler, OnDemand
from speq.runtime.sampling import SamplingParams
from speq.runtime.speculative import Speq

if TYPE_CHECKING:
    from speq.runtime.engine import Engine

PASS_TOKENS = (1, 2, 3, 5, 9, 17)  # the target pass sizes timed (T_verify is interpolated)
REPROBES = 3  # probes at the governed k after the first (`Calibrator.reprobed`)


class Calibrator:
    """Calibration of one engine (see the module docstring)."""

    def __init__(self, engine: Engine, probe_k: int = 8, probe_tokens: int = 32) -> None:
        self.engine, self.probe_k, self.probe_tokens = engine, probe_k, probe_tokens
        self.draft_slots = 0  # expert slots beside the draft when it last calibrated

    def measure(self, prompt: torch.Tensor | None) -> Calibration:
        """Calibrate on ``prompt`` (None: a fixed random prompt, at compile time) with the draft
        on the device."""
        engine = self.engine
        cfg = engine.config
        self.draft_slots = engine.memory.slots  # the cache beside the draft
        if prompt is None:
            # a fixed random prompt: a counting sequence makes the model babble digits that
            # touch only a few experts, which says nothing about a cache's misses on real text
            gen = torch.Generator().manual_seed(0)
            prompt = torch.randint(0, cfg.vocab_size, (16,), generator=gen)
        draft_s, verify = self.time_passes(prompt[None])
        copy_s = VirtualLink(*engine.link_params).cost(engine.memory.expert_bytes)
        source = f"measured ({engine.backend.name})"
        hw = HardwareModel(draft_s, verify, copy_s, source, self.host_seconds())
        k = self.probe_k
        n = self.probe_length(prompt, k)
        acceptance, needs, new, tokens = self.probe(prompt, k, n)
        cache = CacheModel.observed(cfg, engine.memory.slots, needs, new, tokens)
        fits = cache.largest_fitting_k(cfg)
        if cache.kept(needs) < needs / 2 and fits:
            # the probe's windows overflowed the cache, which hides how much a window keeps from
            # the one before: probe again at the largest k whose window fits
            cache = self.reuse_at(cache, prompt, fits, n)
        else:
            cache = cache.measured_at(k, cache.reuse)
        plain_io_s, plain_host = self.plain(prompt, n, hw)
        ttft = engine.options.ttft_budget_ms
        calibration = Calibration(
            hw,
            tuple(acceptance or [0.5]),
            cache,
            plain_io_s=plain_io_s,
            plain_host=plain_host,
            ttft_budget_s=math.inf if ttft is None else ttft / 1e3,
        )
        return self.reprobed(calibration, prompt)

    def probe_length(self, prompt: torch.Tensor, k: int) -> int:
        """Tokens a probe at ``k`` decodes: `probe_tokens`, fewer where the context ends."""
        room = self.engine.config.max_seq_len - prompt.shape[0] - k - 1
        return max(1, min(self.probe_tokens, room))

    def reprobed(self, calibration: Calibration, prompt: torch.Tensor) -> Calibration:
        """The calibration with the cache's reuse measured at the k the governor picks: a
        window's reuse depends on its length (a short window's prefetches churn the cache more
        per token than a long one's), so a k that was not probed is judged by the reuse of the
        probed k's around it (`CacheModel.reuse_for`). Probe at the governed k and govern
        again, until the pick was probed (at most `REPROBES` probes)."""
        cfg = self.engine.config
        for _ in range(REPROBES):
            k = calibration.govern(cfg).spec.k
            if k in dict(calibration.cache.measured):
                break
            cache = self.reuse_at(calibration.cache, prompt, k, self.probe_length(prompt, k))
            calibration = dataclasses.replace(calibration, cache=cache)
        return calibration

    def reuse_at(self, cache: CacheModel, prompt: torch.Tensor, k: int, n: int) -> CacheModel:
        """``cache`` with the reuse that a probe at ``k`` over ``n`` tokens shows, measured at
        ``k``."""
        _, needs, new, _ = self.probe(prompt, k, n)
        return cache.measured_at(k, cache.observed_reuse(needs, new, k))

    def host_seconds(self) -> float:
        """One expert computed on the host for one token, its share of a layer's latency
        included (inf when ``CompileOptions.host_compute`` is False)."""
        engine = self.engine
        if engine.options.host_compute is False:
            return math.inf
        link = VirtualLink(*engine.link_params)
        rate = engine.host_rate(engine.backend, link)
        share = rate.latency / engine.config.top_k
        return rate.expert_seconds(engine.memory.expert_bytes, engine.store.expert_flops) + share

    def time_passes(
        self,
        prompt: torch.Tensor,
        tokens: Sequence[int] = PASS_TOKENS,
        repeats: int = 3,
        slots: int | None = None,
    ) -> tuple[float, dict[int, float]]:
        """Median seconds of one draft pass and of target passes over each of ``tokens`` new
        tokens, compute only (experts are read where they are, no copies), on the wall clock or
        the sim backend's virtual clock. ``slots``: the cache the passes run beside (default:
        every expert; a shared draft's pass is then interpolated, `shared_draft_seconds`)."""
        engine = self.engine
        # every expert resident in a cache of its own: on a modelled clock a pass that missed
        # would count its copies' stalls as compute
        every = len(engine.store.keys())
        session = engine.session(Speq(SpecPolicy(k=1)), virtual=True, slots=slots or every)
        cache = engine.kv_cache()
        p = int(prompt.shape[-1])
        ids = prompt.reshape(-1)
        engine.step("step", ids, cache, 0, session)
        if engine.backend.modelled_time:
            clock = session.link.now
        else:  # synchronised: on CUDA a pass returns once queued (the draft has no host sync)

            def clock() -> float:
                engine.backend.synchronize()
                return time.perf_counter()

        def timed(graph: str, t: int) -> float:
            samples = []
            for _ in range(repeats):
                x = ids[:t] if t <= p else ids.repeat(t // p + 1)[:t]
                t0 = clock()
                engine.step(graph, x, cache, p, session)
                samples.append(clock() - t0)
                cache.truncate(p)
            return statistics.median(samples)

        draft = timed("draft", 1) if "draft" in engine.program else 0.0
        verify = {t: timed("step", t) for t in tokens}
        session.finish("calibrate", 0, 0)
        if slots is None and engine.draft.shared and draft and engine.memory.slots < every:
            draft = self.shared_draft_seconds(prompt, draft, repeats)
        return draft, verify

    def shared_draft_seconds(self, prompt: torch.Tensor, full_s: float, repeats: int) -> float:
        """Under shared draft memory the draft reads the experts the cache holds at full
        precision and the rest as INT4: one draft pass timed with the fewest experts cached,
        and the time interpolated linearly in the experts held at full precision between that
        and ``full_s`` (every expert at full precision) for the planned cache."""
        engine = self.engine
        every = len(engine.store.keys())
        few = min(engine.config.top_k * len(engine.store.layers), engine.memory.slots)
        int4_s, _ = self.time_passes(prompt, (), repeats, slots=few)
        return int4_s + (full_s - int4_s) * (engine.memory.slots - few) / (every - few)

    def probe(
        self, prompt: torch.Tensor, k: int, n: int
    ) -> tuple[list[float], float, float, float]:
        """Speculate at a fixed ``k`` for ``n`` tokens on the virtual clock: (acceptance by draft
        position (`_shrunk`), experts needed at verification per cycle, of which copied during the cycle,
        tokens per window), the cache's steady state (past the first cycle, which starts from
        the prefill's experts)."""
        engine = self.engine
        probe = Speq(SpecPolicy(k=k))
        session = engine.session(probe, virtual=True)
        engine.decode(prompt, n, SamplingParams(), session)
        session.finish("calibrate", prompt.shape[0], n)
        st = probe.stats
        steady = slice(1 if st.cycles > 1 else 0, None)
        ks, io = st.k_per_cycle[steady], st.io_per_cycle[steady]
        needs, new = (sum(x) / len(io) for x in zip(*io))
        return _shrunk(st.position_accepts, st.position_tries), needs, new, 1 + sum(ks) / len(ks)

    def plain(self, prompt: torch.Tensor, n: int, hw: HardwareModel) -> tuple[float, bool]:
        """The other split of the memory: no draft, its bytes as cache slots, one token per
        pass. Seconds a token waits for its misses in the steady state, and whether that is
        fiddler's way (misses computed on the host where faster) rather than ondemand's (every
        miss copied): whichever of those `CompileOptions.host_compute` allows waits less over
        the whole probe (fiddler's placement at load and ondemand's filling from the prompt
        differ most early on; a tie goes to ondemand)."""
        waits = {False: self.draftless_waits(OnDemand(), prompt, n, hw)}
        if self.engine.options.host_compute is not False:
            waits[True] = self.draftless_waits(Fiddler(), prompt, n, hw)
        host = min(waits, key=lambda h: (round(waits[h][0], 12), h))
        return waits[host][1], host

    def draftless_waits(
        self, policy: OffloadPolicy, prompt: torch.Tensor, n: int, hw: HardwareModel
    ) -> tuple[float, float]:
        """Seconds a token of ``policy``'s one-token decoding waits for its misses, with the
        draft's bytes as cache slots (`HardwareModel.wait_s` of its copies and host experts): over the whole run (past the prefill), and in the steady state, past the first
        half (as the speculative probe's cycles are counted past the first). A virtual-clock
        run: what misses is counted, not timed, so the run does not wait for the link."""
        engine = self.engine
        mem = engine.memory
        slots = min(len(engine.store.keys()), mem.slots + mem.draft_bytes // mem.expert_bytes)
        session = engine.session(policy, virtual=True, slots=slots)
        waited: list[float] = []
        c = session.runtime.counters
        engine.decode(
            prompt,
            n,
            SamplingParams(),
            session,
            lambda _: waited.append(hw.wait_s(c.experts_moved, c.host_expert_runs)),
        )
        m = session.finish("calibrate", prompt.shape[0], n)  # counts past the prefill
        half = len(waited) // 2
        steady = (waited[-1] - (waited[half - 1] if half else 0.0)) / (len(waited) - half)
        return hw.wait_s(m.experts_moved, m["host_expert_runs"]) / n, steady


PRIOR_TRIES = 2  # pseudo-tries of the pooled acceptance each position's estimate starts from


def _shrunk(accepts: list[int], tries: list[int]) -> list[float]:
    """Acceptance by draft position, each shrunk towards the pooled rate over all positions by
    `PRIOR_TRIES` pseudo-tries: a short probe reaches the later positions a few times, and a
    rate of 1.0 from three tries would promise long windows the text does not give."""
    pooled = sum(accepts) / sum(tries) if sum(tries) else 0.5
    return [(a + PRIOR_TRIES * pooled) / (t + PRIOR_TRIES) for a, t in zip(accepts, tries)]
