"""The record of a compilation: the graph after every pass, with timings."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from speq.ir.program import Program


@dataclass(frozen=True)
class PassRecord:
    name: str
    program: Program
    seconds: float
    changed: bool
    note: str = ""  # what the pass decided, for passes that decide rather than rewrite


class PassHistory:
    """The graphs a compilation went through, in order; prints as canonical IR text."""

    def __init__(self, records: list[PassRecord]) -> None:
        self.records = list(records)

    def __iter__(self) -> Iterator[PassRecord]:
        return iter(self.records)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: int | str) -> Program:
        if isinstance(key, int):
            return self.records[key].program
        for r in self.records:
            if r.name == key:
                return r.program
        raise KeyError(f"no pass named {key!r}; passes run: {[r.name for r in self.records]}")

    @property
    def final(self) -> Program:
        return self.records[-1].program

    def names(self) -> list[str]:
        return [r.name for r in self.records]

    def __str__(self) -> str:
        parts = []
        for r in self.records:
            note = "" if r.changed else ", unchanged"
            head = f"# after {r.name} ({r.seconds * 1e3:.1f} ms{note})"
            if r.note:
                head += "\n# " + r.note
            parts.append(f"{head}\n{r.program}")
        return "\n\n".join(parts)

    __repr__ = __str__


Pass = Callable[[Program], Program]
