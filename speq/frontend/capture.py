"""Capture: one forward step of a model over T new tokens at position ``pos`` as a `Graph`.

The graph is built from the architecture in the `ModelSpec`, with the same decomposition the eager
reference model computes, and is checked against it numerically in the tests. ``T`` stays symbolic
so one graph serves the prompt (T = prompt length) and decoding (T = 1, or k + 1 when verifying).
"""

from __future__ import annotations

from speq.ir.builder import GraphBuilder
from speq.ir.dtypes import dtype_name
from speq.ir.graph import Graph, Value
from speq.ir.ops import Op
from speq.ir.verifier import verify
from speq.kernels.routing import ROUTING_FUNCTIONS
from speq.models.spec import ModelSpec

# the values IR attributes may take that tables outside the IR define, for the verifier: a ROUTER
# (and a next-layer PREFETCH, which routes too) names a registered routing function
ATTRIBUTE_DOMAINS = {
    (Op.ROUTER, "mode"): ROUTING_FUNCTIONS,
    (Op.PREFETCH, "mode"): ROUTING_FUNCTIONS,
}


def capture(spec: ModelSpec) -> Graph:
    cfg, dt = spec.config, dtype_name(spec.dtype)
    wdt = "f64" if dt == "f64" else "f32"  # routing weights are computed in at least fp32
    h, d = cfg.hidden_size, cfg.head_dim
    b = GraphBuilder("step")

    params: dict[str, Value] = {}

    def param(name: str, shape: tuple[int, ...]) -> Value:
        if name not in params:  # a tied weight is read twice but defined once
            params[name] = b.emit1(Op.PARAM, (), name, shape, dt, name=name)
        return params[name]

    def linear(x: Value, w: Value, name: str) -> Value:
        return b.emit1(Op.LINEAR, (x, w), name, (x.shape[0], w.shape[0]), dt)

    def norm(x: Value, weight: str, name: str) -> Value:
        return b.emit1(
            Op.RMSNORM, (x, param(weight, (h,))), name, x.shape, dt, eps=cfg.rms_norm_eps
        )

    def dense_mlp(x: Value, prefix: str, width: int, name: str) -> Value:
        gu = linear(x, param(f"{prefix}.w13", (2 * width, h)), f"{name}.gate_up")
        act = b.emit1(Op.SWIGLU, (gu,), f"{name}.act", ("T", width), dt)
        return linear(act, param(f"{prefix}.w2", (h, width)), name)

    tokens = b.emit1(Op.INPUT, (), "tokens", ("T",), "i64", name="tokens")
    pos = b.emit1(Op.INPUT, (), "pos", (), "i64", name="pos")
    x = b.emit1(Op.EMBED, (tokens, param("embed", (cfg.vocab_size, h))), "x", ("T", h), dt)
    for i in range(cfg.num_layers):
        p, n = f"layers.{i}", f"l{i}"
        a = norm(x, f"{p}.attn_norm.weight", f"{n}.attn_in")
        q = linear(a, param(f"{p}.attn.wq", (cfg.num_heads * d, h)), f"{n}.q")
        k = linear(a, param(f"{p}.attn.wk", (cfg.num_kv_heads * d, h)), f"{n}.k")
        v = linear(a, param(f"{p}.attn.wv", (cfg.num_kv_heads * d, h)), f"{n}.v")
        rope = {"theta": cfg.rope_theta}
        q = b.emit1(Op.ROPE, (q, pos), f"{n}.q_rot", q.shape, dt, heads=cfg.num_heads, **rope)
        k = b.emit1(Op.ROPE, (k, pos), f"{n}.k_rot", k.shape, dt, heads=cfg.num_kv_heads, **rope)
        kv = b.emit1(Op.KV_WRITE, (k, v, pos), f"{n}.kv", (), "kv", layer=i)
        att = b.emit1(
            Op.ATTENTION,
            (q, kv, pos),
            f"{n}.attn",
            q.shape,
            dt,
            layer=i,
            heads=cfg.num_heads,
            kv_heads=cfg.num_kv_heads,
        )
        o = linear(att, param(f"{p}.attn.wo", (h, cfg.num_heads * d)), f"{n}.attn_out")
        x = b.emit1(Op.ADD, (x, o), f"{n}.h", ("T", h), dt)
        m = norm(x, f"{p}.mlp_norm.weight", f"{n}.mlp_in")
        if not cfg.is_moe_layer(i):
            y = dense_mlp(m, f"{p}.mlp", cfg.dense_intermediate_size, f"{n}.mlp_out")
        else:
            y = _routed_experts(b, spec, i, m, param, wdt)
            if cfg.shared_expert_intermediate_size:
                s = dense_mlp(
                    m, f"{p}.mlp.shared", cfg.shared_expert_intermediate_size, f"{n}.shared"
                )
                y = b.emit1(Op.ADD, (y, s), f"{n}.mlp_out", ("T", h), dt)
        x = b.emit1(Op.ADD, (x, y), f"l{i}.out", ("T", h), dt)
    f = norm(x, "norm.weight", "final")
    logits = linear(f, param(spec.head_param, (cfg.vocab_size, h)), "logits")
    b.emit(Op.OUTPUT, (logits,), [])
    return verify(b.build(), ATTRIBUTE_DOMAINS)


def _routed_experts(b: GraphBuilder, spec: ModelSpec, i: int, m: Value, param, wdt: str) -> Value:
    cfg, dt = spec.config, dtype_name(spec.dtype)
    h, inter, e, k = cfg.hidden_size, cfg.expert_intermediate_size, cfg.num_experts, cfg.top_k
    n, pairs = f"l{i}", f"T*{k}"
    logits = b.emit1(
        Op.LINEAR, (m, param(f"layers.{i}.mlp.router", (e, h))), f"{n}.router_logits", ("T", e), dt
    )
    ids, weights = b.emit(
        Op.ROUTER,
        (logits,),
        [(f"{n}.expert_ids", ("T", k), "i64"), (f"{n}.expert_weights", ("T", k), wdt)],
        k=k,
        layer=i,
        mode=cfg.router_mode,
        renormalize=cfg.norm_topk_prob,
    )
    w13 = param(spec.expert_param(i, "w13"), (e, 2 * inter, h))
    w2 = param(spec.expert_param(i, "w2"), (e, h, inter))
    xs = b.emit1(Op.GATHER, (m, ids), f"{n}.pairs", (pairs, h), dt)
    gu = b.emit1(Op.EXPERT_GEMM, (xs, ids, w13), f"{n}.gate_up", (pairs, 2 * inter), dt, layer=i)
    act = b.emit1(Op.SWIGLU, (gu,), f"{n}.act", (pairs, inter), dt)
    down = b.emit1(Op.EXPERT_GEMM, (act, ids, w2), f"{n}.down", (pairs, h), dt, layer=i)
    return b.emit1(Op.SCATTER, (down, weights), f"{n}.moe", ("T", h), dt)
