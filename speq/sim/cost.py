"""The per-node cost model: flops and device-memory bytes of each node, and a roofline time.

Used by the sim backend (its virtual clock) and the governor (T_draft, T_verify). A node's cost is
found from its shapes with the symbolic dims resolved (``"T"`` → ``tokens``, ``"T*k"`` →
``tokens * k``) and from the `MoEConfig`. Bytes are device-memory traffic, read plus written:
weights a node reads, plus activations it reads and writes. Host → device copies are not node
costs (PREFETCH and WAIT cost 0 here); `link_seconds` prices them.

Floating-point values are costed at ``dtype_bytes`` per element whatever the graph's dtype, so a
graph captured in f32 on a CPU can be costed as the bf16 model it stands for; other dtypes use
`DTYPE_BYTES`.

Routed-expert weights (EXPERT_GEMM, FUSED_MOE) are counted once per *distinct* expert touched in
the step: ``experts_touched`` when given (from a routing trace or the ELB), otherwise the
expectation under uniform routing, ``E * (1 - (1 - k/E) ** tokens)`` (each token picks k distinct
experts of E uniformly: an expert is missed by one token with probability 1 - k/E).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from speq.ir.dtypes import FLOAT_DTYPES
from speq.ir.graph import Dim, Graph, Node, Value
from speq.ir.ops import Op
from speq.kernels.routing import expected_distinct_experts, routing_function
from speq.models.config import MoEConfig
from speq.models.spec import ModelSpec
from speq.sim.profiles import HardwareProfile

# bytes per element of the non-float dtypes; "kv" and "residency" are tokens that order nodes
# (the KV cache written, a layer's experts made resident) and carry no data
DTYPE_BYTES: Mapping[str, float] = MappingProxyType(
    {"i64": 8, "i32": 4, "i8": 1, "u8": 1, "i4": 0.5, "u4": 0.5, "kv": 0, "residency": 0}
)


@dataclass(frozen=True)
class NodeCost:
    """Work of one node: floating-point operations and device-memory bytes read plus written."""

    flops: float
    bytes: float

    def __add__(self, other: NodeCost) -> NodeCost:
        return NodeCost(self.flops + other.flops, self.bytes + other.bytes)

    @property
    def is_zero(self) -> bool:
        return self.flops == 0 and self.bytes == 0


ZERO = NodeCost(0.0, 0.0)


@dataclass(frozen=True)
class _Ctx:
    cfg: MoEConfig
    tokens: int
    context: int
    dtype_bytes: float
    experts_touched: float | None
    experts_full: int = 0

    def dim(self, d: Dim) -> int:
        return resolve_dim(d, self.tokens)

    def numel(self, v: Value) -> int:
        return math.prod(self.dim(d) for d in v.shape)

    def elem_bytes(self, v: Value) -> float:
        if v.dtype in FLOAT_DTYPES:
            return self.dtype_bytes
        if v.dtype not in DTYPE_BYTES:
            raise ValueError(
                f"cost model: unknown dtype {v.dtype!r} of %{v.name}; "
                f"known: {sorted(FLOAT_DTYPES | set(DTYPE_BYTES))}"
            )
        return DTYPE_BYTES[v.dtype]

    def nbytes(self, *values: Value) -> float:
        return sum(self.numel(v) * self.elem_bytes(v) for v in values)

    def distinct_experts(self) -> float:
        if self.experts_touched is not None:
            return self.experts_touched
        return expected_distinct_experts(self.cfg.num_experts, self.cfg.top_k, self.tokens)


def resolve_dim(d: Dim, tokens: int) -> int:
    """The size of dim ``d`` for a step over ``tokens`` new tokens: ``"T"`` → tokens,
    ``"T*k"`` (or ``"k*T"``) → tokens * k, an int → itself."""
    if isinstance(d, int):
        return d
    size = 1
    for factor in str(d).split("*"):
        factor = factor.strip()
        if factor == "T":
            size *= tokens
        elif factor.isdigit():
            size *= int(factor)
        else:
            raise ValueError(f"cost model: cannot resolve symbolic dim {d!r} (expected T or T*k)")
    return size


# ---- per-op costs (a registry keyed by op; an op missing here is an error, not a silent 0) ----

_CostFn = Callable[[Node, _Ctx], NodeCost]
COSTS: dict[Op, _CostFn] = {}  # the cost function of every op (a test checks all are here)


def _register(*ops: Op) -> Callable[[_CostFn], _CostFn]:
    def deco(fn: _CostFn) -> _CostFn:
        for op in ops:
            COSTS[op] = fn
        return fn

    return deco


@_register(Op.INPUT, Op.PARAM, Op.OUTPUT, Op.PREFETCH, Op.WAIT)
def _free(node: Node, c: _Ctx) -> NodeCost:
    return ZERO  # no device work: weights are read by their users, copies costed by the link


@_register(Op.LINEAR)
def _linear(node: Node, c: _Ctx) -> NodeCost:
    x, w = node.inputs[:2]  # and an optional bias, read once
    m, n, k = c.dim(x.shape[0]), c.dim(w.shape[0]), c.dim(w.shape[1])
    return NodeCost(2.0 * m * n * k, c.nbytes(*node.inputs, node.out))


@_register(Op.EMBED)
def _embed(node: Node, c: _Ctx) -> NodeCost:
    tokens, _table = node.inputs
    return NodeCost(0.0, c.nbytes(tokens) + 2 * c.nbytes(node.out))  # T rows read, T rows written


@_register(Op.LAYERNORM)
def _layernorm(node: Node, c: _Ctx) -> NodeCost:
    x, w, b = node.inputs
    return NodeCost(7.0 * c.numel(x), c.nbytes(x, w, b, node.out))


@_register(Op.RMSNORM)
def _rmsnorm(node: Node, c: _Ctx) -> NodeCost:
    x, w = node.inputs
    return NodeCost(4.0 * c.numel(x), c.nbytes(x, w, node.out))


@_register(Op.ROPE)
def _rope(node: Node, c: _Ctx) -> NodeCost:
    x = node.inputs[0]
    return NodeCost(3.0 * c.numel(x), c.nbytes(x, node.out))


@_register(Op.ADD)
def _add(node: Node, c: _Ctx) -> NodeCost:
    a, b = node.inputs
    return NodeCost(float(c.numel(node.out)), c.nbytes(a, b, node.out))


@_register(Op.CLAMP)
def _clamp(node: Node, c: _Ctx) -> NodeCost:
    (x,) = node.inputs
    return NodeCost(2.0 * c.numel(x), c.nbytes(x, node.out))


@_register(Op.SIGMOID_MUL)
def _sigmoid_mul(node: Node, c: _Ctx) -> NodeCost:
    gate, x = node.inputs
    return NodeCost(5.0 * c.numel(node.out), c.nbytes(gate, x, node.out))


@_register(Op.SWIGLU)
def _swiglu(node: Node, c: _Ctx) -> NodeCost:
    (x,) = node.inputs
    return NodeCost(5.0 * c.numel(node.out), c.nbytes(x, node.out))


@_register(Op.KV_WRITE)
def _kv_write(node: Node, c: _Ctx) -> NodeCost:
    k, v, _pos = node.inputs
    return NodeCost(0.0, 2 * c.nbytes(k, v))  # read the new k, v; write them into the cache


@_register(Op.ATTENTION)
def _attention(node: Node, c: _Ctx) -> NodeCost:
    q = node.inputs[0]
    heads, kv_heads = node.attrs["heads"], node.attrs["kv_heads"]
    head_dim = c.dim(q.shape[-1]) // heads
    t = c.dim(q.shape[0])
    window = node.attrs.get("window", 0)
    context = min(c.context, window + t) if window else c.context  # what a window attends to
    flops = 4.0 * t * context * heads * head_dim  # q k^T and p v over the attended prefix
    kv_read = context * kv_heads * head_dim * 2 * c.dtype_bytes
    return NodeCost(flops, kv_read + c.nbytes(q, node.out))


@_register(Op.MLA_KV_WRITE)
def _mla_kv_write(node: Node, c: _Ctx) -> NodeCost:
    compressed, norm, _pos = node.inputs
    return NodeCost(6.0 * c.numel(compressed), 2 * c.nbytes(compressed) + c.nbytes(norm))


@_register(Op.MLA_ATTENTION)
def _mla_attention(node: Node, c: _Ctx) -> NodeCost:
    """The reference's MLA: every cached latent expanded to every head's key and value, then
    attention (what speq runs; the absorbed form that skips the expansion is not implemented)."""
    q, _kv, _pos, wkv_b = node.inputs
    a = node.attrs
    heads, t = a["heads"], c.dim(q.shape[0])
    head_dim = c.dim(q.shape[-1]) // heads
    rank = c.dim(wkv_b.shape[1])
    expand = 2.0 * c.context * rank * c.dim(wkv_b.shape[0])
    attend = 2.0 * t * c.context * heads * (head_dim + a["v_dim"])
    cache_read = c.context * (rank + a["rope"]) * c.dtype_bytes
    return NodeCost(expand + attend, cache_read + c.nbytes(q, wkv_b, node.out))


@_register(Op.ROUTER)
def _router(node: Node, c: _Ctx) -> NodeCost:
    logits = node.inputs[0]
    flops = routing_function(node.attrs["mode"]).flops_per_logit * c.numel(logits)
    return NodeCost(flops, c.nbytes(logits, *node.outputs))


@_register(Op.GATHER)
def _gather(node: Node, c: _Ctx) -> NodeCost:
    _x, ids = node.inputs
    return NodeCost(0.0, c.nbytes(ids) + 2 * c.nbytes(node.out))  # pair rows read and written


@_register(Op.SCATTER)
def _scatter(node: Node, c: _Ctx) -> NodeCost:
    rows, weights = node.inputs
    return NodeCost(2.0 * c.numel(rows), c.nbytes(rows, weights, node.out))


@_register(Op.EXPERT_GEMM)
def _expert_gemm(node: Node, c: _Ctx) -> NodeCost:
    x, ids, w = node.inputs[:3]  # w: [E, N, K], one [N, K] matrix per expert (then a bias)
    pairs, n, k = c.dim(x.shape[0]), c.dim(w.shape[-2]), c.dim(w.shape[-1])
    weights = c.distinct_experts() * n * k * c.elem_bytes(w)
    return NodeCost(2.0 * pairs * n * k, weights + c.nbytes(x, ids, node.out))


@_register(Op.FUSED_MOE)
def _fused_moe(node: Node, c: _Ctx) -> NodeCost:
    x, ids, route_w, w13 = node.inputs[:4]  # then w2, optionally biases and the residency
    cfg = c.cfg
    h, inter = cfg.hidden_size, cfg.expert_intermediate_size
    pairs = c.tokens * cfg.top_k
    flops = 2.0 * pairs * (2 * inter) * h + 2.0 * pairs * h * inter
    weights = c.distinct_experts() * 3 * h * inter * c.elem_bytes(w13)
    # quantized weights read at full precision where that copy is resident (shared draft memory)
    weights += c.experts_full * 3 * h * inter * (c.dtype_bytes - c.elem_bytes(w13))
    # the [pairs, I] activation between the two GEMMs is written once and read once
    between = 2 * pairs * inter * c.dtype_bytes
    return NodeCost(flops, weights + between + c.nbytes(x, ids, route_w, node.out))


# ---- public API ----


def node_cost(
    node: Node,
    spec_or_config: ModelSpec | MoEConfig,
    tokens: int,
    context: int,
    dtype_bytes: float = 2,
    experts_touched: float | None = None,
    experts_full: int = 0,
) -> NodeCost:
    """Flops and device-memory bytes of ``node`` in a step over ``tokens`` new tokens whose
    attention reads ``context`` cached positions (the prefix plus the new tokens).

    ``experts_touched``: distinct routed experts of this node's layer used in the step (only read by
    EXPERT_GEMM and FUSED_MOE); default, the uniform-routing expectation. ``experts_full``: of
    those, how many a FUSED_MOE with quantized weights reads at full precision instead (the
    draft under shared draft memory).
    """
    cfg = _config(spec_or_config)
    if tokens < 1:
        raise ValueError(f"tokens must be >= 1, got {tokens}")
    if context < 0:
        raise ValueError(f"context must be >= 0, got {context}")
    if experts_touched is not None and not 0 <= experts_touched <= cfg.num_experts:
        raise ValueError(
            f"experts_touched must be in [0, num_experts={cfg.num_experts}], got {experts_touched}"
        )
    fn = COSTS.get(node.op)
    if fn is None:
        raise NotImplementedError(f"cost model: no cost for op {node.op.name.lower()}")
    return fn(node, _Ctx(cfg, tokens, context, dtype_bytes, experts_touched, experts_full))


def node_seconds(cost: NodeCost, profile: HardwareProfile) -> float:
    """Roofline time of one node: a launch plus the slower of compute and memory at
    ``profile.efficiency`` of peak; 0 for a node with no work (no kernel is launched)."""
    if cost.is_zero:
        return 0.0
    compute = cost.flops / (profile.peak_tflops * 1e12 * profile.efficiency)
    memory = cost.bytes / (profile.hbm_gbps * 1e9 * profile.efficiency)
    return profile.launch_us * 1e-6 + max(compute, memory)


def link_seconds(nbytes: float, profile: HardwareProfile) -> float:
    """Time of one host → device copy of ``nbytes``: latency + bytes / link bandwidth; 0 bytes
    is no copy and costs 0."""
    if nbytes < 0:
        raise ValueError(f"nbytes must be >= 0, got {nbytes}")
    if nbytes == 0:
        return 0.0
    return profile.link_latency_us * 1e-6 + nbytes / (profile.link_gbps * 1e9)


def host_seconds(nbytes: float, flops: float, profile: HardwareProfile) -> float:
    """Time of one expert computed in host memory (speq.runtime.host): the slower of reading its
    ``nbytes`` at ``profile.host_gbps`` and doing its ``flops`` at ``profile.host_tflops``
    (effective rates, so no efficiency factor); the per-layer ``host_latency_us`` is the
    caller's to add once per batch of experts."""
    if nbytes < 0 or flops < 0:
        raise ValueError(f"nbytes and flops must be >= 0, got {nbytes}, {flops}")
    return max(nbytes / (profile.host_gbps * 1e9), flops / (profile.host_tflops * 1e12))


ExpertsTouched = float | Mapping[int, float] | None


def step_cost(
    graph: Graph,
    spec_or_config: ModelSpec | MoEConfig,
    tokens: int,
    context: int,
    dtype_bytes: float = 2,
    *,
    experts_touched: ExpertsTouched = None,
) -> NodeCost:
    """Total flops and bytes of one step (see `node_cost`). ``experts_touched``: one count for every
    MoE layer, or a mapping layer → count (layers missing from it use the expectation)."""
    total = ZERO
    for node in graph:
        total = total + _cost(node, spec_or_config, tokens, context, dtype_bytes, experts_touched)
    return total


def step_seconds(
    graph: Graph,
    spec_or_config: ModelSpec | MoEConfig,
    tokens: int,
    context: int,
    profile: HardwareProfile,
    dtype_bytes: float = 2,
    *,
    experts_touched: ExpertsTouched = None,
) -> float:
    """Device time of one step: the sum of the nodes' roofline times (nodes run one after another
    on the compute stream; weights assumed resident, copies not included)."""
    breakdown = step_breakdown(
        graph,
        spec_or_config,
        tokens,
        context,
        profile,
        dtype_bytes,
        experts_touched=experts_touched,
    )
    return sum(breakdown.values())


def step_breakdown(
    graph: Graph,
    spec_or_config: ModelSpec | MoEConfig,
    tokens: int,
    context: int,
    profile: HardwareProfile,
    dtype_bytes: float = 2,
    *,
    experts_touched: ExpertsTouched = None,
) -> dict[str, float]:
    """Seconds per op name (as printed: ``"linear"``, ``"fused_moe"``, ...) over one step, in order
    of first appearance; ops that cost nothing are left out."""
    out: dict[str, float] = {}
    for node in graph:
        cost = _cost(node, spec_or_config, tokens, context, dtype_bytes, experts_touched)
        if not cost.is_zero:
            name = node.op.name.lower()
            out[name] = out.get(name, 0.0) + node_seconds(cost, profile)
    return out


def _cost(
    node: Node,
    spec_or_config: ModelSpec | MoEConfig,
    tokens: int,
    context: int,
    dtype_bytes: float,
    experts_touched: ExpertsTouched,
) -> NodeCost:
    touched = experts_touched
    if isinstance(experts_touched, Mapping):
        touched = experts_touched.get(node.attrs.get("layer", -1))
    return node_cost(node, spec_or_config, tokens, context, dtype_bytes, touched)


def _config(spec_or_config: ModelSpec | MoEConfig) -> MoEConfig:
    if isinstance(spec_or_config, ModelSpec):
        return spec_or_config.config
    if isinstance(spec_or_config, MoEConfig):
        return spec_or_config
    raise TypeError(f"expected a ModelSpec or MoEConfig, got {type(spec_or_config).__name__}")
