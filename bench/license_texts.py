"""The texts the CPU quality benchmarks score: Debian's license files, real English present on
every Debian machine and outside the distillation corpus."""
from __future__ import annotations

import sys

TEXTS = ("/usr/share/common-licenses/GPL-3", "/usr/share/common-licenses/Apache-2.0")


def load_texts(tokenizer, tokens: int) -> list[tuple[str, list[int]]]:
    """(path, the first `tokens` token ids) of each text; exits with a message if one is shorter."""
    texts = []
    for path in TEXTS:
        ids = tokenizer(open(path, encoding="utf-8").read(), add_special_tokens=False)["input_ids"]
        if len(ids) < tokens:
            sys.exit(f"{path} holds {len(ids)} tokens, fewer than --tokens {tokens}")
        texts.append((path, ids[:tokens]))
    return texts
