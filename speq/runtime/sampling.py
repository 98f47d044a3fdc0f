"""Choosing the next token from logits: greedy, or temperature / top-k / top-p sampling; and
the rules that accept or reject drafted tokens (greedy and speculative sampling)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    """``do_sample=False`` is greedy (argmax; ties to the lowest token id). Otherwise sample from
    ``softmax(logits / temperature)`` restricted to the ``top_k`` most likely tokens and to the
    smallest set whose probability reaches ``top_p``."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        """A TypeError for a wrong type, a ValueError for a bad value, naming the argument."""
        if not isinstance(self.do_sample, bool):
            raise TypeError(f"do_sample must be a bool, got {self.do_sample!r}")
        for name, value, optional in (
            ("temperature", self.temperature, False),
            ("top_p", self.top_p, True),
        ):
            if (value is None and optional) or (
                isinstance(value, (int, float)) and not isinstance(value, bool)
            ):
                continue
            raise TypeError(
                f"{name} must be a number{' or None' if optional else ''}, got {value!r}"
            )
        for name, value in (("top_k", self.top_k), ("seed", self.seed)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
                raise TypeError(f"{name} must be an int or None, got {value!r}")
        if not self.temperature > 0 or not math.isfinite(self.temperature):
            raise ValueError(f"temperature must be > 0 (and finite), got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    def generator(self) -> torch.Generator | None:
        if not self.do_sample:
            return None
        g = torch.Generator()
        if self.seed is None:
            g.seed()
        else:
            g.manual_seed(self.seed)
        return g


def probabilities(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution that sampling draws from, over the last dimension (fp64 for exactness)."""
    scaled = logits.to(torch.float64) / params.temperature
    if params.top_k is not None and params.top_k < scaled.shape[-1]:
        kth = torch.topk(scaled, params.top_k, dim=-1).values[..., -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    if params.top_p is not None and params.top_p < 1:
        sorted_p, order = torch.sort(probs, dim=-1, descending=True)
        before = sorted_p.cumsum(-1) - sorted_p  # mass of the tokens ranked above each token
        keep_sorted = before < params.top_p
        keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
        probs = probs.masked_fill(~keep, 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def greedy(logits: torch.Tensor) -> int:
    return int(torch.argmax(logits, dim=-1))


def pick(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """The next token for 1-D ``logits``."""
    if not params.do_sample:
        return greedy(logits)
    return int(torch.multinomial(probabilities(logits, params), 1, generator=generator))


def greedy_accept(draft: Sequence[int], target_logits: torch.Tensor) -> tuple[int, int]:
    """(accepted drafts, the target's next token): the longest prefix of ``draft`` equal to the
    target's argmax at each position, then the target's argmax after it."""
    choice = torch.argmax(target_logits, dim=-1).tolist()
    n = 0
    while n < len(draft) and draft[n] == choice[n]:
        n += 1
    return n, choice[n]


def speculative_accept(
    draft: Sequence[int],
    q: Sequence[torch.Tensor],
    p: torch.Tensor,
    gen: torch.Generator,
) -> tuple[int, int]:
    """Speculative sampling (Leviathan et al., Chen et al.): draft token ``draft[i]`` was drawn
    from ``q[i]``; ``p[i]`` is the target's distribution at that position (``p`` has one more
    row). Accept it with probability min(1, p/q); at the first rejection draw from
    norm(max(0, p - q)); if all are accepted draw the next token from ``p[len(draft)]``. The
    output tokens are distributed exactly as the target's."""
    for i, d in enumerate(draft):
        pi, qi = p[i], q[i]
        if torch.rand((), generator=gen, dtype=torch.float64) * qi[d] < pi[d]:
            continue
        residual = torch.clamp(pi - qi, min=0.0)
        total = residual.sum()
        dist = residual / total if total > 0 else pi
        return i, int(torch.multinomial(dist, 1, generator=gen))
    return len(draft), int(torch.multinomial(p[len(draft)], 1, generator=gen))


def draft_token(
    logits: torch.Tensor, sampling: SamplingParams, gen: torch.Generator | None
) -> tuple[int, torch.Tensor | None]:
    """A drafted token and, when sampling, the distribution it was drawn from."""
    if not sampling.do_sample:
        return int(torch.argmax(logits)), None
    q = probabilities(logits, sampling)
    return int(torch.multinomial(q, 1, generator=gen)), q
