"""`speq.compile`: capture a model's decode step, run the pass pipeline, and return a runnable
`CompiledModel`."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from speq.frontend.capture import capture
from speq.frontend.reference import from_reference
from speq.frontend.spec import ModelSpec
from speq.ir.graph import Graph
from speq.ir.interpreter import RunContext, run_graph
from speq.models.kv_cache import KVCache
from speq.models.model import MoEForCausalLM
from speq.passes.history import PassHistory
from speq.passes.pipeline import default_passes, run_passes
from speq.runtime.sampling import SamplingParams, pick

log = logging.getLogger("speq")


@dataclass(frozen=True)
class CompileOptions:
    """How to compile. ``dtype``: the compute dtype (default: the model's own)."""

    dtype: torch.dtype | None = None


class CompiledModel:
    """A compiled model: the captured step graph after every pass, and `generate`."""

    def __init__(
        self,
        spec: ModelSpec,
        params: dict[str, torch.Tensor],
        options: CompileOptions,
        graphs: PassHistory,
    ) -> None:
        self.spec = spec
        self.params = params
        self.options = options
        self.graphs = graphs

    @property
    def config(self):
        return self.spec.config

    @property
    def graph(self) -> Graph:
        """The graph that runs: the output of the last pass."""
        return self.graphs.final

    def new_cache(self) -> KVCache:
        return KVCache(self.config, 1, self.spec.dtype, "cpu")

    def step(self, tokens: torch.Tensor, cache: KVCache, pos: int) -> torch.Tensor:
        """Run the step graph on ``tokens [T]`` at position ``pos``; returns logits ``[T, vocab]``."""
        (logits,) = run_graph(
            self.graph, {"tokens": tokens, "pos": pos}, RunContext(self.params, cache, pos)
        )
        cache.length = pos + tokens.shape[0]
        return logits

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int = 32,
        *,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        callback: Callable[[int], None] | None = None,
    ) -> torch.Tensor:
        """Decode ``max_new_tokens`` tokens after ``input_ids`` (``[1, T]`` or ``[T]``).

        Greedy by default; ``do_sample=True`` samples with ``temperature`` / ``top_k`` / ``top_p``,
        reproducibly for a given ``seed``. ``callback(token)`` is called after each new token.
        Returns ``[1, T + max_new_tokens]`` int64.
        """
        prompt = self.check_input_ids(input_ids)
        if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
        total = prompt.shape[0] + max_new_tokens
        if total > self.config.max_seq_len:
            raise ValueError(
                f"prompt ({prompt.shape[0]} tokens) + max_new_tokens ({max_new_tokens}) = {total} "
                f"exceeds the model's max_seq_len ({self.config.max_seq_len})"
            )
        sampling = SamplingParams(do_sample, temperature, top_k, top_p, seed)
        gen = sampling.generator()
        cache = self.new_cache()
        out = prompt.tolist()
        if max_new_tokens == 0:
            return torch.tensor([out], dtype=torch.int64)
        logits = self.step(prompt, cache, 0)[-1]
        for i in range(max_new_tokens):
            token = pick(logits, sampling, gen)
            out.append(token)
            if callback is not None:
                callback(token)
            if i + 1 < max_new_tokens:
                logits = self.step(torch.tensor([token]), cache, len(out) - 1)[-1]
        return torch.tensor([out], dtype=torch.int64)

    def check_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``input_ids`` as a 1-D int64 tensor, or a ValueError saying what was expected."""
        if not isinstance(input_ids, torch.Tensor):
            raise ValueError(f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"input_ids must be int64 (or int32) token ids, got {input_ids.dtype}")
        if input_ids.dim() == 2 and input_ids.shape[0] == 1:
            input_ids = input_ids[0]
        if input_ids.dim() != 1:
            raise ValueError(
                f"input_ids must have shape [1, T] or [T] (speq decodes one sequence at a time), "
                f"got {tuple(input_ids.shape)}"
            )
        if input_ids.numel() == 0:
            raise ValueError("input_ids is empty: give at least one prompt token")
        v = self.config.vocab_size
        if int(input_ids.min()) < 0 or int(input_ids.max()) >= v:
            raise ValueError(f"input_ids must lie in [0, {v}) (the vocabulary size)")
        return input_ids.to(torch.int64).cpu()


def compile(model: MoEForCausalLM, options: CompileOptions | None = None) -> CompiledModel:
    """Capture ``model``'s decode step, run the pass pipeline and return a `CompiledModel`."""
    options = options or CompileOptions()
    if not isinstance(options, CompileOptions):
        raise TypeError(f"options must be a speq.CompileOptions, got {type(options).__name__}")
    spec, params = from_reference(model, options.dtype)
    t0 = time.perf_counter()
    graph = capture(spec)
    history = run_passes(graph, default_passes(), time.perf_counter() - t0)
    if os.environ.get("SPEQ_DEBUG"):
        log.warning("speq.compile pass history:\n%s", history)
    return CompiledModel(spec, params, options, history)
