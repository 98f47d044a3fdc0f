"""governor: annotate the program with the policy the Amortization Roofline chooses.

Precondition: lower ran (the program is final but for this decision). The decision needs
measurements of the backend the program will run on (pass times, acceptance, routing locality,
cache reuse: a `speq.cost.Calibration`), which the engine takes by running the program; the pass
turns them into the policy (k*, the prefetch phases, the split of device memory between the draft
and the expert cache) with `speq.cost.govern`, and records it as ``program.annotations["policy"]``.
The engine reads it from there. At run time the engine re-solves k with the same model.

`modelled_hardware` gives the same measurements from the cost model instead, for a model and a
hardware profile (``speq roofline``, the paper-scale configurations).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from speq.cost import CacheModel, Calibration, HardwareModel, Policy, govern
from speq.frontend.capture import capture
from speq.ir.program import Program
from speq.models.config import MoEConfig
from speq.models.spec import ModelSpec
from speq.passes.fuse_moe import fuse_moe
from speq.passes.make_draft import make_draft
from speq.sim.cost import link_seconds, step_seconds
from speq.sim.presets import expert_bytes
from speq.sim.profiles import HardwareProfile


def governor(cfg: MoEConfig, calibration: Calibration) -> Callable[[Program], Program]:
    def governor(program: Program) -> Program:
        if "draft" not in program:
            raise ValueError("governor needs a draft graph (make_draft) to weigh speculation")
        return program.annotate(policy=calibration.govern(cfg))

    return governor


def modelled_hardware(
    cfg: MoEConfig, profile: HardwareProfile, context: int = 512
) -> HardwareModel:
    """Draft-pass, verify and copy times of ``cfg`` on ``profile`` from the cost model (bf16
    weights, INT4 draft experts)."""
    program = make_draft(4, 128)(Program((fuse_moe(capture(ModelSpec(cfg, torch.bfloat16))),)))
    draft = step_seconds(program["draft"], cfg, 1, context, profile)
    verify = {t: step_seconds(program["step"], cfg, t, context, profile) for t in (1, 2, 3, 5, 9)}
    return HardwareModel(
        draft, verify, link_seconds(expert_bytes(cfg), profile), source=f"modelled ({profile.name})"
    )


def roofline(
    cfg: MoEConfig, profile: HardwareProfile, acceptance: float, miss_rate: float
) -> Policy:
    """The governor's policy for ``cfg`` on ``profile`` from the cost model alone, with
    ``acceptance`` at every draft position and ``miss_rate`` of every window's experts copied."""
    return govern(
        cfg, modelled_hardware(cfg, profile), [acceptance], CacheModel.from_miss_rate(miss_rate)
    )
