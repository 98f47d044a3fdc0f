"""`Tokenizer`: the byte-level BPE tokenizer shipped with the demo checkpoint."""

from __future__ import annotations

from pathlib import Path


class Tokenizer:
    """A thin wrapper over a ``tokenizers`` ``tokenizer.json`` (byte-level BPE).

    Id 0 is ``<|endoftext|>``, the document separator the demo model was trained with.
    """

    def __init__(self, path: str | Path) -> None:
        from tokenizers import Tokenizer as _HFTokenizer

        self.path = Path(path)
        self._tok = _HFTokenizer.from_file(str(self.path))

    @classmethod
    def from_file(cls, path: str | Path) -> Tokenizer:
        return cls(path)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    @property
    def eos_id(self) -> int | None:
        return self._tok.token_to_id("<|endoftext|>")

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text).ids)

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def __repr__(self) -> str:
        return f"Tokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"
