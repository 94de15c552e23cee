"""Real English text for calibration, distillation and evaluation.

Source: the Python 3.11 documentation from Debian's `python3.11-doc` package
(HTML turned into plain text). Documents are split into train and validation
by a hash of their path, so the split never depends on file order or count.
"""
from __future__ import annotations

import hashlib
import html.parser
import json
import os
import re
from functools import lru_cache
from pathlib import Path

DOC_ROOT = Path(os.environ.get("DSLA_CORPUS_ROOT", "/usr/share/doc/python3.11/html"))
VALIDATION_PERCENT = 10
_SKIP_TAGS = {"script", "style", "head", "nav", "footer"}
_BLOCK_TAGS = {"p", "div", "pre", "li", "dt", "dd", "h1", "h2", "h3", "h4", "h5", "h6", "tr", "br", "section"}


class CorpusMissingError(RuntimeError):
    pass


class _TextExtractor(html.parser.HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skip = 0
        self.divs: list[bool] = []  # per open div: does it hide its content?

    def handle_starttag(self, tag, attrs):
        if tag in _SKIP_TAGS:
            self.skip += 1
        if tag == "div":
            # Sphinx's navigation bars and sidebars are chrome, not prose.
            cls = dict(attrs).get("class") or ""
            hides = "related" in cls or "sphinxsidebar" in cls
            self.divs.append(hides)
            self.skip += hides
        if tag in _BLOCK_TAGS:
            self.parts.append("\n")

    def handle_endtag(self, tag):
        if tag in _SKIP_TAGS and self.skip:
            self.skip -= 1
        if tag == "div" and self.divs:
            self.skip -= self.divs.pop()
        if tag in _BLOCK_TAGS:
            self.parts.append("\n")

    def handle_data(self, data):
        if not self.skip:
            self.parts.append(data)


def html_to_text(source: str) -> str:
    p = _TextExtractor()
    p.feed(source)
    text = "".join(p.parts).replace("\xb6", "")  # pilcrow permalinks
    lines = [re.sub(r"[ \t]+", " ", ln).strip() for ln in text.splitlines()]
    text = "\n".join(ln for ln in lines)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def _split_of(rel_path: str) -> str:
    h = int(hashlib.sha256(rel_path.encode()).hexdigest()[:8], 16)
    return "validation" if h % 100 < VALIDATION_PERCENT else "train"


def document_paths(root: Path = DOC_ROOT) -> list[Path]:
    if not root.is_dir():
        raise CorpusMissingError(
            f"{root} not found: install Debian's python3.11-doc (apt-get install python3.11-doc; `make corpus` does it)"
        )
    skip = {"genindex", "py-modindex", "search", "_static", "_sources", "_images", "_downloads"}
    paths = [p for p in sorted(root.rglob("*.html")) if not (set(p.relative_to(root).parts) & skip)
             and not p.name.startswith("genindex")]
    if not paths:
        raise CorpusMissingError(f"{root} holds no HTML documents")
    return paths


def _parse_all(base: Path) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {"train": [], "validation": []}
    for p in document_paths(base):
        text = html_to_text(p.read_text(encoding="utf-8", errors="replace"))
        if len(text) > 200:
            out[_split_of(str(p.relative_to(base)))].append(text)
    return out


@lru_cache(maxsize=4)
def _all_documents(root: str) -> dict[str, list[str]]:
    """Parsing the HTML takes ~20 s on a small machine: keep the text in the user cache,
    keyed by the documents' names and sizes so a changed package is parsed again."""
    from dsla_model.loading import cache_root, write_cached

    base = Path(root)
    key = hashlib.sha256("".join(f"{p}:{p.stat().st_size};" for p in document_paths(base)).encode()).hexdigest()[:16]
    path = cache_root() / "corpus" / f"{key}.json"
    try:
        docs = json.loads(path.read_text())
        if isinstance(docs, dict) and all(isinstance(docs.get(s), list) for s in ("train", "validation")):
            return docs
    except (OSError, ValueError):  # none yet, torn by a crash, or unreadable: parse again and write it
        pass
    docs = _parse_all(base)
    write_cached(path, docs, "corpus text")
    return docs


def documents(split: str, root: str = str(DOC_ROOT)) -> tuple[str, ...]:
    """Plain-text documents of one split ('train' or 'validation'), in path order."""
    if split not in ("train", "validation"):
        raise ValueError(f"unknown split {split!r}")
    return tuple(_all_documents(root)[split])


def token_blocks(tokenizer, split: str, block_size: int, max_blocks: int | None = None,
                 root: str = str(DOC_ROOT)) -> list[list[int]]:
    """Consecutive `block_size`-token blocks of the split's documents joined by EOS."""
    sep = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    blocks: list[list[int]] = []
    buf: list[int] = []
    for doc in documents(split, root):
        buf.extend(tokenizer(doc, add_special_tokens=False)["input_ids"] + sep)
        while len(buf) >= block_size:
            blocks.append(buf[:block_size])
            buf = buf[block_size:]
            if max_blocks is not None and len(blocks) >= max_blocks:
                return blocks
    return blocks


def calibration_prompts(tokenizer, n: int, length: int = 256, seed: int = 0) -> list[list[int]]:
    """`n` prompts of `length` tokens from the training split, spread over the documents."""
    import random

    docs = [d for d in documents("train") if len(d) > length * 6]
    rng = random.Random(seed)
    picks = rng.sample(range(len(docs)), min(n, len(docs)))
    prompts = []
    for i in picks:
        ids = tokenizer(docs[i], add_special_tokens=False)["input_ids"]
        start = rng.randrange(0, max(1, len(ids) - length))
        prompts.append(ids[start:start + length])
    return prompts


def stats(tokenizer=None) -> dict:
    out = {"root": str(DOC_ROOT)}
    for split in ("train", "validation"):
        docs = documents(split)
        out[split] = {"documents": len(docs), "characters": sum(len(d) for d in docs)}
        if tokenizer is not None:
            out[split]["tokens"] = sum(len(tokenizer(d, add_special_tokens=False)["input_ids"]) for d in docs)
    return out
