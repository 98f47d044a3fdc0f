"""Triton code for the token -> expert alignment (see ``alignment.py`` for the contract).

One program builds the whole :class:`~speq.kernels.alignment.ExpertPlan`, as vLLM's
``moe_align_block_size`` does, so the plan costs one launch. The pairs are walked in chunks of
CHUNK, which bounds the registers whatever the number of pairs (the work is serial in P: the
kernel is meant for decode and verify sizes, see ``alignment.MAX_KERNEL_PAIRS``):

1. ``counts[e]``: a histogram of the expert ids, chunk by chunk;
2. ``start[e]``: the exclusive cumsum of the counts padded to multiples of BLOCK_M, and
   ``num_valid_blocks`` = their total / BLOCK_M;
3. every row gets the sentinel and every block -1, then (after a barrier: a thread may later
   write a row another thread filled) each pair p of expert e goes to row
   ``start[e] + (pairs of e before p)``, its block gets e. The count before p is the pairs of e
   in earlier chunks (a running histogram, gathered at e) plus those earlier in p's own chunk (a
   [CHUNK, CHUNK] comparison), so the order within an expert is the pair order (stable). Each
   block of an expert's run holds at least one of its pairs (the padding is under BLOCK_M rows),
   so the scatter reaches every used block; pairs of one block write the same expert.

DIRECT (the ``"direct"`` plan): row ``p * BLOCK_M`` holds pair p, every other row the sentinel,
block p is pair p's expert, and all P blocks are used; no barrier is needed, as every address is
written once.
"""

import triton
import triton.language as tl


@triton.jit
def _chunk(ids_ptr, p0, num_pairs, stride_it, stride_ij, TOP_K: tl.constexpr, CHUNK: tl.constexpr):
    """Pairs ``p0 .. p0 + CHUNK - 1``: (pair ids, which are real, their experts in int32; 0 for
    the pairs past the last)."""
    pair = p0 + tl.arange(0, CHUNK)
    p_ok = pair < num_pairs
    ids = ids_ptr + (pair // TOP_K) * stride_it + (pair % TOP_K) * stride_ij
    return pair, p_ok, tl.load(ids, mask=p_ok, other=0).to(tl.int32)


@triton.jit
def _align_kernel(
    # pointers
    ids_ptr,
    pair_ids_ptr,
    block_expert_ptr,
    num_valid_ptr,
    # sizes
    num_pairs,
    num_rows,
    num_blocks,
    # strides
    stride_it,
    stride_ij,
    # meta-parameters
    TOP_K: tl.constexpr,
    DIRECT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_E: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """The plan of ``ids [T, TOP_K]`` (expert ids < BLOCK_E): ``pair_ids [num_rows]``,
    ``block_expert [num_blocks]`` and ``num_valid [1]``, all int32."""
    offs_c = tl.arange(0, CHUNK)
    offs_r = tl.arange(0, BLOCK_R)
    if DIRECT:
        for r0 in range(0, num_rows, BLOCK_R):
            rows = r0 + offs_r
            pair = tl.where(rows % BLOCK_M == 0, rows // BLOCK_M, num_pairs)
            tl.store(pair_ids_ptr + rows, pair, mask=rows < num_rows)
        for p0 in range(0, num_pairs, CHUNK):
            pair, p_ok, expert = _chunk(ids_ptr, p0, num_pairs, stride_it, stride_ij, TOP_K, CHUNK)
            tl.store(block_expert_ptr + pair, expert, mask=p_ok)
        tl.store(num_valid_ptr, num_pairs)
    else:
        # 1-2. counts and padded starts per expert
        counts = tl.zeros((BLOCK_E,), dtype=tl.int32)
        for p0 in range(0, num_pairs, CHUNK):
            pair, p_ok, expert = _chunk(ids_ptr, p0, num_pairs, stride_it, stride_ij, TOP_K, CHUNK)
            counts += tl.histogram(expert, BLOCK_E, mask=p_ok)
        padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
        next_row = tl.cumsum(padded, 0) - padded  # start[e], then past the pairs placed so far
        tl.store(num_valid_ptr, tl.sum(padded, 0) // BLOCK_M)

        # 3. sentinel rows and unused blocks, then the scatter over them
        for r0 in range(0, num_rows, BLOCK_R):
            rows = r0 + offs_r
            sentinel = tl.full((BLOCK_R,), 0, tl.int32) + num_pairs
            tl.store(pair_ids_ptr + rows, sentinel, mask=rows < num_rows)
        for b0 in range(0, num_blocks, BLOCK_R):
            blocks = b0 + offs_r
            unused = tl.full((BLOCK_R,), -1, tl.int32)
            tl.store(block_expert_ptr + blocks, unused, mask=blocks < num_blocks)
        tl.debug_barrier()
        for p0 in range(0, num_pairs, CHUNK):
            pair, p_ok, expert = _chunk(ids_ptr, p0, num_pairs, stride_it, stride_ij, TOP_K, CHUNK)
            # pairs of the same expert earlier in this chunk (masked pairs come after every
            # real one, so they are never counted)
            before = (expert[:, None] == expert[None, :]) & (offs_c[None, :] < offs_c[:, None])
            rank = tl.sum(before.to(tl.int32), axis=1)
            row = tl.gather(next_row, expert, 0) + rank
            tl.store(pair_ids_ptr + row, pair, mask=p_ok)
            tl.store(block_expert_ptr + row // BLOCK_M, expert, mask=p_ok)
            next_row += tl.histogram(expert, BLOCK_E, mask=p_ok)
