"""`speq.compile`: capture a model's decode step, run the pass pipeline, and return a
`CompiledModel`, a thin façade over the `speq.runtime.engine.Engine` that runs the program."""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable

import torch

from speq.cost import Calibration, Policy
from speq.frontend.capture import capture
from speq.frontend.checkpoint import from_checkpoint
from speq.frontend.hf import from_hf_model, is_hf_model
from speq.frontend.reference import from_reference
from speq.ir.graph import Graph
from speq.ir.program import Program
from speq.models.model import MoEForCausalLM
from speq.models.spec import ModelSpec
from speq.passes.governor import governor
from speq.passes.history import PassHistory
from speq.passes.pipeline import PipelineOptions, default_passes, run_pass, run_passes
from speq.runtime.backends import get_backend
from speq.runtime.budget import MemoryPlan
from speq.runtime.engine import Engine
from speq.runtime.metrics import Metrics
from speq.runtime.options import CompileOptions, context_length
from speq.runtime.policies import get_policy
from speq.runtime.sampling import SamplingParams
from speq.runtime.store import ExpertStore
from speq.sim.routing_trace import RoutingTrace

__all__ = ["CompileOptions", "CompiledModel", "compile"]

log = logging.getLogger("speq")


class CompiledModel:
    """A compiled model: the program after every pass (``graphs``), `generate`, and the
    ``metrics`` of the last call. The `Engine` (``engine``) runs the program."""

    def __init__(
        self,
        spec: ModelSpec,
        params: dict[str, torch.Tensor],
        options: CompileOptions,
        graphs: PassHistory,
        routing_trace: RoutingTrace | None = None,
        measured: bool = False,
        calibration: Calibration | None = None,
    ) -> None:
        """``routing_trace``: the ``trace`` backend's routing; ``measured``: its node times from
        the trace's measurements; ``calibration``: what the governor decides from, instead of
        calibrating (a simulation of a recorded governed run decides as the run did)."""
        self.spec, self.options, self.graphs = spec, options, graphs
        self.engine = Engine(spec, params, graphs.final, options, routing_trace)
        self.engine.measured_node_times = measured
        self.calibration: Calibration | None = None  # the governor's last
        # a given calibration stands; on the trace backend tokens decide nothing (the trace
        # routes every position), so recalibrating on the first prompt would measure the same
        self._calibrated_on_input = (
            not self.engine.governs or calibration is not None or routing_trace is not None
        )
        if self.engine.governs:
            self._govern(None, "governor", calibration)

    def calibrate(self, input_ids: torch.Tensor) -> None:
        """Calibrate the governor on ``input_ids`` (text like what will be decoded, but not the
        text measured) instead of on the first `generate`'s own prompt. Its time is
        ``metrics["calibration_s"]`` of the runs after. A no-op for a policy without a governor."""
        prompt = self.engine.check_request(input_ids, 0)
        if self.engine.governs:
            self._calibrated_on_input = True
            self._govern(prompt, "governor (recalibrated on a calibration prompt)")

    def _govern(
        self, prompt: torch.Tensor | None, name: str, calibration: Calibration | None = None
    ) -> None:
        """Calibrate the engine on ``prompt`` (None: a fixed random one) unless a
        ``calibration`` is given, run the governor pass on it, and have the engine run the
        policy the pass chose."""
        if calibration is None:
            t0 = time.perf_counter()
            calibration = self.engine.calibrate(prompt)
            self.engine.calibration_s = time.perf_counter() - t0
            took = f"calibrated on the {self.options.backend} backend in {self.engine.calibration_s:.2f} s"
        else:
            self.engine.restore_draft()
            took = "a given calibration"
        self.calibration = calibration
        self.graphs = run_pass(
            self.graphs,
            name,
            governor(self.config, calibration),
            note=lambda p: f"governor ({took}): " + p.annotations["policy"].describe(),
        )
        self.engine.use(self.program)

    @property
    def config(self):
        return self.spec.config

    @property
    def program(self) -> Program:
        """The program that runs: the output of the last pass."""
        return self.graphs.final

    @property
    def graph(self) -> Graph:
        """The target's step graph that runs."""
        return self.program["step"]

    @property
    def metrics(self) -> Metrics | None:
        """What the last `generate` measured (None before the first)."""
        return self.engine.metrics

    @property
    def governed(self) -> Policy | None:
        """The governor's policy, when it chose one."""
        return self.engine.governed

    @property
    def memory(self) -> MemoryPlan:
        """How the device budget is spent now."""
        return self.engine.memory

    @property
    def store(self) -> ExpertStore:
        return self.engine.store

    @property
    def draft_bytes(self) -> int:
        """Bytes of the draft's quantized experts on the device now (0: none)."""
        return self.engine.memory.draft_bytes

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
        Returns ``[1, T + max_new_tokens]`` int64; what was measured is in ``self.metrics``.
        """
        prompt = self.engine.check_request(input_ids, max_new_tokens, callback)
        sampling = SamplingParams(do_sample, temperature, top_k, top_p, seed)
        if max_new_tokens == 0:
            return prompt[None].clone()
        if not self._calibrated_on_input:
            # the compile-time choice came from a random prompt; real text routes differently
            # (it reuses experts), which decides whether the draft earns its memory (`calibrate`
            # gives other text to decide on)
            self._calibrated_on_input = True
            self._govern(prompt, "governor (recalibrated on the first prompt)")
        out = self.engine.generate(prompt, max_new_tokens, sampling, callback)
        return torch.tensor([out], dtype=torch.int64)


def compile(
    model: MoEForCausalLM | torch.nn.Module | str | os.PathLike,
    options: CompileOptions | None = None,
    progress: Callable[[int], None] | None = None,
) -> CompiledModel:
    """Capture ``model``'s decode step, run the pass pipeline and return a `CompiledModel`.

    ``model`` is a `speq.models.MoEForCausalLM`, a transformers ``...ForCausalLM`` of a
    supported family (speq.models.hf), or the path of a checkpoint folder (either format), whose
    weights are then memory-mapped rather than loaded; ``progress(n)`` is called as its shards
    open.
    """
    options = options or CompileOptions()
    if not isinstance(options, CompileOptions):
        raise TypeError(f"options must be a speq.CompileOptions, got {type(options).__name__}")
    if isinstance(model, (str, os.PathLike)):
        spec, params = from_checkpoint(model, options.dtype, progress)
    elif is_hf_model(model):
        spec, params = from_hf_model(model, options.dtype)
    else:
        spec, params = from_reference(model, options.dtype)
    return compile_spec(spec, params, options)


def compile_spec(
    spec: ModelSpec,
    params: dict[str, torch.Tensor],
    options: CompileOptions,
    routing_trace: RoutingTrace | None = None,
    measured: bool = False,
    calibration: Calibration | None = None,
) -> CompiledModel:
    """`compile` from a model's spec and weights (``routing_trace``, ``measured``,
    ``calibration``: see `CompiledModel`)."""
    context = context_length(options, spec.config.max_seq_len)
    if context != spec.config.max_seq_len:
        spec = ModelSpec(dataclasses.replace(spec.config, max_seq_len=context), spec.dtype)
    t0 = time.perf_counter()
    program = Program((capture(spec),))
    passes = default_passes(pipeline_options(options))
    history = run_passes(program, passes, time.perf_counter() - t0)
    if os.environ.get("SPEQ_DEBUG"):
        log.warning("speq.compile pass history:\n%s", history)
    return CompiledModel(spec, params, options, history, routing_trace, measured, calibration)


def pipeline_options(options: CompileOptions) -> PipelineOptions:
    """What the passes need of ``options``: the backend's kernels, the policy's draft and
    prefetch."""
    policy = get_policy(options.policy)
    return PipelineOptions(
        kernels=get_backend(options.backend).kernels,
        draft=(options.draft_bits, options.draft_group_size) if policy.drafts else None,
        shared_draft=options.shared_draft,
        next_layer_prefetch=policy.next_layer_prefetch,
    )
