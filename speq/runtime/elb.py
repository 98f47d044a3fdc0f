"""The Expert Lookahead Buffer: the experts the draft predicts for a verification window."""

from __future__ import annotations


class ExpertLookaheadBuffer:
    """ELB[s][layer] = (expert ids, gate confidences) the draft chose for the s-th token of the
    window, per MoE layer."""

    def __init__(self) -> None:
        self.entries: dict[tuple[int, int], tuple[list[int], list[float]]] = {}
        self._confidence: dict[tuple[int, int], float] = {}  # (layer, expert) -> best gate weight
        self._by_layer: dict[int, set[int]] = {}

    def record(self, s: int, layer: int, ids: list[int], weights: list[float]) -> None:
        self.entries[(s, layer)] = (ids, weights)
        for e, w in zip(ids, weights):
            self._confidence[(layer, e)] = max(self._confidence.get((layer, e), 0.0), w)
            self._by_layer.setdefault(layer, set()).add(e)

    def clear(self) -> None:
        self.entries.clear()
        self._confidence.clear()
        self._by_layer.clear()

    def predicted(self, layer: int) -> set[int]:
        return self._by_layer.get(layer, set())

    def by_confidence(self) -> list[tuple[int, int]]:
        """Predicted (layer, expert) pairs, the most confident (highest gate weight any token
        gave it) first: the order a bandwidth-bounded prefetch picks them in."""
        c = self._confidence
        return sorted(c, key=lambda le: (-c[le], le[0], le[1]))

    def by_need(self) -> list[tuple[int, int]]:
        """Predicted (layer, expert) pairs in the order verification will need them."""
        c = self._confidence
        return sorted(c, key=lambda le: (le[0], -c[le], le[1]))
