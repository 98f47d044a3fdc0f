"""The ``speq`` command line: demo, generate, explain, roofline, tune."""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import re
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import NoReturn

import torch
from tqdm import tqdm

import speq
from speq.models import MoEForCausalLM
from speq.models.demo import demo_model, random_demo_model
from speq.models.tokenizer import Tokenizer


def _model(args: argparse.Namespace) -> tuple[MoEForCausalLM, Tokenizer | None, str]:
    """The model a command runs: a checkpoint folder, the random demo shape, or the shipped
    demo model (the default)."""
    if args.checkpoint:
        model, path, tok = speq.load(args.checkpoint), Path(args.checkpoint, "tokenizer.json"), None
        try:
            tok = Tokenizer(path) if path.is_file() else None
        except Exception as e:  # the tokenizers library's own error: a bad tokenizer.json
            raise ValueError(f"{path} is not a tokenizers tokenizer.json: {e}") from None
        return model, tok, f"checkpoint {args.checkpoint}"
    if args.random:
        what = f"a randomly initialised model (seed {args.seed}; untrained, so its output is noise)"
        return random_demo_model(args.seed), None, what
    model, tok = demo_model(dtype=torch.float32)
    return model, tok, "the shipped demo MoE (docs/MODEL_CARD.md)"


def _prompt_ids(args: argparse.Namespace, tok: Tokenizer | None, cfg) -> torch.Tensor:
    """The prompt as ``[1, T]`` token ids, checked against the model's vocabulary and
    max_seq_len, with errors that name the flag."""
    if args.prompt is not None and tok is None:
        raise ValueError("this model has no tokenizer; give the prompt as --prompt-ids")
    flag = "--prompt" if args.prompt is not None else "--prompt-ids"
    ids = tok.encode(args.prompt) if args.prompt is not None else args.prompt_ids
    if bad := [t for t in ids if not 0 <= t < cfg.vocab_size]:
        raise ValueError(
            f"{flag}: token id {bad[0]}: expected ids in the vocabulary [0, {cfg.vocab_size})"
        )
    n, new, most = len(ids), args.max_new_tokens, cfg.max_seq_len
    if n + new > most:
        raise ValueError(
            f"--max-new-tokens {new}: the prompt ({flag}, {n} token{'s' * (n != 1)}) + {new} new "
            f"tokens = {n + new} exceeds the model's max_seq_len ({most}); expected at most "
            f"{max(most - n, 0)} new tokens after this prompt"
        )
    return torch.tensor([ids], dtype=torch.int64)


@contextlib.contextmanager
def _bars() -> Iterator[Callable[..., tqdm]]:
    """Makes tqdm bars on stderr, each closed on every path (in order), and cleared rather than
    left behind when the command fails, so that the error is the last line."""
    bars: list[tqdm] = []
    try:
        yield lambda **kwargs: bars.append(tqdm(file=sys.stderr, **kwargs)) or bars[-1]
    except BaseException:
        for bar in bars:
            bar.leave = False
        raise
    finally:
        for bar in bars:
            bar.close()


@contextlib.contextmanager
def _budget(flag: str, value: str | None) -> Iterator[None]:
    """The memory plan's refusal of a budget (in bytes) names the flag that set it."""
    try:
        yield
    except ValueError as e:
        if value is None or not str(e).startswith("device_memory"):
            raise
        raise ValueError(f"{flag} {value} is too small for this model (expected more): {e}") from e


def cmd_generate(args: argparse.Namespace) -> int:
    model, tokenizer, what = _model(args)
    ids = _prompt_ids(args, tokenizer, model.config)
    print(f"model: {what}")
    cm = speq.compile(model)
    cm.engine.check_request(ids, args.max_new_tokens)  # anything else wrong: before the bar
    kw = {name: getattr(args, name) for name in ("temperature", "top_k", "top_p", "seed")}
    with _bars() as new_bar:
        bar = new_bar(total=args.max_new_tokens, desc="decoding", unit="tok")
        t0, tick = time.perf_counter(), lambda _: bar.update(1)
        out = cm.generate(ids, args.max_new_tokens, do_sample=args.sample, callback=tick, **kw)
    seconds = time.perf_counter() - t0
    print(
        f"{args.max_new_tokens} tokens in {seconds:.2f} s "
        f"({seconds / max(args.max_new_tokens, 1) * 1e3:.1f} ms/token, wall clock, CPU, all "
        "experts resident, prompt included)"
    )
    if tokenizer is not None:
        print(tokenizer.decode(out[0].tolist()))
    else:
        print("tokens:", " ".join(str(t) for t in out[0].tolist()))
    return 0


DEMO_PROMPT = "And it came to pass, when the king"


def cmd_demo(args: argparse.Namespace) -> int:
    from tabulate import tabulate

    from speq.compare import compare

    model, tokenizer = demo_model(dtype=torch.float64)  # float64: exact, batch-invariant argmax
    cfg = model.config
    print(
        f"speq demo: the shipped demo MoE ({cfg.num_layers} layers, {cfg.num_experts} experts "
        f"top-{cfg.top_k}, hidden {cfg.hidden_size}; see docs/MODEL_CARD.md), float64 on the CPU"
    )
    args.prompt_ids = None
    prompt = _prompt_ids(args, tokenizer, cfg)
    with _bars() as new_bar, _budget("--budget", f"{args.budget:g}"):

        def progress(label: str) -> Callable[[int], object]:
            bar = new_bar(total=args.max_new_tokens, desc=f"{label:>24}", unit="tok")
            return lambda _: bar.update(1)

        n, ks = args.max_new_tokens, (args.k,)
        result = compare(model, prompt, n, args.budget, ks=ks, progress=progress)
    cal = result.calibration
    print(f"\nlink: {cal.describe()}")
    print(
        f"device budget: {result.budget_bytes / 1e6:.2f} MB = non-expert weights + KV cache + "
        f"{args.budget:.0%} of the expert bytes, sizes counted in bf16 as on a GPU (compute "
        f"stays float64)"
    )
    text = tokenizer.decode(result.expected[0, prompt.shape[1] :].tolist())
    print(f"\n{args.prompt}|{text}\n")
    rates = ("hit_rate", "token_hit_rate", "acceptance_rate", "elb_recall")  # None: "-"
    rows = [
        [r["label"], r["cache_slots"], f"{r['tpot_ms']:.1f}", f"{r['speq_speedup']:.2f}x"]
        + ["-" if r[k] is None else f"{r[k]:.2f}" for k in rates]
        + ["yes" if r["identical_to_resident"] else "NO"]
        for r in result.rows
    ]
    headers = "policy|expert slots|TPOT (ms)|its TPOT / speq's|hit rate|token hit rate|"
    headers += "acceptance|ELB recall|same tokens"
    print(tabulate(rows, headers=headers.split("|"), tablefmt="github"))
    print(
        f"TPOT: wall-clock ms per output token on this CPU, {args.max_new_tokens} tokens after a "
        f"{prompt.shape[1]}-token prompt, cpu backend with the emulated link above. Hit rate: "
        f"(layer, expert) needs resident when a pass reached them; token hit rate: the passes' "
        f"routings (token, layer, top-k choice) whose expert needed no copy the compute waited for."
    )
    return 0 if all(r["identical_to_resident"] for r in result.rows) else 1


def cmd_explain(args: argparse.Namespace) -> int:
    model, _, what = _model(args)
    names = ("policy", "k", "backend", "profile", "device_memory")
    opts = speq.CompileOptions(**{name: getattr(args, name) for name in names})
    print(f"# model: {what}")
    print(f"# options: {opts}")
    with _budget("--device-memory", args.device_memory):
        print(speq.compile(model, opts).graphs)
    return 0


def cmd_roofline(args: argparse.Namespace) -> int:
    from speq.cost.plot import plot
    from speq.passes.governor import roofline
    from speq.sim import get_preset, get_profile

    folder = Path(args.out).parent
    if not folder.is_dir():
        raise FileNotFoundError(f"--out {args.out}: the folder {folder} does not exist")
    if args.model == "demo":
        cfg = demo_model()[0].config
    else:
        cfg = get_preset(args.model)
    profile = get_profile(args.profile)
    policy = roofline(cfg, profile, args.acceptance, args.miss_rate)
    title = (
        f"{args.model} on {profile.name}: acceptance {args.acceptance:.2f} per position, "
        f"{args.miss_rate:.0%} of needed experts not resident"
    )
    path = plot(policy, cfg, profile, title, args.out)
    print(policy.describe())
    print(f"wrote {path}")
    return 0


def _torch_dtype(name: str) -> torch.dtype:
    """``speq tune --dtype``: a float dtype by name (float16, bf16, ...)."""
    table = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
    table |= {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
    if name not in table:
        raise _bad(name, f"expected one of {', '.join(sorted(table))}")
    return table[name]


def cmd_tune(args: argparse.Namespace) -> int:
    from speq.kernels.shapes import PRESETS, MoEShape, get_shape
    from speq.kernels.tuner import tune_and_write, tuning_available

    shapes = [get_shape(m) for m in args.model or []]
    explicit = (args.E, args.N, args.K)
    if any(v is not None for v in explicit):
        if any(v is None for v in explicit):
            args.tune_parser.error("--E, --N and --K go together")
        if args.top_k > args.E:
            args.tune_parser.error(f"--top-k {args.top_k}: expected at most --E ({args.E})")
        shapes.append(MoEShape("custom", args.E, args.top_k, args.K, args.N))
    if not shapes:  # no shape given: every preset
        shapes = [get_shape(m) for m in sorted(PRESETS)]
    if not tuning_available():
        print("speq tune: tuning needs a CUDA device (and Triton); nothing to do on this machine.")
        return 0
    for shape in shapes:
        start = time.perf_counter()
        with _bars() as new_bar:
            bar = lambda it, s=shape: new_bar(iterable=it, desc=s.name, leave=False)
            kw = dict(group_size=args.group_size, max_candidates=args.max_candidates, progress=bar)
            path, best = tune_and_write(
                shape, args.dtype, args.buckets, bits=args.bits, **kw, config_dir=args.out
            )
        print(f"{shape.name}: {len(best)} buckets in {time.perf_counter() - start:.0f} s -> {path}")
    return 0


# Flag types check a value as argparse reads it. An error starts with NUL, which `_Parser.error`
# replaces by the flag's name: "--threads 0: expected an integer >= 1".


def _shown(text: str) -> str:
    """A flag's value as the user would type it (quoted when empty or holding spaces)."""
    return text if text and not re.search(r"\s|['\"]", text) else repr(text)


def _bad(text: str, why: str) -> argparse.ArgumentTypeError:
    return argparse.ArgumentTypeError(f"\0{_shown(text)}: {why}")


def _number(kind: type, ok: Callable[[float], bool], accepted: str) -> Callable[[str], float]:
    def parse(text: str):
        try:
            value = kind(text)
            good = math.isfinite(value) and ok(value)
        except (ValueError, OverflowError):
            good = False
        if not good:
            raise _bad(text, f"expected {accepted}")
        return value

    return parse


COUNT = _number(int, lambda v: v >= 0, "an integer >= 0")
POSITIVE_INT = _number(int, lambda v: v >= 1, "an integer >= 1")
POSITIVE = _number(float, lambda v: v > 0, "a number > 0")
PROBABILITY = _number(float, lambda v: 0 <= v <= 1, "a number in [0, 1]")
TOP_P = _number(float, lambda v: 0 < v <= 1, "a number in (0, 1]")
BUDGET = _number(float, lambda v: v > 0, "a number > 0: the fraction of all expert bytes (0.375)")


def _prompt_text(text: str) -> str:
    """``--prompt``: non-empty, valid UTF-8 text (Python hands bytes that are not UTF-8 over as
    lone surrogates, which no tokenizer takes)."""
    alternative = "(or token ids with --prompt-ids)"
    if not text:
        raise _bad(text, f"the prompt is empty; expected some text {alternative}")
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


def _token_ids(text: str) -> list[int]:
    """``--prompt-ids``: token ids (integers >= 0) separated by spaces or commas."""
    accepted = 'expected token ids (integers >= 0) separated by spaces or commas, e.g. "1 2 3"'
    parts = text.replace(",", " ").split()
    if not parts:
        raise _bad(text, f"no token ids given; {accepted}")
    for part in parts:
        if not re.fullmatch(r"[+-]?\d+", part):
            raise _bad(text, f"{part!r} is not an integer; {accepted}")
        if int(part) < 0:
            raise _bad(text, f"{part} is negative; {accepted}")
    return [int(part) for part in parts]


def _device_memory(text: str) -> str:
    """``speq explain --device-memory``: a budget that ``CompileOptions.device_memory`` reads."""
    from speq.runtime.budget import parse_budget

    try:
        parse_budget(text)
    except ValueError:
        units = "B, KB, MB, GB, TB, KiB, MiB, GiB, TiB"
        raise _bad(text, f'expected a positive size, a unit among {units} ("12MB")') from None
    return text


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        """Exit 2 (SystemExit, as argparse does) after one line naming the flag, the value and
        what is accepted, instead of the usage and a line."""
        message = re.sub(r"^argument (\S+): \0", r"\1 ", message)
        choice = r"^argument (\S+): invalid choice: (.*) \(choose from (.*)\)$"
        message = re.sub(choice, r"\1 \2: expected one of \3", message, flags=re.S)
        self.exit(2, f"speq: error: {_one_line(message)} (see '{self.prog} --help')\n")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    which = p.add_mutually_exclusive_group()
    which.add_argument("--checkpoint", help="a checkpoint folder (config.json + model.safetensors)")
    random_help = "a seeded random model of a small demo-family shape (RANDOM_DEMO_CONFIG)"
    which.add_argument("--random", action="store_true", help=random_help)
    p.add_argument("--seed", type=int, default=0, help="seed of the random model and of sampling")


def _add_decode_args(p: argparse.ArgumentParser, max_new_tokens: int) -> None:
    p.add_argument("--max-new-tokens", type=COUNT, default=max_new_tokens)
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=POSITIVE, default=1.0)
    p.add_argument("--top-k", type=POSITIVE_INT, default=None)
    p.add_argument("--top-p", type=TOP_P, default=None)


def build_parser() -> argparse.ArgumentParser:
    from speq.kernels.autotune import CONFIG_DIR, DEFAULT_BUCKETS
    from speq.kernels.shapes import PRESETS
    from speq.runtime.backends import BACKENDS
    from speq.runtime.policies import POLICIES
    from speq.sim import MODEL_PRESETS, PROFILES

    parser = _Parser(prog="speq", description=speq.__doc__)
    parser.add_argument("--version", action="version", version=f"speq {speq.__version__}")
    threads_help = "torch intra-op threads (default 1: the demo-size models gain nothing from "
    threads_help += "more, and spinning threads lose badly when a core is busy)"
    parser.add_argument("--threads", type=POSITIVE_INT, default=1, help=threads_help)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="speq against every baseline on the shipped demo model")
    p.add_argument("--prompt", type=_prompt_text, default=DEMO_PROMPT)
    p.add_argument("--max-new-tokens", type=POSITIVE_INT, default=32)
    budget_help = "device memory for experts (and the draft), as a fraction of all expert bytes"
    p.add_argument("--budget", type=BUDGET, default=0.375, help=budget_help)
    p.add_argument("--k", type=POSITIVE_INT, help="tokens drafted per cycle (default: governor)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("generate", help="generate tokens from a prompt")
    _add_model_args(p)
    _add_decode_args(p, 32)
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--prompt", type=_prompt_text, help="prompt text (needs a tokenizer)")
    group.add_argument("--prompt-ids", type=_token_ids, help='prompt token ids, e.g. "1 2 3"')
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("explain", help="print the IR after every compiler pass, and the policy")
    _add_model_args(p)
    p.add_argument("--policy", default="speq", choices=tuple(POLICIES))
    p.add_argument("--k", type=POSITIVE_INT, help="drafted tokens (speq; default: governor)")
    p.add_argument(
        "--backend", default="sim", choices=tuple(BACKENDS), help="sim: modelled hardware"
    )
    p.add_argument("--profile", default="a100-40g-pcie4", choices=tuple(PROFILES))
    p.add_argument("--device-memory", type=_device_memory, help='device budget, e.g. "12MB"')
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser("roofline", help="plot the Amortization Roofline (PNG) from the cost model")
    p.add_argument("--model", default="phi-3.5-moe", choices=(*sorted(MODEL_PRESETS), "demo"))
    p.add_argument("--profile", default="a100-40g-pcie4", choices=tuple(PROFILES))
    p.add_argument("--acceptance", type=PROBABILITY, default=0.9, help="p_j, at every position")
    p.add_argument("--miss-rate", type=PROBABILITY, default=0.5, help="needed experts not resident")
    p.add_argument("--out", default="roofline.png")
    p.set_defaults(func=cmd_roofline)

    what = "Tune the fused MoE Triton kernel and write JSON configs."
    p = sub.add_parser("tune", help="autotune the fused MoE kernels on this GPU", description=what)
    presets_help = "model preset (repeatable; default: every preset)"
    p.add_argument("--model", action="append", choices=sorted(PRESETS), help=presets_help)
    p.add_argument("--E", type=POSITIVE_INT, help="number of experts (explicit shape)")
    p.add_argument("--N", type=POSITIVE_INT, help="expert intermediate size I (explicit shape)")
    p.add_argument("--K", type=POSITIVE_INT, help="hidden size H (explicit shape)")
    p.add_argument("--top-k", type=POSITIVE_INT, default=2, help="experts per token (explicit)")
    p.add_argument("--dtype", type=_torch_dtype, default=torch.bfloat16)
    p.add_argument("--bits", type=int, choices=(0, 4, 8), default=0, help="0 = dense")
    p.add_argument("--group-size", type=POSITIVE_INT, default=128)
    p.add_argument("--buckets", type=POSITIVE_INT, nargs="+", default=list(DEFAULT_BUCKETS))
    p.add_argument("--max-candidates", type=POSITIVE_INT, default=None)
    p.add_argument("--out", type=Path, default=CONFIG_DIR, help="output directory")
    p.set_defaults(func=cmd_tune, tune_parser=p)
    return parser


# What a command reports as one line (exit status 2) rather than a traceback: bad input, a file
# that cannot be read, a copy to the device that failed.
ERRORS = (ValueError, TypeError, OSError, speq.TransferError)


def _one_line(e: BaseException | str) -> str:
    """``e``'s message on one line, printable whatever the terminal's encoding."""
    text = str(e)
    if isinstance(e, OSError) and e.strerror and e.filename is not None:
        text = f"{e.filename}: {e.strerror}"  # not "[Errno 2] No such file or directory: 'x'"
    text = " ".join(line.strip() for line in text.splitlines() if line.strip())
    return (text or type(e).__name__).encode("utf-8", "backslashreplace").decode("utf-8")


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
        print(f"speq: error: {_one_line(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
