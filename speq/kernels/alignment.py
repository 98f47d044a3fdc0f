"""Token -> expert alignment: the padded, expert-sorted row layout the fused MoE kernel walks.

For T tokens with k choices each there are P = T * k pairs; pair ``p = t * k + j`` is token t's
j-th choice, expert ``topk_ids[t, j]``. The kernel processes rows in blocks of ``block_m`` and
every row of a block must use the same expert's weights, so the pairs are grouped by expert and
each group is padded to a multiple of ``block_m``.

Two implementations, selected by ``backend`` (see :func:`align_experts`): one Triton kernel
(``_alignment_kernels.py``, one launch, for up to :data:`MAX_KERNEL_PAIRS` pairs and
:data:`MAX_KERNEL_EXPERTS` experts) and the torch reference (about 30 small ops, any size and
device). Both are sync-free (no ``.item()``, ``nonzero``, ``unique``, or Python branching on
tensor values) with outputs sized from the worst case, so they can run inside a captured CUDA
graph, and both give exactly the same plan.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from speq.kernels._triton import Backend, cdiv, next_power_of_2, select_backend

__all__ = [
    "ALIGN_METHODS",
    "MAX_KERNEL_EXPERTS",
    "MAX_KERNEL_PAIRS",
    "AlignMethod",
    "ExpertPlan",
    "align_experts",
    "align_experts_torch",
    "kernel_unsupported",
    "max_plan_blocks",
]

AlignMethod = Literal["sorted", "direct"]
ALIGN_METHODS: tuple[str, ...] = ("sorted", "direct")

# The kernel is one program walking the pairs serially (decode and verify sizes); past these
# the torch path, whose ops run in parallel, serves.
MAX_KERNEL_PAIRS = 4096
MAX_KERNEL_EXPERTS = 1024
_CHUNK = 64  # pairs per step of the kernel: its [CHUNK, CHUNK] comparison bounds the registers
_BLOCK_R = 1024  # rows (and blocks) filled per step


@dataclass(frozen=True)
class ExpertPlan:
    """The padded row layout of the (token, choice) pairs, grouped by expert.

    Attributes:
        sorted_pair_ids: int32 ``[max_blocks * block_m]``. Row r of the layout computes pair
            ``p = sorted_pair_ids[r]``, i.e. token ``p // top_k``, choice ``p % top_k``; padding
            rows hold the sentinel ``num_pairs`` (= T * k) and must be neither read nor written.
        block_expert: int32 ``[max_blocks]``; every row of block b (rows ``b * block_m`` up to
            ``(b + 1) * block_m``) uses expert ``block_expert[b]``; -1 marks an unused block.
        num_valid_blocks: int32 ``[1]`` on the device: blocks ``0 .. num_valid_blocks - 1`` are in
            use and all later ones are not (kernels launch ``max_blocks`` programs along rows and
            the surplus exit at once).
        num_tokens, top_k: T and k.
        block_m: rows per block.
        method: ``"sorted"`` (pairs sorted by expert, each expert's run padded to ``block_m``) or
            ``"direct"`` (no sort: pair p alone in block p at row ``p * block_m``, for decode,
            where sorting costs more than it saves).
    """

    sorted_pair_ids: torch.Tensor
    block_expert: torch.Tensor
    num_valid_blocks: torch.Tensor
    num_tokens: int
    top_k: int
    block_m: int
    method: AlignMethod

    @property
    def num_pairs(self) -> int:
        """P = T * k, also the padding sentinel."""
        return self.num_tokens * self.top_k

    @property
    def max_blocks(self) -> int:
        """Blocks in the worst case: the length of ``block_expert``."""
        return self.block_expert.shape[0]


def max_plan_blocks(num_pairs: int, num_experts: int, block_m: int, method: str) -> int:
    """Worst-case block count: every active expert (at most min(E, P)) wastes up to
    ``block_m - 1`` padding rows, so rows <= P + min(E, P) * (block_m - 1)."""
    if method == "direct":
        return num_pairs
    rows = num_pairs + min(num_experts, num_pairs) * (block_m - 1)
    return cdiv(rows, block_m)


def kernel_unsupported(num_pairs: int, num_experts: int) -> str | None:
    """Why the alignment kernel does not take these sizes, or None when it does."""
    if num_pairs > MAX_KERNEL_PAIRS:
        return f"the alignment kernel takes up to {MAX_KERNEL_PAIRS} pairs, got {num_pairs}"
    if num_experts > MAX_KERNEL_EXPERTS:
        return f"the alignment kernel takes up to {MAX_KERNEL_EXPERTS} experts, got {num_experts}"
    return None


def _check(topk_ids: torch.Tensor, num_experts: int, block_m: int, method: str) -> None:
    if topk_ids.dim() != 2:
        raise ValueError(f"topk_ids must be [T, k], got shape {tuple(topk_ids.shape)}")
    if topk_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"topk_ids must be int32 or int64, got {topk_ids.dtype}")
    if method not in ALIGN_METHODS:
        raise ValueError(f"method must be one of {ALIGN_METHODS}, got {method!r}")
    if block_m < 1:
        raise ValueError(f"block_m must be >= 1, got {block_m}")
    if num_experts < 1:
        raise ValueError(f"num_experts must be >= 1, got {num_experts}")


def align_experts(
    topk_ids: torch.Tensor,
    num_experts: int,
    block_m: int,
    method: AlignMethod = "sorted",
    *,
    backend: Backend = "auto",
) -> ExpertPlan:
    """Build the :class:`ExpertPlan` for ``topk_ids [T, k]`` (expert ids in ``[0, num_experts)``).

    ``"sorted"`` orders pairs by expert and, within an expert, by pair index (a stable sort).
    Ids outside ``[0, num_experts)`` are not checked (that would need a host sync) and give an
    undefined plan.

    ``backend``: ``"auto"`` runs the Triton kernel for CUDA tensors when
    :func:`kernel_unsupported` accepts the sizes, and the torch reference otherwise;
    ``"triton"`` insists on the kernel (CPU tensors need ``TRITON_INTERPRET=1``) and raises a
    ValueError saying why it cannot run; ``"torch"`` runs the reference. The plans are equal.
    """
    _check(topk_ids, num_experts, block_m, method)
    reason = kernel_unsupported(topk_ids.numel(), num_experts)
    if backend == "triton" and reason:
        raise ValueError(f"align_experts: {reason}")
    chosen = select_backend(backend, topk_ids.device, (), frozenset(), "align_experts")
    if chosen == "torch" or reason:
        return align_experts_torch(topk_ids, num_experts, block_m, method)
    return _align_experts_triton(topk_ids, num_experts, block_m, method)


def _align_experts_triton(
    topk_ids: torch.Tensor, num_experts: int, block_m: int, method: AlignMethod
) -> ExpertPlan:
    from speq.kernels import _alignment_kernels as kern

    num_tokens, top_k = topk_ids.shape
    num_pairs = num_tokens * top_k
    device = topk_ids.device
    max_blocks = max_plan_blocks(num_pairs, num_experts, block_m, method)
    pair_ids = torch.empty((max_blocks * block_m,), dtype=torch.int32, device=device)
    block_expert = torch.empty((max_blocks,), dtype=torch.int32, device=device)
    num_valid = torch.empty((1,), dtype=torch.int32, device=device)
    kern._align_kernel[(1,)](
        topk_ids, pair_ids, block_expert, num_valid,
        num_pairs, pair_ids.shape[0], max_blocks,
        *topk_ids.stride(),
        TOP_K=max(top_k, 1), DIRECT=method == "direct", BLOCK_M=block_m,
        BLOCK_E=next_power_of_2(num_experts), CHUNK=_CHUNK, BLOCK_R=_BLOCK_R, num_warps=4,
    )  # fmt: skip
    return ExpertPlan(pair_ids, block_expert, num_valid, num_tokens, top_k, block_m, method)


def align_experts_torch(
    topk_ids: torch.Tensor,
    num_experts: int,
    block_m: int,
    method: AlignMethod = "sorted",
) -> ExpertPlan:
    """The reference of :func:`align_experts`, in about 30 small torch ops (any size, any
    device)."""
    _check(topk_ids, num_experts, block_m, method)
    num_tokens, top_k = topk_ids.shape
    num_pairs = num_tokens * top_k
    device = topk_ids.device
    flat = topk_ids.reshape(-1).to(torch.int64)
    max_blocks = max_plan_blocks(num_pairs, num_experts, block_m, method)
    pair_ids = torch.full((max_blocks * block_m,), num_pairs, dtype=torch.int32, device=device)

    if method == "direct":
        pair_ids.view(max_blocks, block_m)[:, 0] = torch.arange(
            num_pairs, dtype=torch.int32, device=device
        )
        block_expert = flat.to(torch.int32)
        num_valid = torch.full((1,), num_pairs, dtype=torch.int32, device=device)
        return ExpertPlan(pair_ids, block_expert, num_valid, num_tokens, top_k, block_m, method)

    counts = torch.zeros(num_experts, dtype=torch.int64, device=device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    padded_end = torch.cumsum(padded, dim=0)
    padded_start = padded_end - padded
    count_start = torch.cumsum(counts, dim=0) - counts
    sorted_experts, order = torch.sort(flat, stable=True)
    rank = torch.arange(num_pairs, device=device) - count_start[sorted_experts]
    dest = padded_start[sorted_experts] + rank
    pair_ids.scatter_(0, dest, order.to(torch.int32))
    # Block b starts at row b * block_m, inside the run of the first expert whose padded run ends
    # after that row; blocks past the last run get index E, i.e. unused.
    block_start = torch.arange(max_blocks, device=device) * block_m
    expert = torch.searchsorted(padded_end, block_start, right=True)
    block_expert = torch.where(expert < num_experts, expert, -1).to(torch.int32)
    num_valid = (padded_end[-1:] // block_m).to(torch.int32)
    return ExpertPlan(pair_ids, block_expert, num_valid, num_tokens, top_k, block_m, method)
