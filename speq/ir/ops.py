"""The operations of speq's graph IR, and the tag sets that passes query instead of listing ops."""

from __future__ import annotations

from enum import Enum, auto


class Op(Enum):
    INPUT = auto()  # a graph input, by name: tokens [T] or the start position []
    PARAM = auto()  # a named weight tensor
    EMBED = auto()  # table[tokens]
    RMSNORM = auto()  # over groups of the last dim the size of the weight (all, or each head)
    LAYERNORM = auto()  # over the last dim, with a weight and a bias
    LINEAR = auto()  # x @ W^T (+ bias)
    ROPE = auto()  # rotary embedding of [T, heads*D] at positions pos..pos+T-1
    KV_WRITE = auto()  # store k, v of T tokens in the KV cache of one layer
    ATTENTION = auto()  # causal grouped-query attention against the cached prefix
    MLA_KV_WRITE = auto()  # store MLA's latent (normalised) and rotary key of T tokens
    MLA_ATTENTION = auto()  # Multi-head Latent Attention against the cached latents
    ADD = auto()
    SWIGLU = auto()  # [.., 2I] -> silu(gate) * up  [.., I]
    CLAMP = auto()  # x clamped to [-limit, limit]
    SIGMOID_MUL = auto()  # sigmoid(gate [T, 1]) * x [T, H]: a learned gate
    ROUTER = auto()  # router logits (+ a bias) -> (expert ids [T, k], routing weights [T, k])
    GATHER = auto()  # token rows repeated per choice: row t*k + j is x[t]
    EXPERT_GEMM = auto()  # row t*k + j times the weights of expert ids[t, j]
    SCATTER = auto()  # weighted combine of the k rows of each token
    FUSED_MOE = auto()  # gather -> gate/up GEMM -> SwiGLU -> down GEMM -> weighted combine
    PREFETCH = auto()  # start host -> device copies of experts (ids known at run time)
    WAIT = auto()  # block until a layer's experts are resident
    OUTPUT = auto()


class Tag(Enum):
    SOURCE = auto()  # no inputs: reads the graph's inputs or weights
    ELEMENTWISE = auto()
    EXPERT = auto()  # reads routed expert weights (the data that lives in host memory)
    MOE_CHAIN = auto()  # a step of the unfused routed-expert chain that fuse_moe rewrites
    STATEFUL = auto()  # reads or writes state outside the graph (the KV cache, the expert cache)
    DATA_DEPENDENT = (
        auto()
    )  # the host must see tensor values (a sync): cannot sit in a replay region
    ASYNC_COPY = auto()  # issued on the copy stream


TAGS: dict[Op, frozenset[Tag]] = {
    Op.INPUT: frozenset({Tag.SOURCE}),
    Op.PARAM: frozenset({Tag.SOURCE}),
    Op.EMBED: frozenset(),
    Op.RMSNORM: frozenset(),
    Op.LAYERNORM: frozenset(),
    Op.LINEAR: frozenset(),
    Op.ROPE: frozenset({Tag.ELEMENTWISE}),
    Op.KV_WRITE: frozenset({Tag.STATEFUL}),
    Op.ATTENTION: frozenset({Tag.STATEFUL}),
    Op.MLA_KV_WRITE: frozenset({Tag.STATEFUL}),
    Op.MLA_ATTENTION: frozenset({Tag.STATEFUL}),
    Op.ADD: frozenset({Tag.ELEMENTWISE}),
    Op.SWIGLU: frozenset({Tag.ELEMENTWISE}),
    Op.CLAMP: frozenset({Tag.ELEMENTWISE}),
    Op.SIGMOID_MUL: frozenset({Tag.ELEMENTWISE}),
    Op.ROUTER: frozenset(),
    Op.GATHER: frozenset({Tag.MOE_CHAIN}),
    # The unfused grouped GEMM groups rows by expert on the host (one matmul per expert present).
    Op.EXPERT_GEMM: frozenset({Tag.EXPERT, Tag.MOE_CHAIN, Tag.DATA_DEPENDENT}),
    Op.SCATTER: frozenset({Tag.MOE_CHAIN}),
    Op.FUSED_MOE: frozenset({Tag.EXPERT}),
    Op.PREFETCH: frozenset({Tag.ASYNC_COPY, Tag.STATEFUL, Tag.DATA_DEPENDENT}),
    Op.WAIT: frozenset({Tag.STATEFUL, Tag.DATA_DEPENDENT}),
    Op.OUTPUT: frozenset(),
}


def has_tag(op: Op, tag: Tag) -> bool:
    return tag in TAGS[op]
