"""``speq demo``: speq beside every baseline on the shipped demo model, one contender at a time
(speq.compare's pieces), each with its own progress bar and figures, then a table."""

from __future__ import annotations

import argparse
import textwrap

import torch

import speq
from speq.cli.common import bars, budget_flag, prompt_ids
from speq.models.demo import model_with_tokenizer

DEMO_PROMPT = "And it came to pass, when the king"
# `time python -m speq demo` (32 new tokens) on this project's 2-core CPU machine, no GPU
DEMO_SECONDS = 35
WIDTH = 100  # columns the tables and the prose fit in

# (header, what the column holds, right-aligned): the table's columns and its legend
COLUMNS = (
    (
        "policy",
        "speq's k* (or no draft) is its governor's choice; speq computes misses on the host where "
        "faster, speq/no host copies them; fiddler: misses on the host; hostcompute: every "
        "routed expert on the host",
        False,
    ),
    ("slots", "expert cache slots", True),
    ("TPOT (ms)", "wall-clock ms per new token, the governor's calibration excluded", True),
    ("vs speq", "its TPOT / the faster speq's", True),
    ("hit", "(layer, expert) needs found resident", True),
    ("tok hit", "routings (token, layer, top-k choice) that waited for no copy", True),
    ("accept", "drafted tokens accepted", True),
    ("ELB rec", "experts verification used that the draft predicted", True),
    ("same", "tokens equal to the all-resident output", False),
)


def say(text: str) -> None:
    """A line of prose on stdout, wrapped to `WIDTH` columns."""
    print(textwrap.fill(text, WIDTH, break_on_hyphens=False), flush=True)


def figures(row: dict) -> str:
    """A contender's own figures, as its progress bar ends with them."""
    text = f"{row['tpot_ms']:.1f} ms/token, hit {row['hit_rate']:.2f}"
    text += f", tok hit {row['token_hit_rate']:.2f}"
    if row["acceptance_rate"] is not None:
        text += f", accept {row['acceptance_rate']:.2f}"
    return text + ("" if row["identical_to_resident"] else ", tokens DIFFER from resident")


def markdown(headers: list[str], rows: list[list[str]], right: list[bool]) -> str:
    """A GitHub-markdown table, each column as wide as its widest cell (no more)."""
    widths = [max(map(len, col)) for col in zip(headers, *rows)]

    def line(cells: list[str]) -> str:
        padded = (c.rjust(w) if r else c.ljust(w) for c, w, r in zip(cells, widths, right))
        return "| " + " | ".join(padded) + " |"

    rule = "|" + "|".join("-" * (w + 1) + (":" if r else "-") for w, r in zip(widths, right))
    return "\n".join([line(headers), rule + "|", *map(line, rows)])


def table(rows: list[dict]) -> str:
    """The comparison table (at most `WIDTH` columns for the demo's labels) and its legend."""
    rates = ("hit_rate", "token_hit_rate", "acceptance_rate", "elb_recall")  # None: "-"
    cells = [
        [r["label"], str(r["cache_slots"]), f"{r['tpot_ms']:.1f}", f"{r['speq_speedup']:.2f}x"]
        + ["-" if r[k] is None else f"{r[k]:.2f}" for k in rates]
        + ["yes" if r["identical_to_resident"] else "NO"]
        for r in rows
    ]
    text = markdown([c[0] for c in COLUMNS], cells, [c[2] for c in COLUMNS])
    legend = "; ".join(f"{h}: {what}" for h, what, _ in COLUMNS) + "; -: not applicable."
    return text + "\n" + textwrap.fill(legend, WIDTH, break_on_hyphens=False)


def _label(c, cm: speq.CompiledModel) -> str:
    """A contender's row label: a governed speq row says what its governor chose."""
    if cm.governed is None:
        return c.label
    name = "speq" if cm.options.host_compute is not False else "speq/no host"
    return f"{name} (k*={cm.governed.spec.k})" if cm.governed.use_draft else f"{name} (no draft)"


def _run(model, c, prompt: torch.Tensor, expected: torch.Tensor, new_bar) -> dict:
    """One contender: compile it (and calibrate its governor), then decode under a bar that ends
    with its figures; its row."""
    from speq import compare

    if c.options.policy == "speq" and c.options.k is None:
        say(
            f"calibrating the governor on the {c.options.backend} backend over the emulated link "
            f"(twice: on a random prompt as speq compiles, then on this prompt)..."
        )
    cm = speq.compile(model, c.options)
    cm.calibrate(prompt)  # the governor's own (a no-op without one), outside the bar
    label = _label(c, cm)
    say(f"running {label}...")
    fmt = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]"
    n = expected.shape[-1] - prompt.shape[-1]
    bar = new_bar(total=n, desc=f"{label:>23}", unit="tok", bar_format=fmt)
    row = compare.measure(cm, prompt, expected, 1, lambda _: bar.update(1))
    drawn = not bar.disable  # disabled: stderr is not a terminal
    bar.set_postfix_str(figures(row), refresh=False)
    bar.close()
    if not drawn:  # no bar to end with the figures: a line
        say(f"  {label}: {figures(row)}")
    return {"label": label, "policy": c.options.policy, "k": c.options.k, **row}


def cmd_demo(args: argparse.Namespace) -> int:
    from speq import compare

    # float64: exact, batch-invariant argmax
    model, tokenizer, what = model_with_tokenizer(args.model, torch.float64)
    if args.model is None:
        what += " (see docs/MODEL_CARD.md)"
    cfg, n = model.config, args.max_new_tokens
    say(
        f"speq demo: {what} ({cfg.num_layers} layers, {cfg.num_experts} experts "
        f"top-{cfg.top_k}, hidden {cfg.hidden_size}), float64 on the CPU."
    )
    say(
        f"speq (with and without host compute), the baselines and the bounds decode {n} tokens "
        f"each over an emulated slow link, one after the other; with the default 32 tokens this "
        f"takes about {DEMO_SECONDS} s on a 2-core CPU, most of it in the baselines that wait "
        f"for copies."
    )
    args.prompt_ids = None
    prompt = prompt_ids(args, tokenizer, cfg)
    memory_dtype = torch.bfloat16  # sizes counted as on a GPU
    with bars() as new_bar, budget_flag("--budget", f"{args.budget:g}"):
        resident = speq.compile(model, speq.CompileOptions(memory_dtype=memory_dtype))
        budget = compare.budget_bytes(resident, args.budget)
        # refuses a budget too small for the model before anything is timed
        check = speq.CompileOptions(
            policy="speq", k=1, device_memory=budget, memory_dtype=memory_dtype
        )
        draft_bytes = speq.compile(model, check).draft_bytes
        say("calibrating the link on this CPU (every expert resident, 3 runs of 16 tokens)...")
        cal = compare.calibrate_link(resident, prompt)
        say(f"link: {cal.describe()}")
        say(
            f"device budget: {budget / 1e6:.2f} MB = non-expert weights + KV cache + "
            f"{args.budget:.0%} of the expert bytes, sizes counted in bf16 as on a GPU (compute "
            f"stays float64)"
        )
        say(f"decoding the reference: {n} tokens with every expert resident...")
        expected = resident.generate(prompt, n)
        link = {**compare.link_options(cal), "memory_dtype": memory_dtype}
        rows = []
        for c in compare.contenders(model, budget, link, (args.k,), draft_bytes=draft_bytes):
            rows.append(_run(model, c, prompt, expected, new_bar))
    speq_tpot = min(r["tpot_ms"] for r in rows if r["policy"] == "speq")
    for r in rows:
        r["speq_speedup"] = r["tpot_ms"] / speq_tpot
    text = tokenizer.decode(expected[0, prompt.shape[1] :].tolist())
    print(f"\n{args.prompt}|{text}\n")
    print(table(rows))
    say(
        f"Times: this CPU, {n} new tokens after a {prompt.shape[1]}-token prompt, the cpu backend "
        f"over the emulated link above."
    )
    return 0 if all(r["identical_to_resident"] for r in rows) else 1
