"""What each op takes and gives: named inputs with a dtype class, the output count, attributes.

Inputs are named, so an implementation reads them by name (`bind`), never by counting them. An
input listed in ``optional`` may be absent (it is then None in `bind`'s result).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from speq.ir.dtypes import FLOAT_DTYPES, INT_DTYPES, QUANT_DTYPES
from speq.ir.graph import Node
from speq.ir.ops import Op

# the dtype names of each input class
CLASSES: Mapping[str, frozenset[str]] = {
    "float": FLOAT_DTYPES,
    "weights": FLOAT_DTYPES | QUANT_DTYPES,  # dense, or weight-only quantized (the draft's experts)
    "int": INT_DTYPES,
    "kv": frozenset({"kv"}),
    "residency": frozenset({"residency"}),
}


@dataclass(frozen=True)
class Schema:
    """``inputs``: (name, dtype class) of each input in order (None: any number of any type);
    ``optional``: trailing inputs that may be absent; ``outputs``: how many outputs."""

    inputs: tuple[tuple[str, str], ...] | None
    outputs: int
    attrs: tuple[str, ...] = ()
    optional: tuple[tuple[str, str], ...] = ()

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in (self.inputs or ()) + self.optional)


SCHEMAS: dict[Op, Schema] = {
    Op.INPUT: Schema((), 1, ("name",)),
    Op.PARAM: Schema((), 1, ("name",)),
    Op.EMBED: Schema((("tokens", "int"), ("table", "float")), 1),
    Op.RMSNORM: Schema((("x", "float"), ("weight", "float")), 1, ("eps",)),
    Op.LAYERNORM: Schema((("x", "float"), ("weight", "float"), ("bias", "float")), 1, ("eps",)),
    Op.LINEAR: Schema((("x", "float"), ("weight", "float")), 1, optional=(("bias", "float"),)),
    Op.ROPE: Schema((("x", "float"), ("pos", "int")), 1, ("heads", "theta")),
    Op.KV_WRITE: Schema((("k", "float"), ("v", "float"), ("pos", "int")), 1, ("layer",)),
    # optional attr: window (a sliding window; absent: every position)
    Op.ATTENTION: Schema(
        (("q", "float"), ("kv", "kv"), ("pos", "int")),
        1,
        ("layer", "heads", "kv_heads"),
        (("sinks", "float"),),
    ),
    Op.MLA_KV_WRITE: Schema(
        (("compressed", "float"), ("norm", "float"), ("pos", "int")),
        1,
        ("layer", "rank", "eps", "theta"),
    ),
    Op.MLA_ATTENTION: Schema(
        (("q", "float"), ("kv", "kv"), ("pos", "int"), ("wkv_b", "float")),
        1,
        ("layer", "heads", "rope", "v_dim", "theta"),
    ),
    Op.ADD: Schema((("a", "float"), ("b", "float")), 1),
    Op.SWIGLU: Schema((("gate_up", "float"),), 1),
    Op.CLAMP: Schema((("x", "float"),), 1, ("limit",)),
    Op.SIGMOID_MUL: Schema((("gate", "float"), ("x", "float")), 1),
    # optional attrs: scale, n_group, topk_group (speq.kernels.routing.Limits; absent: plain)
    Op.ROUTER: Schema(
        (("logits", "float"),), 2, ("k", "layer", "mode", "renormalize"), (("bias", "float"),)
    ),
    Op.GATHER: Schema((("x", "float"), ("ids", "int")), 1),
    Op.EXPERT_GEMM: Schema((("x", "float"), ("ids", "int"), ("w", "float")), 1, ("layer",)),
    Op.SCATTER: Schema((("rows", "float"), ("weights", "float")), 1),
    # ``residency``: the WAIT that made the layer's experts resident (absent: resident weights)
    Op.FUSED_MOE: Schema(
        (
            ("x", "float"),
            ("ids", "int"),
            ("weights", "float"),
            ("w13", "weights"),
            ("w2", "weights"),
        ),
        1,
        ("layer",),
        optional=(("residency", "residency"),),
    ),
    # source "nextgate": (hidden, next router weight); source "elb": (draft ids, draft weights)
    Op.PREFETCH: Schema(None, 0, ("layer", "source")),
    Op.WAIT: Schema((("ids", "int"),), 1, ("layer",)),
    Op.OUTPUT: Schema(None, 0),
}


def bind(node: Node, args: Sequence[Any]) -> dict[str, Any]:
    """``node``'s arguments by input name; an absent optional input is None."""
    names = SCHEMAS[node.op].names
    if not names:
        raise ValueError(f"{node.op.name.lower()} has no named inputs")
    return {name: args[i] if i < len(args) else None for i, name in enumerate(names)}


def input_named(node: Node, name: str):
    """The `Value` of ``node``'s input ``name``, or None where an optional input is absent."""
    names = SCHEMAS[node.op].names
    i = names.index(name)
    return node.inputs[i] if i < len(node.inputs) else None
