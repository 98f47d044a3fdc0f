"""What a generate request must be: `check_request` validates the prompt and the token count
against a model's config before anything runs."""

from __future__ import annotations

import torch

from speq.models.config import MoEConfig


def check_request(
    config: MoEConfig, input_ids: torch.Tensor, max_new_tokens: int, callback: object = None
) -> torch.Tensor:
    """``input_ids`` as a 1-D int64 CPU tensor, or a ValueError (a TypeError for a wrong
    type) saying what was expected of it, of ``max_new_tokens`` or of ``callback``."""
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable or None, got {callback!r}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int):
        raise TypeError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if not isinstance(input_ids, torch.Tensor):
        raise ValueError(f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
    if input_ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"input_ids must be int64 (or int32) token ids, got {input_ids.dtype}")
    if input_ids.dim() == 2 and input_ids.shape[0] == 1:
        input_ids = input_ids[0]
    if input_ids.dim() != 1:
        raise ValueError(
            f"input_ids must have shape [1, T] or [T] (speq decodes one sequence at a time), "
            f"got {tuple(input_ids.shape)}"
        )
    if input_ids.numel() == 0:
        raise ValueError("input_ids is empty: give at least one prompt token")
    v = config.vocab_size
    if int(input_ids.min()) < 0 or int(input_ids.max()) >= v:
        raise ValueError(f"input_ids must lie in [0, {v}) (the vocabulary size)")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    total = input_ids.shape[0] + max_new_tokens
    if total > config.max_seq_len:
        raise ValueError(
            f"prompt ({input_ids.shape[0]} tokens) + max_new_tokens ({max_new_tokens}) = "
            f"{total} exceeds the model's max_seq_len ({config.max_seq_len}, the context "
            "it was compiled for: CompileOptions.max_seq_len)"
        )
    return input_ids.to(torch.int64).cpu()
