"""Triton code for the fused MoE (see ``fused_moe.py`` for the contract).

Kernel A (``_gate_up_kernel``): for one block of rows (pairs of one expert) and one tile of I,
gather the token rows of x, multiply by the expert's gate and up rows of w13, and write
``silu(gate) * up`` (fp32 accumulate) to the intermediate ``h[pair, :]``.
Kernel B (``_down_kernel``): multiply ``h`` rows by the expert's w2, scale by the routing weight
in fp32, and either atomically add into ``out[token]`` (fp32) or store per pair for a
fixed-order sum (``_combine_kernel``).
Weights are found through the slot table: expert e lives in slot ``slot_of_expert[e]`` of the
pool. Padding rows (pair id == num_pairs) are masked out of every load and store. Slot and row
offsets (slot * stride, token * stride, pair * stride) are computed in int64: in int32 the row
offset ``pair * I`` of ``h`` overflows past 75k tokens of Mixtral (k=2, I=14336).

DOT_IN_FP32 (the Triton interpreter only): the interpreter stores bfloat16 as its uint16 bit
pattern, and its ``tl.dot`` multiplies those bit patterns (triton#11584; its bf16 ``+``, ``*``
are wrong the same way, but all arithmetic here outside the dots is on fp32 values). With
DOT_IN_FP32 the two bf16 tiles are cast to fp32 right before each ``tl.dot``: a product of two
bf16 values is exact in fp32 and the GPU's bf16 dot accumulates in fp32 too, so this gives the
GPU's result up to summation order, and every load, mask, bf16 store, epilogue and index of the
kernel still runs as on the GPU. ``fused_moe.py`` sets it only when the interpreter runs a bf16
problem; compiled kernels always take the native bf16 dot. One difference remains: the
interpreter's fp32 -> bf16 cast (of ``h``, of dequantized weights) rounds toward zero where the
GPU rounds to nearest even, so an interpreted bf16 result carries up to twice the GPU's rounding
error in those casts.
"""

import triton
import triton.language as tl

# COMBINE values (fused_moe.py passes ``.value``)
COMBINE_ATOMIC = tl.constexpr(0)  # out[token, :] += y   (fp32 atomics)
COMBINE_STORE = tl.constexpr(1)  # out[pair, :] = y     (then a fixed-order sum over the k choices)


@triton.jit
def _tile_ids(pid, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """Map a linear program id to (row block, column tile), walking GROUP_M row blocks per
    column tile so programs running together reuse the same weight tile."""
    per_group = GROUP_M * num_pid_n
    group = pid // per_group
    first_m = group * GROUP_M
    rows_in_group = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % rows_in_group
    pid_n = (pid % per_group) // rows_in_group
    return pid_m, pid_n


@triton.jit
def _weight_tile(
    # pointers (already offset to the expert's slot)
    w_ptr,
    scale_ptr,
    # offsets and masks
    offs_n,
    offs_k,
    k0,
    K,
    n_ok,
    k_ok,
    # strides
    stride_wn,
    stride_wk,
    stride_sn,
    stride_sg,
    # meta-parameters
    W_BITS: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    SCALE_AFTER_DOT: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    EVEN_K: tl.constexpr,
):
    """The [BLOCK_K, BLOCK_N] tile ``W[n, k]^T`` of the K range starting at ``k0``. W_BITS=0:
    the dense weights as stored. W_BITS=8/4: the integer codes in fp32, scaled per element here
    unless SCALE_AFTER_DOT (the tile lies in one scale group, and the caller scales the dot
    product's columns instead). INT4 loads the tile's ``BLOCK_K / 2`` packed bytes of each row
    at once (contiguous along K: vector loads), splits each byte's nibbles (low: even k, high:
    odd k) and interleaves them; with EVEN_K (K a multiple of BLOCK_K) no K mask is needed, so
    the compiler can prove the loads whole."""
    mask = k_ok[:, None] & n_ok[None, :]
    if W_BITS == 0:
        w = tl.load(
            w_ptr + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk, mask=mask, other=0.0
        )
    else:
        if W_BITS == 8:
            q = tl.load(
                w_ptr + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk,
                mask=mask,
                other=0,
            ).to(tl.float32)
        else:
            offs_kp = k0 // 2 + tl.arange(0, BLOCK_K // 2)
            if EVEN_K:
                pmask = tl.broadcast_to(n_ok[None, :], (BLOCK_K // 2, BLOCK_N))
            else:  # a code past K reads as 0 (0x88), and meets a zero of x anyway
                pmask = (offs_kp < (K + 1) // 2)[:, None] & n_ok[None, :]
            packed = tl.load(
                w_ptr + offs_n[None, :] * stride_wn + offs_kp[:, None] * stride_wk,
                mask=pmask,
                other=0x88,
            )
            lo = (packed & 0xF).to(tl.float32) - 8.0
            hi = (packed >> 4).to(tl.float32) - 8.0
            pairs = tl.permute(tl.join(lo, hi), (0, 2, 1))  # [BLOCK_K / 2, 2, BLOCK_N]
            q = tl.reshape(pairs, (BLOCK_K, BLOCK_N))
        if SCALE_AFTER_DOT:
            w = q
        else:
            s = tl.load(
                scale_ptr
                + offs_n[None, :] * stride_sn
                + (offs_k[:, None] // GROUP_SIZE) * stride_sg,
                mask=mask,
                other=0.0,
            )
            w = q * s
    return w


@triton.jit
def _gate_up_kernel(
    # pointers
    x_ptr,
    w_ptr,
    w_scale_ptr,
    h_ptr,
    pair_ids_ptr,
    block_expert_ptr,
    num_valid_blocks_ptr,
    slot_ptr,
    bias_ptr,
    # sizes
    num_pairs,
    I,
    K,
    num_blocks,
    alpha,
    limit,
    # strides
    stride_xt,
    stride_xk,
    stride_ws,
    stride_wn,
    stride_wk,
    stride_ss,
    stride_sn,
    stride_sg,
    stride_hp,
    stride_hn,
    stride_be,
    stride_bn,
    # meta-parameters
    TOP_K: tl.constexpr,
    W_BITS: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    SCALE_AFTER_DOT: tl.constexpr,
    EVEN_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACTIVATION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """h[p, n] = act(x[t] . Wg[n] (+ bg[n]), x[t] . Wu[n] (+ bu[n])) for the pairs p of one row
    block, where t = p // TOP_K, Wg = w13[slot, :I], Wu = w13[slot, I:], b = bias[expert] (fp32);
    act (ACTIVATION, speq.kernels.activation): 0 silu(g) * u; 1 GPT-OSS's clamped SwiGLU."""
    pid = tl.program_id(0)
    pid_m, pid_n = _tile_ids(pid, num_blocks, tl.cdiv(I, BLOCK_N), GROUP_M)
    if pid_m >= tl.load(num_valid_blocks_ptr):
        return
    expert = tl.load(block_expert_ptr + pid_m)
    if expert < 0:
        return
    slot = tl.load(slot_ptr + expert).to(tl.int64)
    w_base = w_ptr + slot * stride_ws
    s_base = w_scale_ptr + slot * stride_ss

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(pair_ids_ptr + offs_m)
    row_ok = pair < num_pairs
    # row offsets in int64: pair * stride and token * stride pass 2**31 in long prefills
    token = (pair // TOP_K).to(tl.int64)
    pair = pair.to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < I
    dtype = x_ptr.dtype.element_ty

    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        a = tl.load(
            x_ptr + token[:, None] * stride_xt + offs_k[None, :] * stride_xk,
            mask=row_ok[:, None] & k_ok[None, :],
            other=0.0,
        )
        wg = _weight_tile(
            w_base, s_base, offs_n, offs_k, k0, K, n_ok, k_ok, stride_wn, stride_wk, stride_sn,
            stride_sg, W_BITS, GROUP_SIZE, SCALE_AFTER_DOT, BLOCK_K, BLOCK_N, EVEN_K,
        ).to(dtype)  # fmt: skip
        wu = _weight_tile(
            w_base, s_base, offs_n + I, offs_k, k0, K, n_ok, k_ok, stride_wn, stride_wk,
            stride_sn, stride_sg, W_BITS, GROUP_SIZE, SCALE_AFTER_DOT, BLOCK_K, BLOCK_N, EVEN_K,
        ).to(dtype)  # fmt: skip
        if DOT_IN_FP32:  # interpreter only: its bf16 tl.dot is wrong (module docstring)
            a, wg, wu = a.to(tl.float32), wg.to(tl.float32), wu.to(tl.float32)
        if SCALE_AFTER_DOT:
            group = k0 // GROUP_SIZE
            sg = tl.load(s_base + offs_n * stride_sn + group * stride_sg, mask=n_ok, other=0.0)
            su = tl.load(
                s_base + (offs_n + I) * stride_sn + group * stride_sg, mask=n_ok, other=0.0
            )
            acc_g += tl.dot(a, wg, input_precision=DOT_PRECISION) * sg[None, :]
            acc_u += tl.dot(a, wu, input_precision=DOT_PRECISION) * su[None, :]
        else:
            acc_g = tl.dot(a, wg, acc_g, input_precision=DOT_PRECISION)
            acc_u = tl.dot(a, wu, acc_u, input_precision=DOT_PRECISION)

    if HAS_BIAS:
        b_base = bias_ptr + expert.to(tl.int64) * stride_be
        acc_g += tl.load(b_base + offs_n * stride_bn, mask=n_ok, other=0.0)[None, :]
        acc_u += tl.load(b_base + (offs_n + I) * stride_bn, mask=n_ok, other=0.0)[None, :]
    if ACTIVATION == 0:
        h = acc_g * tl.sigmoid(acc_g) * acc_u
    else:
        g = tl.minimum(acc_g, limit)
        u = tl.minimum(tl.maximum(acc_u, -limit), limit)
        h = g * tl.sigmoid(alpha * g) * (u + 1.0)
    tl.store(
        h_ptr + pair[:, None] * stride_hp + offs_n[None, :] * stride_hn,
        h.to(h_ptr.dtype.element_ty),
        mask=row_ok[:, None] & n_ok[None, :],
    )


@triton.jit
def _down_kernel(
    # pointers
    h_ptr,
    w_ptr,
    w_scale_ptr,
    rw_ptr,
    out_ptr,
    pair_ids_ptr,
    block_expert_ptr,
    num_valid_blocks_ptr,
    slot_ptr,
    bias_ptr,
    # sizes
    num_pairs,
    N,
    K,
    num_blocks,
    k_per_split,
    # strides
    stride_hp,
    stride_hk,
    stride_ws,
    stride_wn,
    stride_wk,
    stride_ss,
    stride_sn,
    stride_sg,
    stride_rt,
    stride_rj,
    stride_or,
    stride_on,
    stride_be,
    stride_bn,
    # meta-parameters
    HAS_BIAS: tl.constexpr,
    TOP_K: tl.constexpr,
    W_BITS: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    SCALE_AFTER_DOT: tl.constexpr,
    EVEN_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
    COMBINE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """y[p, n] = rw[t, j] * (h[p] . W2[n] (+ bias[expert, n] in split 0)) over the K range of
    split ``program_id(1)``, with
    t = p // TOP_K, j = p % TOP_K and W2 = w2[slot]; COMBINE_ATOMIC adds y into out[t] (fp32),
    COMBINE_STORE writes it to out[p]."""
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m, pid_n = _tile_ids(pid, num_blocks, tl.cdiv(N, BLOCK_N), GROUP_M)
    if pid_m >= tl.load(num_valid_blocks_ptr):
        return
    expert = tl.load(block_expert_ptr + pid_m)
    if expert < 0:
        return
    slot = tl.load(slot_ptr + expert).to(tl.int64)
    w_base = w_ptr + slot * stride_ws
    s_base = w_scale_ptr + slot * stride_ss

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(pair_ids_ptr + offs_m)
    row_ok = pair < num_pairs
    # row offsets in int64: pair * stride and token * stride pass 2**31 in long prefills
    token = (pair // TOP_K).to(tl.int64)
    pair = pair.to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    dtype = h_ptr.dtype.element_ty

    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < k_end
        a = tl.load(
            h_ptr + pair[:, None] * stride_hp + offs_k[None, :] * stride_hk,
            mask=row_ok[:, None] & k_ok[None, :],
            other=0.0,
        )
        w = _weight_tile(
            w_base, s_base, offs_n, offs_k, k0, K, n_ok, k_ok, stride_wn, stride_wk, stride_sn,
            stride_sg, W_BITS, GROUP_SIZE, SCALE_AFTER_DOT, BLOCK_K, BLOCK_N, EVEN_K,
        ).to(dtype)  # fmt: skip
        if DOT_IN_FP32:  # interpreter only: its bf16 tl.dot is wrong (module docstring)
            a, w = a.to(tl.float32), w.to(tl.float32)
        if SCALE_AFTER_DOT:
            s = tl.load(
                s_base + offs_n * stride_sn + (k0 // GROUP_SIZE) * stride_sg, mask=n_ok, other=0.0
            )
            acc += tl.dot(a, w, input_precision=DOT_PRECISION) * s[None, :]
        else:
            acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)

    if HAS_BIAS:  # bias[expert] (fp32), added by the first K split only
        b = tl.load(
            bias_ptr + expert.to(tl.int64) * stride_be + offs_n * stride_bn, mask=n_ok, other=0.0
        )
        acc += tl.where(pid_k == 0, 1.0, 0.0) * b[None, :]
    rw = tl.load(rw_ptr + token * stride_rt + (pair % TOP_K) * stride_rj, mask=row_ok, other=0.0)
    acc = acc * rw.to(tl.float32)[:, None]
    mask = row_ok[:, None] & n_ok[None, :]
    if COMBINE == COMBINE_ATOMIC:
        tl.atomic_add(
            out_ptr + token[:, None] * stride_or + offs_n[None, :] * stride_on,
            acc,
            mask=mask,
            sem="relaxed",
        )
    else:
        tl.store(out_ptr + pair[:, None] * stride_or + offs_n[None, :] * stride_on, acc, mask=mask)


@triton.jit
def _combine_kernel(
    # pointers
    y_ptr,
    out_ptr,
    # sizes
    N,
    # strides
    stride_yp,
    stride_yn,
    stride_ot,
    stride_on,
    # meta-parameters
    TOP_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """out[t, n] = sum_{j = 0 .. TOP_K-1} y[t * TOP_K + j, n], summed in that fixed order."""
    t = tl.program_id(0).to(tl.int64)  # int64 row offsets, as in the GEMM kernels
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        acc += tl.load(y_ptr + (t * TOP_K + j) * stride_yp + offs_n * stride_yn, mask=n_ok)
    tl.store(
        out_ptr + t * stride_ot + offs_n * stride_on, acc.to(out_ptr.dtype.element_ty), mask=n_ok
    )
