"""The ``speq`` command line: demo, generate, explain, export, roofline, tune, simulate.

The package's modules: `args` (the flags' types and the parser that reports a refused flag as
one line), `common` (the model, prompt and progress bars the commands share), `demo`,
`generate`, `tools` (explain, export, roofline, tune), `simulate` and `simulate_model` (the
commands), `parser` (`build_parser`).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

import torch

import speq
from speq.cli.args import one_line
from speq.cli.demo import DEMO_PROMPT
from speq.cli.parser import build_parser

__all__ = ["DEMO_PROMPT", "ERRORS", "build_parser", "main"]

# What a command reports as one line (exit status 2) rather than a traceback: bad input, a file
# that cannot be read, a copy to the device that failed.
ERRORS = (ValueError, TypeError, OSError, speq.TransferError)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``speq`` command line. A flag argparse refuses prints one line ``speq: error: ...``
    to stderr and exits 2 (SystemExit); a failed command prints the same line and returns 2 (with
    SPEQ_DEBUG=1 its error propagates, with the traceback); Ctrl-C prints ``speq: interrupted``
    and returns 130."""
    debug = os.environ.get("SPEQ_DEBUG", "") not in ("", "0")
    try:
        args = build_parser().parse_args(argv)
        torch.set_num_threads(args.threads)
        return args.func(args)
    except KeyboardInterrupt:
        print("speq: interrupted", file=sys.stderr)
        return 130
    except ERRORS as e:
        if debug:
            raise
        print(f"speq: error: {one_line(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
