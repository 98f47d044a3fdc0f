"""The routed experts' gated activation, ``[.., 2I]`` (gate then up) to ``[.., I]``.

* ``"swiglu"``: ``silu(gate) * up`` (Mixtral, Qwen, DeepSeek, ...);
* ``"swiglu_oai"`` (GPT-OSS): ``g = min(gate, limit)``, ``u = clamp(up, -limit, limit)``, then
  ``g * sigmoid(alpha * g) * (u + 1)``.

The torch form is `Activation.__call__`; the Triton kernels implement the same math in their
gate/up epilogue, selected by `Activation.code`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

ACTIVATIONS = ("swiglu", "swiglu_oai")


@dataclass(frozen=True)
class Activation:
    kind: str = "swiglu"
    alpha: float = 1.702
    limit: float = 7.0

    def __post_init__(self) -> None:
        if self.kind not in ACTIVATIONS:
            raise ValueError(f"activation {self.kind!r}: expected one of {ACTIVATIONS}")

    @property
    def code(self) -> int:
        """The Triton kernels' ACTIVATION constexpr."""
        return ACTIVATIONS.index(self.kind)

    def __call__(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        if self.kind == "swiglu":
            return torch.nn.functional.silu(gate) * up
        g, u = gate.clamp(max=self.limit), up.clamp(-self.limit, self.limit)
        return g * torch.sigmoid(self.alpha * g) * (u + 1)

    def attrs(self) -> dict[str, object]:
        """The IR attributes that name this activation (none for the default)."""
        if self.kind == "swiglu":
            return {}
        return {"activation": self.kind, "alpha": self.alpha, "limit": self.limit}

    @classmethod
    def of(cls, attrs: dict) -> Activation:
        """The activation a SWIGLU or FUSED_MOE node's attributes name."""
        if "activation" not in attrs:
            return SWIGLU
        return cls(attrs["activation"], attrs["alpha"], attrs["limit"])


SWIGLU = Activation()
