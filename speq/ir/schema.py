"""What each op takes and gives: named inputs with a dtype class, the output count, attributes.

Inputs are named, so an implementation reads them by name (`bind`), never by counting them. An
input listed in ``optional`` may be absent (it is then None in `bind`'s result); the optional
inputs present keep the schema's order, each taking the next optional name of its dtype class
(so FUSED_MOE's residency is found whether or not its expert biases come before it).
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
    # optional attrs: activation ("swiglu_oai"), alpha, limit (absent: silu(gate) * up)
    Op.SWIGLU: Schema((("gate_up", "float"),), 1),
    Op.CLAMP: Schema((("x", "float"),), 1, ("limit",)),
    Op.SIGMOID_MUL: Schema((("gate", "float"), ("x", "float")), 1),
    # optional attrs: scale, n_group, topk_group (speq.kernels.routing.Limits; absent: plain)
    Op.ROUTER: Schema(
        (("logits", "float"),), 2, ("k", "layer", "mode", "renormalize"), (("bias", "float"),)
    ),
    Op.GATHER: Schema((("x", "float"), ("ids", "int")), 1),
    # ``bias [E, N]``: a bias per expert (GPT-OSS), by expert id
    Op.EXPERT_GEMM: Schema(
        (("x", "float"), ("ids", "int"), ("w", "float")), 1, ("layer",), (("bias", "float"),)
    ),
    Op.SCATTER: Schema((("rows", "float"), ("weights", "float")), 1),
    # ``b13 [E, 2I]`` / ``b2 [E, H]``: the experts' biases, by expert id (GPT-OSS; resident);
    # ``residency``: the WAIT that made the layer's experts resident (absent: resident weights);
    # optional attrs as SWIGLU's
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
        optional=(("b13", "float"), ("b2", "float"), ("residency", "residency")),
    ),
    # source "nextgate": (hidden, next router weight); source "elb": (draft ids, draft weights)
    Op.PREFETCH: Schema(None, 0, ("layer", "source")),
    Op.WAIT: Schema((("ids", "int"),), 1, ("layer",)),
    Op.OUTPUT: Schema(None, 0),
}


def input_names(node: Node) -> list[str]:
    """The schema name of each of ``node``'s inputs: the required ones in order, then each
    optional one present under the next optional name of its dtype class; a ValueError when an
    input has no name left."""
    schema = SCHEMAS[node.op]
    if schema.inputs is None:
        raise ValueError(f"{node.op.name.lower()} has no named inputs")
    names = [name for name, _ in schema.inputs]
    rest, j = node.inputs[len(names) :], 0
    for v in rest:
        while j < len(schema.optional) and v.dtype not in CLASSES[schema.optional[j][1]]:
            j += 1
        if j == len(schema.optional):
            raise ValueError(f"{node.op.name.lower()} input %{v.name} ({v.dtype}) has no place")
        names.append(schema.optional[j][0])
        j += 1
    return names


def bind(node: Node, args: Sequence[Any]) -> dict[str, Any]:
    """``node``'s arguments by input name; an absent optional input is None."""
    out = dict.fromkeys(SCHEMAS[node.op].names)
    out.update(zip(input_names(node), args))
    return out


def input_named(node: Node, name: str):
    """The `Value` of ``node``'s input ``name``, or None where an optional input is absent."""
    names = input_names(node)
    return node.inputs[names.index(name)] if name in names else None
