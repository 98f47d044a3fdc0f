"""What the commands share: the model and prompt they run, progress bars, and errors of a device
budget that name the flag that set it."""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from tqdm import tqdm

import speq
from speq.frontend.checkpoint import from_checkpoint
from speq.models import MoEConfig, MoEForCausalLM
from speq.models.demo import demo_model, random_demo_model
from speq.models.tokenizer import Tokenizer


def load_model(args: argparse.Namespace) -> tuple[MoEForCausalLM | str, Tokenizer | None, str]:
    """The model a command runs, as `speq.compile` takes it: a checkpoint folder's path (speq's
    format or a Hugging Face one; its tokenizer.json when it has one), the random demo shape, or
    the shipped demo model (the default)."""
    if args.checkpoint:
        path = Path(args.checkpoint, "tokenizer.json")
        try:
            tok = Tokenizer(path) if path.is_file() else None
        except Exception as e:  # the tokenizers library's own error: a bad tokenizer.json
            raise ValueError(f"{path} is not a tokenizers tokenizer.json: {e}") from None
        return str(args.checkpoint), tok, f"checkpoint {args.checkpoint}"
    if args.random:
        what = f"a randomly initialised model (seed {args.seed}; untrained, so its output is noise)"
        return random_demo_model(args.seed), None, what
    model, tok = demo_model(dtype=torch.float32)
    return model, tok, "the shipped demo MoE (docs/MODEL_CARD.md)"


def compile_model(model: MoEForCausalLM | str, options: speq.CompileOptions) -> speq.CompiledModel:
    """`speq.compile`, with a bar over the shards while a checkpoint folder opens."""
    if not isinstance(model, str):
        return speq.compile(model, options)
    from speq.models.folder import shard_paths

    with bars() as new_bar:
        bar = new_bar(total=len(shard_paths(Path(model))), desc="opening", unit="shard")
        return speq.compile(model, options, progress=lambda n: bar.update(n - bar.n))


def model_config(model: MoEForCausalLM | str) -> MoEConfig:
    """The architecture of what `load_model` returned (a folder is opened, its weights mapped
    but not read)."""
    if isinstance(model, str):
        return from_checkpoint(model)[0].config
    return model.config


def prompt_ids(args: argparse.Namespace, tok: Tokenizer | None, cfg) -> torch.Tensor:
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
def bars() -> Iterator[Callable[..., tqdm]]:
    """Makes tqdm bars on stderr, each closed on every path (in order), and cleared rather than
    left behind when the command fails, so that the error is the last line. A bar is drawn only
    when stderr is a terminal (``disable=None``): a pipe or a log file gets no carriage returns
    and no escape codes."""
    made: list[tqdm] = []
    try:
        yield (
            lambda **kwargs: made.append(tqdm(file=sys.stderr, disable=None, **kwargs)) or made[-1]
        )
    except BaseException:
        for bar in made:
            bar.leave = False
        raise
    finally:
        for bar in made:
            bar.close()


@contextlib.contextmanager
def budget_flag(flag: str, value: str | None) -> Iterator[None]:
    """The memory plan's refusal of a budget (in bytes) names the flag that set it."""
    try:
        yield
    except ValueError as e:
        if value is None or not str(e).startswith("device_memory"):
            raise
        raise ValueError(f"{flag} {value} is too small for this model (expected more): {e}") from e
