"""Shape-free routing statistics of `RoutingTrace`s, fitted to recorded runs or external routing
logs, that `speq.sim.trace_gen` generates traces of any shape from. Per MoE layer l (E experts,
top-k; positions in order, pairs of positions taken within a trace):

* ``entropy[l]``: popularity skew: the entropy of the layer's expert-usage distribution (each
  expert's share of all the layer's (position, expert) choices) over log2(E), with the
  Miller–Madow correction (m - 1) / (2 N ln 2) bits (m experts used, N choices) so that a short
  trace does not read as skewed; 1 is uniform.
* ``reuse[l]``: temporal reuse: for consecutive positions t-1, t, the fraction of t's k experts
  that t-1 also routed to, averaged; random baseline k/E.
* ``coupling[l]``, of the layer pair (l, l+1): the expert *linked* to expert a of layer l is the
  one most often top (first in router order) at l+1 when a is top at l; ``coupling`` is how often
  the top expert at l+1 is the one linked to the top at l, two-fold cross-validated: positions
  alternate between the folds in blocks of 8, links are fitted on one fold and their hits
  counted on the other (an expert never top in the fitting fold links to that fold's most
  frequent top at l+1; a trace too short for two folds is counted in-sample). The in-sample
  rate (scripts/routing_stats.py) reads high on short traces, where a most frequent successor
  fits noise. Random baseline 1/E.
* ``agreement[l]``: draft-target agreement: the fraction of the target's k experts that the
  draft also routes the position to, averaged over positions with both; random baseline k/E.
  None without draft routing.
* ``accept``: P(accept[pos]) over the positions with an acceptance; ``accept_after_accept``:
  P(accept[pos] | accept[pos-1]) over those whose predecessor has one: acceptance as a two-state
  Markov chain over positions. None without acceptances (or pairs of them).

A rate x of random baseline b transfers to another shape as its excess over b: (x - b) / (1 - b)
above it (0 at random, 1 always), (x - b) / b below it (-1: never); per-layer lists transfer by
relative depth.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from speq.sim.routing_trace import RoutingTrace

__all__ = ["TraceStats", "compare_stats", "fit_stats", "measure_stats", "trace_stats_table"]

_FOLD_BLOCK = 8  # positions per block of a coupling cross-validation fold


@dataclass(frozen=True)
class TraceStats:
    """Shape-free routing statistics (see the module docstring for each one's definition),
    measured on traces of ``num_experts`` experts, top-``top_k``, over ``positions``."""

    num_experts: int
    top_k: int
    positions: int
    entropy: tuple[float, ...]  # per MoE layer, normalised to [0, 1]
    reuse: tuple[float, ...]  # per MoE layer
    coupling: tuple[float, ...]  # per layer pair (l, l+1)
    agreement: tuple[float, ...] | None = None  # per MoE layer
    accept: float | None = None
    accept_after_accept: float | None = None

    @property
    def moe_layers(self) -> int:
        return len(self.entropy)

    def baseline(self, name: str) -> float:
        """The random baseline of the rate ``name``: reuse, agreement k/E; coupling 1/E."""
        return (1 if name == "coupling" else self.top_k) / self.num_experts

    def excess(self, name: str) -> tuple[float, ...] | None:
        """Per layer, the rate ``name`` (reuse, coupling, agreement) as its excess over its
        random baseline (module docstring): the form that transfers to another shape."""
        values = getattr(self, name)
        return None if values is None else tuple(_excess(x, self.baseline(name)) for x in values)

    def __str__(self) -> str:
        return trace_stats_table(self)


def fit_stats(traces: Sequence[RoutingTrace]) -> TraceStats:
    """The statistics of ``traces`` (one shape), pooled: counts summed over traces, pairs of
    positions taken within a trace."""
    traces = list(traces)
    if not traces:
        raise ValueError("fit_stats needs at least one trace")
    E, k, L = traces[0].num_experts, traces[0].top_k, traces[0].moe_layers
    if any((t.num_experts, t.top_k, t.moe_layers) != (E, k, L) for t in traces):
        raise ValueError("fit_stats: the traces differ in shape (experts, top-k, MoE layers)")
    usage = np.zeros((L, E))
    reuse, pairs = np.zeros(L), 0
    joint = np.zeros((2, max(L - 1, 0), E, E))  # fold, layer pair, top at l, top at l+1
    agree, agreed = np.zeros(L), 0
    acc = [0, 0, 0, 0]  # accepted, counted; accepted after an acceptance, counted
    positions = 0
    for tr in traces:
        pos = np.array(sorted(tr.target), dtype=np.int64)
        if not len(pos):
            continue
        x = _routing(tr.target, pos, E, L, k)
        positions += len(pos)
        for layer in range(L):
            usage[layer] += np.bincount(x[:, layer].ravel(), minlength=E)
        after = np.nonzero(pos[1:] == pos[:-1] + 1)[0]  # x[after + 1] follows x[after]
        reuse += _overlap(x[after + 1], x[after]).sum(0)
        pairs += len(after)
        if L > 1:
            fold = np.broadcast_to(((pos // _FOLD_BLOCK) % 2)[:, None], (len(pos), L - 1))
            layer = np.broadcast_to(np.arange(L - 1), fold.shape)
            np.add.at(joint, (fold, layer, x[:, :-1, 0], x[:, 1:, 0]), 1)
        both = np.array([p for p in pos if p in tr.draft], dtype=np.int64)
        if len(both):
            d = _routing(tr.draft, both, E, L, None)
            agree += _overlap(_routing(tr.target, both, E, L, k), d).sum(0)
            agreed += len(both)
        for p, ok in tr.accept.items():
            acc[0] += ok
            acc[1] += 1
            if tr.accept.get(p - 1):
                acc[2] += ok
                acc[3] += 1
    if not positions:
        raise ValueError("fit_stats: the traces route no positions")
    return TraceStats(
        E,
        k,
        positions,
        entropy=tuple(_normalised_entropy(u) for u in usage),
        reuse=tuple((reuse / pairs).tolist()) if pairs else (k / E,) * L,
        coupling=_coupling(joint),
        agreement=tuple((agree / agreed).tolist()) if agreed else None,
        accept=acc[0] / acc[1] if acc[1] else None,
        accept_after_accept=acc[2] / acc[3] if acc[3] else None,
    )


def measure_stats(trace: RoutingTrace) -> TraceStats:
    """The statistics of one trace."""
    return fit_stats([trace])


def compare_stats(a: TraceStats, b: TraceStats) -> dict[str, tuple[float, float]]:
    """Name -> (a's value, b's value) of the statistics both have, averaged over layers:
    ``entropy``, the rates' excess over random (``reuse_excess``, ``coupling_excess``,
    ``agreement_excess``: these compare across shapes), ``accept``, ``accept_after_accept``;
    when the shapes match, the rates themselves (``reuse``, ...) too; when the layer counts
    match, each per layer too (``reuse_excess[3]``)."""
    same = (a.num_experts, a.top_k) == (b.num_experts, b.top_k)
    out: dict[str, tuple[float, float]] = {}
    for name in ("entropy", "reuse", "coupling", "agreement"):
        forms = [(name, getattr(a, name), getattr(b, name))] if same or name == "entropy" else []
        if name != "entropy":
            forms.append((f"{name}_excess", a.excess(name), b.excess(name)))
        for key, x, y in forms:
            if not x or not y:
                continue
            out[key] = (sum(x) / len(x), sum(y) / len(y))
            if len(x) == len(y):
                out.update({f"{key}[{i}]": (u, v) for i, (u, v) in enumerate(zip(x, y))})
    for name in ("accept", "accept_after_accept"):
        x, y = getattr(a, name), getattr(b, name)
        if x is not None and y is not None:
            out[name] = (x, y)
    return out


def trace_stats_table(stats: TraceStats) -> str:
    """A per-layer table of ``stats``: entropy in bits and normalised, each rate and its
    multiple of the random baseline; then the acceptance chain."""
    s, E = stats, stats.num_experts
    lines = [
        f"routing statistics over {s.positions} positions of {s.moe_layers} MoE layers, "
        f"{E} experts, top-{s.top_k} (random: reuse and agreement {s.baseline('reuse'):.3f}, "
        f"coupling {s.baseline('coupling'):.3f})",
        "layer  entropy bits (norm)  reuse (x random)  coupling l->l+1  agreement",
    ]
    for i in range(s.moe_layers):
        cells = [f"{i:5d}", f"{s.entropy[i] * math.log2(E):7.3f} ({s.entropy[i]:.3f})"]
        for name, values in (("reuse", s.reuse), ("coupling", s.coupling)):
            if i < len(values):
                cells.append(f"{values[i]:7.3f} (x{values[i] / s.baseline(name):.2f})")
            else:
                cells.append(f"{'-':>7s}        ")
        cells.append(f"{s.agreement[i]:7.3f}" if s.agreement else f"{'-':>7s}")
        lines.append("  ".join(cells))
    if s.accept is not None:
        after = "-" if s.accept_after_accept is None else f"{s.accept_after_accept:.3f}"
        lines.append(f"P(accept) {s.accept:.3f}, P(accept | previous accepted) {after}")
    return "\n".join(lines)


# --- measurement ------------------------------------------------------------------------------


def _routing(table: dict, pos: np.ndarray, E: int, L: int, k: int | None) -> np.ndarray:
    """``table``'s rows at ``pos`` as [positions, L, k] expert ids, checked."""
    x = np.array([table[int(p)] for p in pos], dtype=np.int64)
    if x.ndim != 3 or x.shape[1] != L or (k is not None and x.shape[2] != k):
        raise ValueError(f"fit_stats: routing rows of shape {x.shape[1:]}, want ({L}, {k})")
    if x.size and (x.min() < 0 or x.max() >= E):
        raise ValueError(f"fit_stats: expert ids outside [0, {E})")
    return x


def _overlap(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """[positions, L]: the fraction of x's experts that y also has, per position and layer."""
    return (x[..., :, None] == y[..., None, :]).any(-1).mean(-1)


def _normalised_entropy(counts: np.ndarray) -> float:
    n, E = counts.sum(), len(counts)
    if E < 2 or n == 0:
        return 1.0
    q = counts[counts > 0] / n
    bits = float(-(q * np.log2(q)).sum()) + (len(q) - 1) / (2 * n * math.log(2))
    return min(1.0, float(bits / math.log2(E)))


def _coupling(joint: np.ndarray) -> tuple[float, ...]:
    """Per layer pair, the cross-validated hit rate of the most-frequent-successor links."""
    out = []
    for pair in range(joint.shape[1]):
        folds = joint[:, pair]
        if min(folds[0].sum(), folds[1].sum()) == 0:  # too short to split: in-sample
            folds = np.stack([folds.sum(0)] * 2)
        hits = 0.0
        for fit, held in ((0, 1), (1, 0)):
            link = folds[fit].argmax(1)
            link[folds[fit].sum(1) == 0] = folds[fit].sum(0).argmax()
            hits += folds[held][np.arange(len(link)), link].sum()
        out.append(float(hits / folds.sum()))
    return tuple(out)


def _excess(x: float, baseline: float) -> float:
    if x >= baseline:
        return 0.0 if baseline >= 1 else (x - baseline) / (1 - baseline)
    return (x - baseline) / baseline
