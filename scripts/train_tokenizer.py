"""Train the demo model's byte-level BPE tokenizer and tokenize the corpus.

Reads ``train.txt`` / ``val*.txt`` written by ``build_corpus.py``; trains a ``tokenizers``
ByteLevel BPE of ``--vocab`` ids (id 0 is the special ``<|endoftext|>``, which separates
documents) on the training text only; writes ``tokenizer.json`` to ``--out`` and to the data
folder, and the token streams ``train.npy`` / ``val.npy`` / ``val_<domain>.npy`` (uint16, documents
joined by ``<|endoftext|>``) into the data folder.

    python scripts/train_tokenizer.py --data /tmp/speq-data --out speq/models/checkpoints/demo-moe
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

SEP = "\n<|doc|>\n"
EOT = "<|endoftext|>"


def train(texts: list[str], vocab: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        min_frequency=2,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return tok


def encode_stream(tok: Tokenizer, docs: list[str]) -> np.ndarray:
    eot = tok.token_to_id(EOT)
    ids: list[int] = []
    for enc in tok.encode_batch(docs):
        ids += enc.ids
        ids.append(eot)
    return np.asarray(ids, dtype=np.uint16)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--data", default="/tmp/speq-data")
    ap.add_argument("--out", default="speq/models/checkpoints/demo-moe")
    ap.add_argument("--vocab", type=int, default=4096)
    args = ap.parse_args()
    data = Path(args.data)
    train_docs = (data / "train.txt").read_text(encoding="utf-8").split(SEP)
    tok = train(train_docs, args.vocab)
    assert tok.token_to_id(EOT) == 0 and tok.get_vocab_size() == args.vocab
    Path(args.out).mkdir(parents=True, exist_ok=True)
    tok.save(str(Path(args.out) / "tokenizer.json"))
    tok.save(str(data / "tokenizer.json"))
    sizes = {}
    for f in sorted(data.glob("*.txt")):
        docs = f.read_text(encoding="utf-8").split(SEP)
        arr = encode_stream(tok, docs)
        np.save(data / f"{f.stem}.npy", arr)
        chars = sum(map(len, docs))
        sizes[f.stem] = {"tokens": int(arr.size), "chars_per_token": round(chars / arr.size, 3)}
    (data / "tokens.json").write_text(json.dumps(sizes, indent=2) + "\n")
    print(json.dumps(sizes, indent=2))


if __name__ == "__main__":
    main()
