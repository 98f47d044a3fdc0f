"""The flags' types and the parser: each type checks a value as argparse reads it, and a refused
flag is one line naming it, the value and what is accepted.

An error of a flag type starts with NUL, which `Parser.error` replaces by the flag's name:
"--threads 0: expected an integer >= 1".
"""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Callable
from typing import NoReturn

import torch


def one_line(e: BaseException | str) -> str:
    """``e``'s message on one line, printable whatever the terminal's encoding."""
    text = str(e)
    if isinstance(e, OSError) and e.strerror and e.filename is not None:
        text = f"{e.filename}: {e.strerror}"  # not "[Errno 2] No such file or directory: 'x'"
    text = " ".join(line.strip() for line in text.splitlines() if line.strip())
    return (text or type(e).__name__).encode("utf-8", "backslashreplace").decode("utf-8")


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        """Exit 2 (SystemExit, as argparse does) after one line naming the flag, the value and
        what is accepted, instead of the usage and a line."""
        message = re.sub(r"^argument (\S+): \0", r"\1 ", message)
        choice = r"^argument (\S+): invalid choice: (.*) \(choose from (.*)\)$"
        message = re.sub(choice, r"\1 \2: expected one of \3", message, flags=re.S)
        self.exit(2, f"speq: error: {one_line(message)} (see '{self.prog} --help')\n")


def shown(text: str) -> str:
    """A flag's value as the user would type it (quoted when empty or holding spaces)."""
    return text if text and not re.search(r"\s|['\"]", text) else repr(text)


def bad(text: str, why: str) -> argparse.ArgumentTypeError:
    """The error of a flag type: the value and why it is refused (`Parser.error` adds the flag)."""
    return argparse.ArgumentTypeError(f"\0{shown(text)}: {why}")


def _number(kind: type, ok: Callable[[float], bool], accepted: str) -> Callable[[str], float]:
    def parse(text: str):
        try:
            value = kind(text)
            good = math.isfinite(value) and ok(value)
        except (ValueError, OverflowError):
            good = False
        if not good:
            raise bad(text, f"expected {accepted}")
        return value

    return parse


COUNT = _number(int, lambda v: v >= 0, "an integer >= 0")
POSITIVE_INT = _number(int, lambda v: v >= 1, "an integer >= 1")
POSITIVE = _number(float, lambda v: v > 0, "a number > 0")
PROBABILITY = _number(float, lambda v: 0 <= v <= 1, "a number in [0, 1]")
TOP_P = _number(float, lambda v: 0 < v <= 1, "a number in (0, 1]")
BUDGET = _number(float, lambda v: v > 0, "a number > 0: the fraction of all expert bytes (0.375)")
GBPS = _number(float, lambda v: v > 0, "a number > 0 (GB/s)")


def prompt_text(text: str) -> str:
    """``--prompt``: non-empty, valid UTF-8 text (Python hands bytes that are not UTF-8 over as
    lone surrogates, which no tokenizer takes)."""
    alternative = "(or token ids with --prompt-ids)"
    if not text:
        raise bad(text, f"the prompt is empty; expected some text {alternative}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        c = ord(text[e.start])
        what = f"byte 0x{c - 0xDC00:02x}" if 0xDC80 <= c <= 0xDCFF else f"U+{c:04X}"
        raw = repr(text.encode("utf-8", "surrogateescape")[:60])
        raise argparse.ArgumentTypeError(
            f"\0{raw}: not valid UTF-8 text ({what} at character {e.start}); expected UTF-8 "
            f"text {alternative}"
        ) from None
    return text


def token_ids(text: str) -> list[int]:
    """``--prompt-ids``: token ids (integers >= 0) separated by spaces or commas."""
    accepted = 'expected token ids (integers >= 0) separated by spaces or commas, e.g. "1 2 3"'
    parts = text.replace(",", " ").split()
    if not parts:
        raise bad(text, f"no token ids given; {accepted}")
    for part in parts:
        if not re.fullmatch(r"[+-]?\d+", part):
            raise bad(text, f"{part!r} is not an integer; {accepted}")
        if int(part) < 0:
            raise bad(text, f"{part} is negative; {accepted}")
    return [int(part) for part in parts]


def device_memory(text: str) -> str:
    """``--device-memory``: a budget that ``CompileOptions.device_memory`` reads."""
    from speq.runtime.budget import parse_budget

    try:
        parse_budget(text)
    except ValueError:
        units = "B, KB, MB, GB, TB, KiB, MiB, GiB, TiB"
        raise bad(text, f'expected a positive size, a unit among {units} ("12MB")') from None
    return text


def torch_dtype(name: str) -> torch.dtype:
    """``speq tune --dtype``: a float dtype by name (float16, bf16, ...)."""
    table = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
    table |= {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
    if name not in table:
        raise bad(name, f"expected one of {', '.join(sorted(table))}")
    return table[name]
