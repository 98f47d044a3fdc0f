"""Speculative quantized decoding: the Expert Lookahead Buffer, the three-phase prefetch
scheduler, acceptance (greedy and speculative sampling) and the decode cycle.

One cycle, with ``last`` the newest committed token at position p:

1. The draft (quantized experts, everything else the target's) runs k+1 one-token passes over
   ``last, d_1, ..., d_k``, proposing ``d_1..d_k``; the extra pass over ``d_k`` only routes it.
   Each draft router's choice is recorded in the ELB, so the ELB predicts the experts of exactly
   the k+1 tokens that verification will process. On a device the choices reach the host by
   non-blocking copies into pinned memory; each is read once its event has completed, and all by
   the end of their draft pass, so filling the ELB never makes the compute stream wait.
2. While drafting, the scheduler copies predicted target experts: phase I holds the link and
   protects what is resident, phase II starts a bandwidth-bounded few per pass, phase III starts
   everything still missing at high priority. Eviction is lookahead-aware: experts predicted for
   this window go last.
3. The target verifies ``last, d_1..d_k`` in one pass, loading each layer's union of experts once.
   A window whose experts do not all fit in the cache streams through it: once verification has
   used a layer's experts, their slots take the next layers' predicted ones, in need order.
4. Greedy: accept the longest prefix of drafts the target agrees with, plus the target's next
   token. Sampling: speculative sampling, which keeps the target's distribution. The KV cache is
   truncated past the accepted tokens.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from speq.cost import Governor, SpecPolicy
from speq.runtime.elb import ExpertLookaheadBuffer
from speq.runtime.link import Priority
from speq.runtime.offload import OffloadPolicy, OffloadRuntime
from speq.runtime.sampling import (
    SamplingParams,
    draft_token,
    greedy_accept,
    probabilities,
    speculative_accept,
)
from speq.runtime.store import ExpertKey


@dataclass(frozen=True)
class Window:
    """One verification window of a recorded run: the committed token at ``position`` and the
    ``k`` drafts after it (``tokens``, rejected ones included), and the experts the target's
    verification routed each of them to: ``experts[(s, layer)]`` for window token s."""

    position: int
    k: int
    tokens: tuple[int, ...]
    experts: Mapping[tuple[int, int], tuple[int, ...]]


@dataclass
class SpecStats:
    drafted: int = 0
    accepted: int = 0
    cycles: int = 0
    position_tries: list[int] = field(default_factory=list)
    position_accepts: list[int] = field(default_factory=list)
    k_per_cycle: list[int] = field(default_factory=list)
    io_per_cycle: list[tuple[int, int]] = field(default_factory=list)  # (needs, new) at verify
    elb_hit: dict[int, int] = field(default_factory=dict)  # per layer: predicted and used
    elb_predicted: dict[int, int] = field(default_factory=dict)
    elb_used: dict[int, int] = field(default_factory=dict)
    draft_s: float = 0.0
    draft_passes: int = 0
    verify_s: float = 0.0
    verify_needs: int = 0  # (layer, expert) needs at verification
    verify_misses: int = 0  # of which not resident and loaded when needed
    verify_demand: int = 0  # of which not cached at all (neither resident nor being copied)
    verify_new: int = 0  # of which not resident when the cycle began (copied during it)

    def add_position(self, i: int, accepted: bool) -> None:
        while len(self.position_tries) <= i:
            self.position_tries.append(0)
            self.position_accepts.append(0)
        self.position_tries[i] += 1
        self.position_accepts[i] += int(accepted)


@dataclass(frozen=True)
class PendingRoute:
    """One draft router's choice on its way to the host: readable once ``done`` (a device
    event; None for host tensors) has completed."""

    rt: OffloadRuntime
    draft_pass: int
    layer: int
    ids: torch.Tensor
    weights: torch.Tensor
    done: torch.cuda.Event | None

    def ready(self) -> bool:
        return self.done is None or self.done.query()


def _to_pinned(x: torch.Tensor) -> torch.Tensor:
    host = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
    return host.copy_(x, non_blocking=True)


class Speq(OffloadPolicy):
    """The runtime side of the ``speq`` policy: fills the ELB from the draft's PREFETCH nodes,
    schedules copies by phase, protects predicted experts from eviction, and scores the ELB
    against what verification needs."""

    name = "speq"
    eviction = "lookahead"
    drafts = True

    @classmethod
    def for_run(cls, engine: Any, prompt: torch.Tensor, n: int, sampling: Any) -> Speq:
        """Under the governor's policy (and its online k) when the program has one, else at the
        options' fixed k; with perfect prediction, a first speculative pass records the
        verification windows (not timed)."""
        governed, host = engine.governed, engine.options.host_compute

        def make(windows=None) -> Speq:
            if governed is not None:
                return cls(governed.spec, Governor(governed, engine.config), windows, host)
            return cls(SpecPolicy(k=engine.options.k), windows=windows, host=host)

        if engine.options.predictor != "oracle":
            return make()
        return make(engine.record_windows(make(), prompt, n, sampling))

    def __init__(
        self,
        policy: SpecPolicy,
        governor=None,
        windows: Sequence[Window] | None = None,
        host: bool | str = False,
    ) -> None:
        """``governor``: a `speq.cost.Governor` that re-solves k after every cycle;
        None keeps ``policy.k``. ``windows``: perfect prediction, for benchmarks: the
        verification windows of a first pass of this very run (`Recorder`); each cycle then
        drafts the recorded window's k and its ELB holds exactly the experts that window's
        verification routes to, instead of the draft router's choice (the draft still runs and
        proposes the tokens). ``host``: which misses of a verification the host computes
        instead of copying: none (False), each where the cost model says it finishes first
        (``"auto"``), or all (True); predicted experts are prefetched either way."""
        self.policy = policy
        self.host_mode = host
        self.host_compute = host is not False
        self.governor = governor
        self.windows = windows
        self.next_k = policy.k
        self.elb = ExpertLookaheadBuffer()
        self.stats = SpecStats()
        self.k = policy.k
        self.position = 0
        self.cycle_start = 0.0
        self.draft_pass = 0
        self._issued_this_pass = 0
        self.pending: deque[PendingRoute] = deque()  # router choices on their way to the host
        self.verifying = False
        self.verify_layer = -1

    def extra_metrics(self) -> dict:
        st = self.stats
        hit, pred, used = (sum(d.values()) for d in (st.elb_hit, st.elb_predicted, st.elb_used))
        return {
            "acceptance_rate": st.accepted / st.drafted if st.drafted else 0.0,
            "tokens_per_cycle": (st.accepted + st.cycles) / st.cycles if st.cycles else 0.0,
            "acceptance_by_position": [
                a / t for a, t in zip(st.position_accepts, st.position_tries)
            ],
            "cycles": st.cycles,
            "k_per_cycle": list(st.k_per_cycle),
            "elb_precision": hit / pred if pred else 0.0,
            "elb_recall": hit / used if used else 0.0,
            "elb_precision_by_layer": {
                layer: st.elb_hit[layer] / n for layer, n in st.elb_predicted.items() if n
            },
            "elb_recall_by_layer": {
                layer: st.elb_hit[layer] / n for layer, n in st.elb_used.items() if n
            },
            "verify_hit_rate": 1 - st.verify_misses / st.verify_needs if st.verify_needs else 1.0,
            "verify_covered_rate": (
                1 - st.verify_demand / st.verify_needs if st.verify_needs else 1.0
            ),
            "verify_miss_rate": st.verify_misses / st.verify_needs if st.verify_needs else 0.0,
            "verify_new_rate": st.verify_new / st.verify_needs if st.verify_needs else 0.0,
            "verify_needs": st.verify_needs,
            "draft_ms": st.draft_s * 1e3,
            "verify_ms": st.verify_s * 1e3,
        }

    def host_experts(self, rt: OffloadRuntime, layer: int, tokens: Mapping[int, int]) -> list[int]:
        if self.host_mode is False:
            return []
        return rt.host_choice(layer, tokens, always=self.host_mode is True)

    def next_use(self, key: ExpertKey) -> float:
        """Predicted for this window and its layer not yet verified: needed at that layer of the
        verification pass; otherwise not known to be needed."""
        if key.layer >= self.verify_layer and key.expert in self.elb.predicted(key.layer):
            return key.layer
        return math.inf

    def verified(self, position: int, tokens: Sequence[int]) -> None:
        """The window ``tokens`` (the committed token at ``position`` and the drafts) was
        verified."""

    def window_k(self, position: int, k: int) -> int:
        """The k of the cycle at ``position``: ``k``, or the recorded window's under perfect
        prediction (the recording is this run's, so the windows coincide)."""
        if self.windows is None:
            return k
        w = self.windows[self.stats.cycles] if self.stats.cycles < len(self.windows) else None
        if w is None or w.position != position:
            raise RuntimeError(f"perfect prediction: cycle at position {position} is not recorded")
        return w.k

    def start_cycle(self, k: int, position: int, now: float) -> None:
        """A new window: ``k`` drafts after the committed token at ``position``, at time ``now``."""
        self.elb.clear()
        self.k = k
        self.position = position
        self.cycle_start = now
        self.draft_pass = 0
        self.verifying = False
        self.verify_layer = -1

    def on_draft_route(
        self, rt: OffloadRuntime, layer: int, ids: torch.Tensor, weights: torch.Tensor
    ) -> None:
        """A PREFETCH of the draft graph: queue the router's choice for the host, then read
        every queued choice whose copy is done. On a device the choice travels by a
        non-blocking copy into pinned memory, so the compute stream never waits for the ELB;
        host tensors are ready at once."""
        done = None
        if ids.device.type == "cuda":
            ids, weights = _to_pinned(ids), _to_pinned(weights)
            done = torch.cuda.Event()
            done.record()
        self.pending.append(PendingRoute(rt, self.draft_pass, layer, ids, weights, done))
        self.read_routes(wait=False)

    def read_routes(self, wait: bool) -> None:
        """Record queued router choices in the ELB and start their phase's copies, in order:
        those whose copy is done, or all of them with ``wait`` (the end of a draft pass, when
        its token has been read and the device has caught up anyway)."""
        while self.pending and (wait or self.pending[0].ready()):
            r = self.pending.popleft()
            if r.done is not None:
                r.done.synchronize()
            self.schedule(r)

    def schedule(self, r: PendingRoute) -> None:
        """Record one draft router's choice in the ELB and start the copies its phase allows."""
        rt, layer = r.rt, r.layer
        chosen, gates = r.ids.reshape(-1).tolist(), r.weights.reshape(-1).float().tolist()
        if self.windows is not None:
            recorded = self.windows[self.stats.cycles].experts[(r.draft_pass, layer)]
            chosen, gates = list(recorded), [1.0] * len(recorded)
        self.elb.record(r.draft_pass, layer, chosen, gates)
        phase = self.policy.phase(r.draft_pass, self.k)
        if phase == 1:
            return
        order = self.elb.by_confidence() if phase == 2 else self.elb.by_need()
        missing = [(lay, e) for lay, e in order if ExpertKey(lay, e) not in rt.cache]
        if phase == 2:
            budget = self.policy.phase2_width - self._issued_this_pass
            missing = missing[: max(budget, 0)]
        priority = Priority.HIGH if phase == 3 else Priority.NORMAL
        refused: dict[int, int] = {}  # slot group -> the earliest need a slot was refused for
        backlog = rt.link_backlog()
        copy = rt.link.cost(rt.copy_bytes)
        for lay, e in missing:
            group = rt.cache.group_of[lay]
            if refused.get(group, lay + 1) <= lay:  # a later need finds no slot either
                continue
            if self.host_compute and backlog + copy > self._until_needed(rt, lay, r.draft_pass):
                continue  # it would land after its need: the host computes it then
            backlog += copy
            if rt.prefetch(lay, [e], priority, before=lay):
                self._issued_this_pass += 1
            else:
                refused[group] = lay

    def after_layer(self, rt: OffloadRuntime, layer: int) -> None:
        """Verification is done with ``layer``: its experts lose their protection, and the link
        goes on copying the window's predicted experts of later layers, in the order they will
        be needed, into the slots that frees (the stream continues when the window's experts do
        not all fit in the cache)."""
        if not self.verifying:
            return
        self.verify_layer = layer + 1
        backlog, copy = rt.link_backlog(), rt.link.cost(rt.copy_bytes)
        for lay, e in self.elb.by_need():
            missing = lay > layer and ExpertKey(lay, e) not in rt.cache
            if not missing:
                continue
            if self.host_compute:
                if backlog + copy > self._verify_s() * (lay - layer) / len(rt.store.layers):
                    continue  # it would land after its need: the host computes it then
                backlog += copy
            if not rt.prefetch(lay, [e], Priority.HIGH, before=lay):
                break

    def _verify_s(self) -> float:
        """A verification's time so far in this run (its mean; 0 before the first)."""
        st = self.stats
        return st.verify_s / st.cycles if st.cycles else 0.0

    def _until_needed(self, rt: OffloadRuntime, layer: int, draft_pass: int) -> float:
        """About how long from now until verification needs ``layer``: the draft passes left,
        then the layers before it, at this run's mean times so far (0 before the first cycle)."""
        st = self.stats
        pass_s = st.draft_s / st.draft_passes if st.draft_passes else 0.0
        position = rt.store.layers.index(layer) / len(rt.store.layers)
        return (self.k - draft_pass) * pass_s + position * self._verify_s()

    def begin_draft_pass(self, s: int) -> None:
        self.read_routes(wait=True)
        self.draft_pass = s
        self._issued_this_pass = 0

    def on_need(self, rt: OffloadRuntime, layer: int, experts: Sequence[int]) -> None:
        if not self.verifying:
            return
        self.verify_layer = layer
        st = self.stats
        for e in experts:
            entry = rt.cache.get(ExpertKey(layer, e))
            st.verify_misses += entry is None or entry.loading
            st.verify_demand += entry is None
            st.verify_new += entry is None or (
                entry.copy is not None and entry.copy.issued_at >= self.cycle_start
            )
        st.verify_needs += len(experts)
        if self.k == 0:  # nothing was drafted, so nothing predicted: the ELB is not scored
            return
        used, predicted = set(experts), self.elb.predicted(layer)
        st.elb_hit[layer] = st.elb_hit.get(layer, 0) + len(used & predicted)
        st.elb_predicted[layer] = st.elb_predicted.get(layer, 0) + len(predicted)
        st.elb_used[layer] = st.elb_used.get(layer, 0) + len(used)


class Recorder(Speq):
    """Speculation that records its verification windows (the first pass of perfect prediction):
    each cycle's position, k, tokens and the experts verification routed each token to."""

    def __init__(self, speq: Speq) -> None:
        super().__init__(speq.policy, speq.governor, host=speq.host_mode)
        self.recorded: list[Window] = []
        self._experts: dict[tuple[int, int], tuple[int, ...]] = {}

    def on_routing(self, rt: OffloadRuntime, layer: int, rows: list[list[int]]) -> None:
        if self.verifying:
            for s, row in enumerate(rows):
                self._experts[(s, layer)] = tuple(row)

    def verified(self, position: int, tokens: Sequence[int]) -> None:
        self.recorded.append(Window(position, len(tokens) - 1, tuple(tokens), self._experts))
        self._experts = {}


StepFn = Callable[[str, torch.Tensor, int], torch.Tensor]


def speculative_decode(
    step: StepFn,
    truncate: Callable[[int], None],
    speq: Speq,
    prompt: list[int],
    n: int,
    max_seq_len: int,
    sampling: SamplingParams,
    gen: torch.Generator | None,
    clock: Callable[[], float],
    on_tokens: Callable[[list[int]], None],
) -> list[int]:
    """Decode ``n`` tokens after ``prompt`` (whose last token is not yet in the KV cache).

    ``step(graph, tokens, pos)`` runs the ``"step"`` (target) or ``"draft"`` graph and returns
    its logits; ``truncate(length)`` rolls the KV cache back.
    """
    out = list(prompt)
    st = speq.stats
    while len(out) - len(prompt) < n:
        p = len(out) - 1
        remaining = n - (len(out) - len(prompt))
        k = speq.window_k(p, max(0, min(speq.next_k, remaining - 1, max_seq_len - p - 1)))
        needs0, new0 = st.verify_needs, st.verify_new
        speq.start_cycle(k, p, clock())
        drafts: list[int] = []
        qs: list[torch.Tensor] = []
        t0 = clock()
        x = out[-1]
        for s in range(k + 1 if k else 0):
            speq.begin_draft_pass(s)
            logits = step("draft", torch.tensor([x]), p + s)[-1].cpu()
            if s == k:
                break  # the extra pass routes d_k for the ELB; its proposal is not used
            x, q = draft_token(logits, sampling, gen)
            drafts.append(x)
            if q is not None:
                qs.append(q)
        speq.read_routes(wait=True)
        t1 = clock()
        speq.verifying = True
        target = step("step", torch.tensor([out[-1], *drafts]), p).cpu()
        speq.verifying = False
        speq.verified(p, [out[-1], *drafts])
        st.draft_s += t1 - t0
        st.draft_passes += k + 1 if k else 0
        st.verify_s += clock() - t1
        if sampling.do_sample:
            accepted, nxt = speculative_accept(drafts, qs, probabilities(target, sampling), gen)
        else:
            accepted, nxt = greedy_accept(drafts, target)
        tries = [i < accepted for i in range(min(accepted + 1, k))]
        for i, ok in enumerate(tries):
            st.add_position(i, ok)
        if speq.governor is not None and k:
            speq.next_k = speq.governor.update(
                tries, st.verify_needs - needs0, st.verify_new - new0, k
            )
        st.drafted += k
        st.accepted += accepted
        st.cycles += 1
        st.k_per_cycle.append(k)
        st.io_per_cycle.append((st.verify_needs - needs0, st.verify_new - new0))
        new = [*drafts[:accepted], nxt]
        out.extend(new)
        truncate(p + accepted + 1)  # positions p .. p+accepted hold verified tokens
        on_tokens(new)
    return out
