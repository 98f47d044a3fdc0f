"""The errors speq raises besides ValueError (bad input) and TypeError (a wrong type)."""

from __future__ import annotations


class TransferError(RuntimeError):
    """A host → device copy of an expert failed on every attempt (speq.runtime.offload retries a
    failed copy a bounded number of times). No slot is left marked resident with partial
    contents; the run stops, and the compiled model can generate again."""

    def __init__(self, what: str, attempts: int, cause: BaseException | None = None) -> None:
        super().__init__(
            f"copy of {what} to the device failed {attempts} times"
            + (f": {cause}" if cause else "")
        )
        self.what, self.attempts, self.cause = what, attempts, cause
