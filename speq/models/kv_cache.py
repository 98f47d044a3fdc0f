"""A preallocated key/value cache that is written T tokens at a time and can be rolled back."""

from __future__ import annotations

import torch

from speq.models.config import MoEConfig


class KVCache:
    """Keys and values of every layer, ``[layers, batch, max_seq_len, kv_heads, head_dim]`` (with
    MLA, keys ``[..., 1, kv_lora_rank + qk_rope_head_dim]``: the latent and rotary key; no values).

    ``length`` is the number of committed positions. A forward step over T tokens at position p
    writes positions p..p+T-1 of every layer and then sets ``length = p + T``; ``truncate(n)``
    rolls back to n positions (speculative decoding discards rejected tokens this way; their
    stale entries are overwritten by the next write).
    """

    def __init__(
        self,
        config: MoEConfig,
        batch: int = 1,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        shape = (config.num_layers, batch, config.max_seq_len, config.num_kv_heads, config.head_dim)
        k_shape, v_shape = shape, shape
        if config.is_mla:  # one "key" per token: the latent and the rotary key; no values
            k_shape = (*shape[:3], 1, config.kv_lora_rank + config.qk_rope_head_dim)
            v_shape = (*shape[:3], 1, 0)
        self.k = torch.zeros(k_shape, dtype=dtype, device=device)
        self.v = torch.zeros(v_shape, dtype=dtype, device=device)
        self.length = 0

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    @property
    def nbytes(self) -> int:
        return (self.k.numel() + self.v.numel()) * self.k.element_size()

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, start: int) -> None:
        """Store ``k, v [batch, T, kv_heads, head_dim]`` at positions ``start .. start+T-1``."""
        end = start + k.shape[1]
        if start < 0 or end > self.max_len:
            raise ValueError(
                f"KV cache write of positions {start}..{end - 1} is outside 0..{self.max_len - 1} "
                f"(max_seq_len = {self.max_len})"
            )
        self.k[layer, :, start:end] = k
        self.v[layer, :, start:end] = v

    def write_at(
        self, layer: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor
    ) -> None:
        """Store ``k, v [batch, T, kv_heads, head_dim]`` at the device tensor ``positions [T]``:
        no host sync and no value-dependent shape (what a captured CUDA graph needs), so the
        positions are not checked here; callers keep them inside the cache."""
        self.k[layer].index_copy_(1, positions, k)
        self.v[layer].index_copy_(1, positions, v)

    def view(self, layer: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of positions ``0 .. end-1`` of one layer."""
        return self.k[layer, :, :end], self.v[layer, :, :end]

    def truncate(self, length: int) -> None:
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a KV cache of length {self.length} to {length}")
        self.length = length
