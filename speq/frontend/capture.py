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
from speq.kernels.routing import ROUTING_FUNCTIONS, routing_function
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
    h = cfg.hidden_size
    b = GraphBuilder("step")

    params: dict[str, Value] = {}

    def param(name: str, shape: tuple[int, ...]) -> Value:
        if name not in params:  # a tied weight is read twice but defined once
            params[name] = b.emit1(Op.PARAM, (), name, shape, dt, name=name)
        return params[name]

    def linear(x: Value, w: Value, name: str, bias: Value | None = None) -> Value:
        inputs = (x, w) if bias is None else (x, w, bias)
        return b.emit1(Op.LINEAR, inputs, name, (x.shape[0], w.shape[0]), dt)

    def norm(x: Value, weight: str, name: str) -> Value:
        """One of the decoder's norms: RMSNorm, or LayerNorm with its bias (`MoEConfig.norm`)."""
        eps = cfg.rms_norm_eps
        if cfg.norm == "layer":
            bias = param(weight.removesuffix(".weight") + ".bias", (h,))
            inputs = (x, param(weight, (h,)), bias)
            return b.emit1(Op.LAYERNORM, inputs, name, x.shape, dt, eps=eps)
        return b.emit1(Op.RMSNORM, (x, param(weight, (h,))), name, x.shape, dt, eps=eps)

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
        if cfg.is_mla:
            att = _mla(b, spec, i, a, pos, param, linear)
        else:
            att = _attention(b, spec, i, a, pos, param, linear)
        bo = param(f"{p}.attn.bo", (h,)) if cfg.o_bias else None
        o = linear(att, param(f"{p}.attn.wo", (h, cfg.attn_out_dim)), f"{n}.attn_out", bo)
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
                if cfg.shared_expert_gate:
                    g = linear(m, param(f"{p}.mlp.shared_gate", (1, h)), f"{n}.shared_gate")
                    s = b.emit1(Op.SIGMOID_MUL, (g, s), f"{n}.shared_gated", ("T", h), dt)
                y = b.emit1(Op.ADD, (y, s), f"{n}.mlp_out", ("T", h), dt)
        x = b.emit1(Op.ADD, (x, y), f"l{i}.out", ("T", h), dt)
    f = norm(x, "norm.weight", "final")
    head_bias = param("lm_head_bias", (cfg.vocab_size,)) if cfg.lm_head_bias else None
    logits = linear(f, param(spec.head_param, (cfg.vocab_size, h)), "logits", head_bias)
    b.emit(Op.OUTPUT, (logits,), [])
    return verify(b.build(), ATTRIBUTE_DOMAINS)


def _attention(b: GraphBuilder, spec: ModelSpec, i: int, a: Value, pos: Value, param, linear):
    """Layer i's grouped-query attention: q, k, v, rotary embedding, KV cache, attention."""
    cfg, dt, n = spec.config, dtype_name(spec.dtype), f"l{i}"
    q, k, v = (_project(b, spec, i, a, which, param, linear) for which in "qkv")
    rope = {"theta": cfg.rope_theta}
    q = b.emit1(Op.ROPE, (q, pos), f"{n}.q_rot", q.shape, dt, heads=cfg.num_heads, **rope)
    k = b.emit1(Op.ROPE, (k, pos), f"{n}.k_rot", k.shape, dt, heads=cfg.num_kv_heads, **rope)
    kv = b.emit1(Op.KV_WRITE, (k, v, pos), f"{n}.kv", (), "kv", layer=i)
    attrs = dict(layer=i, heads=cfg.num_heads, kv_heads=cfg.num_kv_heads)
    if cfg.window(i):
        attrs["window"] = cfg.window(i)
    inputs = (q, kv, pos)
    if cfg.attention_sinks:
        inputs += (param(f"layers.{i}.attn.sinks", (cfg.num_heads,)),)
    return b.emit1(Op.ATTENTION, inputs, f"{n}.attn", q.shape, dt, **attrs)


def _mla(b: GraphBuilder, spec: ModelSpec, i: int, a: Value, pos: Value, param, linear):
    """Layer i's Multi-head Latent Attention: q (through its low-rank bottleneck when it has
    one), the KV down-projection into the cache (latent + rotary key), attention."""
    cfg, dt, n, p = spec.config, dtype_name(spec.dtype), f"l{i}", f"layers.{i}"
    h, r, rope, eps = cfg.hidden_size, cfg.kv_lora_rank, cfg.qk_rope_head_dim, cfg.rms_norm_eps
    width = cfg.num_heads * cfg.head_dim
    if cfg.q_lora_rank:
        ql = linear(a, param(f"{p}.attn.wq_a", (cfg.q_lora_rank, h)), f"{n}.q_a")
        weight = param(f"{p}.attn.q_a_norm.weight", (cfg.q_lora_rank,))
        ql = b.emit1(Op.RMSNORM, (ql, weight), f"{n}.q_a_norm", ql.shape, dt, eps=eps)
        q = linear(ql, param(f"{p}.attn.wq_b", (width, cfg.q_lora_rank)), f"{n}.q")
    else:
        q = linear(a, param(f"{p}.attn.wq", (width, h)), f"{n}.q")
    c = linear(a, param(f"{p}.attn.wkv_a", (r + rope, h)), f"{n}.kv_a")
    kv = b.emit1(
        Op.MLA_KV_WRITE,
        (c, param(f"{p}.attn.kv_a_norm.weight", (r,)), pos),
        f"{n}.kv",
        (),
        "kv",
        layer=i,
        rank=r,
        eps=eps,
        theta=cfg.rope_theta,
    )
    wkv_b = param(f"{p}.attn.wkv_b", (cfg.num_heads * (cfg.head_dim - rope + cfg.v_head_dim), r))
    return b.emit1(
        Op.MLA_ATTENTION,
        (q, kv, pos, wkv_b),
        f"{n}.attn",
        ("T", cfg.attn_out_dim),
        dt,
        layer=i,
        heads=cfg.num_heads,
        rope=rope,
        v_dim=cfg.v_head_dim,
        theta=cfg.rope_theta,
    )


def _project(b: GraphBuilder, spec: ModelSpec, i: int, a: Value, which: str, param, linear):
    """Layer i's q, k or v: the projection (+ bias), its RMSNorm (q and k), its clamp."""
    cfg, dt, d = spec.config, dtype_name(spec.dtype), spec.config.head_dim
    n, p = f"l{i}", f"layers.{i}"
    width = (cfg.num_heads if which == "q" else cfg.num_kv_heads) * d
    bias = param(f"{p}.attn.b{which}", (width,)) if cfg.qkv_bias else None
    y = linear(a, param(f"{p}.attn.w{which}", (width, cfg.hidden_size)), f"{n}.{which}", bias)
    if which != "v" and cfg.qk_norm != "none":
        weight = param(f"{p}.attn.{which}_norm.weight", (width if cfg.qk_norm == "full" else d,))
        eps = cfg.rms_norm_eps
        y = b.emit1(Op.RMSNORM, (y, weight), f"{n}.{which}_norm", y.shape, dt, eps=eps)
    if cfg.clip_qkv is not None:
        y = b.emit1(Op.CLAMP, (y,), f"{n}.{which}_clip", y.shape, dt, limit=cfg.clip_qkv)
    return y


def _routed_experts(b: GraphBuilder, spec: ModelSpec, i: int, m: Value, param, wdt: str) -> Value:
    cfg, dt = spec.config, dtype_name(spec.dtype)
    h, inter, e, k = cfg.hidden_size, cfg.expert_intermediate_size, cfg.num_experts, cfg.top_k
    n, pairs = f"l{i}", f"T*{k}"
    router = (m, param(f"layers.{i}.mlp.router", (e, h)))
    if cfg.router_logit_bias:
        router += (param(f"layers.{i}.mlp.router_logit_bias", (e,)),)
    logits = b.emit1(Op.LINEAR, router, f"{n}.router_logits", ("T", e), dt)
    inputs = (logits,)
    if routing_function(cfg.router_mode).bias:
        inputs += (param(f"layers.{i}.mlp.router_bias", (e,)),)
    limits = {}  # DeepSeek's and PhiMoE's options, where they are not the plain top-k's
    if cfg.routed_scaling_factor != 1.0:
        limits["scale"] = cfg.routed_scaling_factor
    if cfg.n_group > 1:
        limits |= dict(n_group=cfg.n_group, topk_group=cfg.topk_group)
    if cfg.router_jitter_eps:
        limits["jitter_eps"] = cfg.router_jitter_eps
    ids, weights = b.emit(
        Op.ROUTER,
        inputs,
        [(f"{n}.expert_ids", ("T", k), "i64"), (f"{n}.expert_weights", ("T", k), wdt)],
        k=k,
        layer=i,
        mode=cfg.router_mode,
        renormalize=cfg.norm_topk_prob,
        **limits,
    )
    w13 = param(spec.expert_param(i, "w13"), (e, 2 * inter, h))
    w2 = param(spec.expert_param(i, "w2"), (e, h, inter))
    b13 = (param(f"layers.{i}.mlp.b13", (e, 2 * inter)),) if cfg.expert_bias else ()
    b2 = (param(f"layers.{i}.mlp.b2", (e, h)),) if cfg.expert_bias else ()
    xs = b.emit1(Op.GATHER, (m, ids), f"{n}.pairs", (pairs, h), dt)
    gu = b.emit1(
        Op.EXPERT_GEMM, (xs, ids, w13, *b13), f"{n}.gate_up", (pairs, 2 * inter), dt, layer=i
    )
    act_attrs = cfg.expert_activation.attrs()
    act = b.emit1(Op.SWIGLU, (gu,), f"{n}.act", (pairs, inter), dt, **act_attrs)
    down = b.emit1(Op.EXPERT_GEMM, (act, ids, w2, *b2), f"{n}.down", (pairs, h), dt, layer=i)
    return b.emit1(Op.SCATTER, (down, weights), f"{n}.moe", ("T", h), dt)
