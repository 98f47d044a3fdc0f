"""Triton code for top-k routing (see ``routing.py`` for the contract)."""

import triton
import triton.language as tl

# MODE values (routing.py passes ``.value``)
SOFTMAX_TOPK = tl.constexpr(0)
TOPK_SOFTMAX = tl.constexpr(1)


@triton.jit
def _route_topk_kernel(
    # pointers
    logits_ptr,
    ids_ptr,
    weights_ptr,
    # sizes
    T,
    E,
    # strides
    stride_lt,
    stride_le,
    stride_it,
    stride_ij,
    stride_wt,
    stride_wj,
    # meta-parameters
    TOP_K: tl.constexpr,
    MODE: tl.constexpr,
    RENORMALIZE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """One program routes BLOCK_T rows: k rounds of (max, lowest index among the max)."""
    pid = tl.program_id(0)
    offs_t = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_e = tl.arange(0, BLOCK_E)
    offs_j = tl.arange(0, BLOCK_K)
    t_ok = offs_t < T
    e_ok = offs_e < E

    x = tl.load(
        logits_ptr + offs_t[:, None] * stride_lt + offs_e[None, :] * stride_le,
        mask=t_ok[:, None] & e_ok[None, :],
        other=float("-inf"),
    ).to(tl.float32)
    x = tl.where(x != x, float("-inf"), x)  # NaN logits count as -inf
    x = tl.where(t_ok[:, None], x, 0.0)  # rows past T: finite values, never stored
    row_max = tl.max(x, axis=1)
    if MODE == SOFTMAX_TOPK:
        denom = tl.sum(tl.where(e_ok[None, :], tl.exp(x - row_max[:, None]), 0.0), axis=1)

    taken = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.int32)
    sel_ids = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.int32)
    sel_w = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        avail = e_ok[None, :] & (taken == 0)
        best = tl.max(tl.where(avail, x, float("-inf")), axis=1)
        is_best = avail & (x == best[:, None])
        idx = tl.min(tl.where(is_best, offs_e[None, :], BLOCK_E), axis=1)
        taken = tl.where(offs_e[None, :] == idx[:, None], 1, taken)
        if MODE == SOFTMAX_TOPK:
            w = tl.exp(best - row_max) / denom
        else:  # the first pick is the row max, so this is softmax over the picks once normalised
            w = tl.exp(best - row_max)
        sel_ids = tl.where(offs_j[None, :] == j, idx[:, None], sel_ids)
        sel_w = tl.where(offs_j[None, :] == j, w[:, None], sel_w)

    if MODE == TOPK_SOFTMAX or RENORMALIZE:
        sel_w = sel_w / tl.sum(sel_w, axis=1)[:, None]
    out_mask = t_ok[:, None] & (offs_j[None, :] < TOP_K)
    tl.store(
        ids_ptr + offs_t[:, None] * stride_it + offs_j[None, :] * stride_ij, sel_ids, mask=out_mask
    )
    tl.store(
        weights_ptr + offs_t[:, None] * stride_wt + offs_j[None, :] * stride_wj,
        sel_w,
        mask=out_mask,
    )
