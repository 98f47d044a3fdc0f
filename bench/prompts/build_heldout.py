"""Write bench/prompts/heldout.json: short prompts from the demo corpus's held-out split.

The demo model was trained on text cut into chunks by scripts/build_corpus.py, which holds out a
seeded 2% of each domain's chunks (``val_<domain>.txt``); none of these prompts was trained on.
Each prompt is the start of a chosen held-out chunk, cut at a word boundary as soon as it is at
least ``--min-tokens`` tokens long under the demo tokenizer. The chunks were chosen by eye for
ordinary prose (not a URL or a markup line); their indices are recorded with the text.

    python scripts/build_corpus.py --out /tmp/speq-data     # once, if it is not there
    python bench/prompts/build_heldout.py [--data /tmp/speq-data]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from speq.models import demo_model

SEP = "\n<|doc|>\n"  # scripts/build_corpus.py's chunk separator
CHOSEN = {"kjv": (0, 3), "fortunes": (1, 2), "python_docs": (1, 3), "perl_docs": (0, 3)}
OUT = Path(__file__).resolve().parent / "heldout.json"


def prefix(text: str, tokenizer, min_tokens: int) -> str:
    """The shortest whole-word prefix of ``text`` with at least ``min_tokens`` tokens."""
    words = text.split(" ")
    for n in range(1, len(words) + 1):
        head = " ".join(words[:n])
        if len(tokenizer.encode(head)) >= min_tokens:
            return head
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--data", default="/tmp/speq-data")
    ap.add_argument("--min-tokens", type=int, default=18)
    args = ap.parse_args()
    data = Path(args.data)
    _, tok = demo_model()
    manifest = json.loads((data / "manifest.json").read_text())
    prompts = []
    for domain, indices in CHOSEN.items():
        chunks = (data / f"val_{domain}.txt").read_text(encoding="utf-8").split(SEP)
        for i in indices:
            text = prefix(chunks[i], tok, args.min_tokens)
            prompts.append(
                {
                    "id": f"{domain}-{i}",
                    "domain": domain,
                    "text": text,
                    "tokens": len(tok.encode(text)),
                    "source": f"val_{domain}.txt chunk {i} (held out), its first {len(text)} characters",
                }
            )
    payload = {
        "about": "Prompts from the held-out (validation) split of the demo model's corpus; "
        "see bench/prompts/build_heldout.py",
        "corpus": {"builder": "scripts/build_corpus.py", "packages": manifest["packages"]},
        "licenses": {d: manifest["domains"][d]["license"] for d in CHOSEN},
        "prompts": prompts,
    }
    OUT.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n")
    for p in prompts:
        print(f"{p['id']:>14} {p['tokens']:>3} tokens  {p['text']!r}")


if __name__ == "__main__":
    main()
