"""Build the demo model's text corpus from Debian packages (reproducible, nothing committed).

Downloads (``apt-get download``, no root install) and unpacks:

* ``bible-kjv-text`` + ``bible-kjv``: the King James Bible (public domain), decoded by the
  package's own ``bible`` program, one chapter per document;
* ``fortunes``, ``fortunes-min``: the BSD fortune databases (not the offensive set), one fortune
  per document;
* ``python3.11-doc``: the Python documentation's reStructuredText sources (``_sources/*.rst.txt``,
  PSF licence);
* ``perl-doc``: the core Perl POD documentation (GPL-1+ or Artistic), markup stripped crudely.

Each domain's documents are cut into chunks of about ``--chunk`` characters; a seeded 2% of the
chunks of every domain is held out for validation. Writes into ``--out`` (default
``/tmp/speq-data``): ``train.txt``, ``val.txt``, ``val_<domain>.txt`` (chunks separated by a
NUL-free marker line, see ``SEP``) and ``manifest.json`` (package versions, sizes).

    python scripts/build_corpus.py --out /tmp/speq-data
"""

from __future__ import annotations

import argparse
import json
import random
import re
import subprocess
from pathlib import Path

PACKAGES = ("bible-kjv-text", "bible-kjv", "fortunes", "fortunes-min", "python3.11-doc", "perl-doc")
LICENSES = {
    "kjv": "public domain (King James Version, 1611); Debian package bible-kjv-text",
    "fortunes": "BSD fortune databases (BSD-3-Clause packaging; quotations of mixed provenance)",
    "python_docs": "Python Software Foundation License 2.0 (Python 3.11 documentation sources)",
    "perl_docs": "Perl documentation, GPL-1.0+ or Artistic License",
}
SEP = "\n<|doc|>\n"  # chunk separator inside the text files; the tokenizer treats it specially
HOLDOUT = 0.02


def sh(cmd: list[str], cwd: Path | None = None) -> str:
    return subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, text=True).stdout


def fetch(work: Path) -> dict[str, str]:
    """Download and unpack the packages into ``work/x_<name>``; return name -> version."""
    work.mkdir(parents=True, exist_ok=True)
    versions = {}
    for pkg in PACKAGES:
        if not list(work.glob(f"{pkg}_*.deb")):
            sh(["apt-get", "download", pkg], cwd=work)
        deb = sorted(work.glob(f"{pkg}_*.deb"))[0]
        versions[pkg] = sh(["dpkg-deb", "-f", str(deb), "Version"]).strip()
        dest = work / f"x_{pkg}"
        if not dest.exists():
            sh(["dpkg", "-x", str(deb), str(dest)])
    return versions


def kjv(work: Path) -> list[str]:
    exe = work / "x_bible-kjv/usr/bin/bible"
    data = work / "x_bible-kjv-text/usr/lib"
    out = sh([str(exe), "-p", str(data), "-f", "Gen1:1-Rev22:21"])
    chapters: dict[str, list[str]] = {}
    for line in out.splitlines():
        m = re.match(r"^(\d?[A-Za-z]+)(\d+):(\d+) (.*)$", line)
        if m:
            chapters.setdefault(f"{m[1]} {m[2]}", []).append(f"{m[3]} {m[4].strip()}")
        elif line.strip() and chapters:
            last = next(reversed(chapters))
            chapters[last][-1] += " " + line.strip()
    return [f"{name}\n" + "\n".join(verses) for name, verses in chapters.items()]


def fortunes(work: Path) -> list[str]:
    docs = []
    for pkg in ("fortunes", "fortunes-min"):
        folder = work / f"x_{pkg}/usr/share/games/fortunes"
        for f in sorted(folder.iterdir()):
            if f.suffix in (".dat", ".u8") or not f.is_file() or f.is_symlink():
                continue
            text = f.read_text(encoding="utf-8", errors="replace")
            docs += [d.strip("\n") for d in re.split(r"^%$", text, flags=re.M) if d.strip()]
    return docs


def python_docs(work: Path) -> list[str]:
    root = work / "x_python3.11-doc/usr/share/doc/python3.11/html/_sources"
    docs = []
    for f in sorted(root.rglob("*.rst.txt")):
        text = f.read_text(encoding="utf-8", errors="replace")
        text = re.sub(
            r"^\.\. (index|highlight|sectionauthor|moduleauthor)::.*$", "", text, flags=re.M
        )
        docs.append(re.sub(r"\n{3,}", "\n\n", text).strip())
    return docs


def _pod_inline(text: str) -> str:
    text = re.sub(r"[A-Z]<<+\s+(.*?)\s+>>+", r"\1", text, flags=re.S)
    for _ in range(3):  # nested codes, innermost first
        text = re.sub(r"[BCFISLEZX]<([^<>]*)>", lambda m: _pod_code(m), text)
    return text


def _pod_code(m: re.Match) -> str:
    code, body = m[0][0], m[1]
    if code in "XZ":
        return ""
    if code == "E":
        return {"lt": "<", "gt": ">", "verbar": "|", "sol": "/"}.get(body, "")
    if code == "L":
        return body.split("|")[0]
    return body


def perl_docs(work: Path) -> list[str]:
    root = work / "x_perl-doc/usr/share/perl"
    docs = []
    for f in sorted(root.rglob("*.pod")):
        lines = []
        for line in f.read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("="):
                m = re.match(r"^=(head\d|item)\s+(.*)$", line)
                if m:
                    lines.append(m[2])
                continue
            lines.append(line)
        text = _pod_inline("\n".join(lines))
        docs.append(re.sub(r"\n{3,}", "\n\n", text).strip())
    return docs


def chunk(doc: str, size: int) -> list[str]:
    """Cut a document at paragraph boundaries into pieces of about ``size`` characters."""
    if len(doc) <= size:
        return [doc]
    out, cur = [], ""
    for para in doc.split("\n\n"):
        if cur and len(cur) + len(para) > size:
            out.append(cur)
            cur = ""
        cur = f"{cur}\n\n{para}" if cur else para
    if cur:
        out.append(cur)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", default="/tmp/speq-data")
    ap.add_argument("--chunk", type=int, default=4000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    out = Path(args.out)
    work = out / "packages"
    versions = fetch(work)
    domains = {
        "kjv": kjv(work),
        "fortunes": fortunes(work),
        "python_docs": python_docs(work),
        "perl_docs": perl_docs(work),
    }
    rng = random.Random(args.seed)
    train, val, stats = [], [], {}
    for name, docs in domains.items():
        pieces = [p for d in docs for p in chunk(d.replace("<|doc|>", ""), args.chunk) if p.strip()]
        order = list(range(len(pieces)))
        rng.shuffle(order)
        n_val = max(1, round(HOLDOUT * len(pieces)))
        held = set(order[:n_val])
        dv = [pieces[i] for i in sorted(held)]
        dt = [pieces[i] for i in range(len(pieces)) if i not in held]
        (out / f"val_{name}.txt").write_text(SEP.join(dv), encoding="utf-8")
        train += [(name, p) for p in dt]
        val += dv
        stats[name] = {
            "documents": len(docs),
            "chunks_train": len(dt),
            "chunks_val": len(dv),
            "chars_train": sum(map(len, dt)),
            "chars_val": sum(map(len, dv)),
            "license": LICENSES[name],
        }
    rng.shuffle(train)
    (out / "train.txt").write_text(SEP.join(p for _, p in train), encoding="utf-8")
    (out / "val.txt").write_text(SEP.join(val), encoding="utf-8")
    manifest = {"packages": versions, "domains": stats, "holdout": HOLDOUT, "seed": args.seed}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(json.dumps(manifest, indent=2))


if __name__ == "__main__":
    main()
