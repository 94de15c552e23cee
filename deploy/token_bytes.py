"""The bytes each token stands for: the `bytes` field of OpenAI chat logprobs.

Decoding a token alone gives U+FFFD for a piece of a multi-byte character, whose UTF-8
bytes say nothing about the piece; the field exists so that a client can join such
pieces back into characters. So the bytes come from the vocabulary's spelling of the
token: byte-level BPE (GPT-2, Llama 3, SmolLM2) writes every byte as one printable
character; SentencePiece writes a space as U+2581 and a byte it has no piece for as
<0xNN>.
"""
from __future__ import annotations

import functools
import re

_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@functools.lru_cache(maxsize=1)
def _byte_level_chars() -> dict[str, int]:
    """Byte-level BPE's alphabet: printable Latin-1 bytes stand for themselves, the other
    bytes, in order, for the characters from U+0100 on."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    chars = {chr(b): b for b in printable}
    others = [b for b in range(256) if b not in set(printable)]
    chars.update({chr(0x100 + i): b for i, b in enumerate(others)})
    return chars


class TokenBytes:
    def __init__(self, tok):
        self.tok = tok
        decoder = getattr(getattr(tok, "backend_tokenizer", None), "decoder", None)
        # the repr names nested decoders too (a Sequence holding a ByteLevel)
        self.byte_level = decoder is not None and "ByteLevel(" in repr(decoder)

    def __call__(self, ids: list[int]) -> list[list[int]]:
        convert = getattr(self.tok, "convert_ids_to_tokens", None)
        pieces = convert(list(ids)) if convert is not None else [None] * len(ids)
        return [self._one(t, p) for t, p in zip(ids, pieces)]

    def _one(self, token_id: int, piece) -> list[int]:
        if isinstance(piece, str):
            if self.byte_level:
                chars = _byte_level_chars()
                if all(c in chars for c in piece):
                    return [chars[c] for c in piece]
            else:
                m = _BYTE_PIECE.fullmatch(piece)
                if m:
                    return [int(m.group(1), 16)]
                return list(piece.replace("\u2581", " ").encode())
        return list(self.tok.decode([token_id]).encode())  # no spelling to read: its text
