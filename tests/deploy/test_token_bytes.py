"""The bytes of each token for chat logprobs (deploy/token_bytes.py): pieces of a character join back."""
from __future__ import annotations

from deploy.token_bytes import TokenBytes


def test_byte_level_pieces_join_into_the_text():
    from transformers import AutoTokenizer

    from dsla_model.loading import default_model_dir
    from tests.conftest import skip_without_default_model

    skip_without_default_model()
    tok = AutoTokenizer.from_pretrained(default_model_dir())
    text = "Hi 😀 世界, naïve café"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    pieces = TokenBytes(tok)(ids)
    assert any(bytes(p) != tok.decode([t]).encode() for p, t in zip(pieces, ids))  # split characters
    assert b"".join(bytes(p) for p in pieces) == text.encode()


class _SentencePiece:
    pieces = {1: "\u2581Hi", 2: "<0xF0>", 3: "<0x9F>", 4: "<0x98>", 5: "<0x80>", 6: "\u2581caf\u00e9"}

    def convert_ids_to_tokens(self, ids):
        return [self.pieces[i] for i in ids]

    def decode(self, ids, **kw):
        return "?"


def test_sentencepiece_spaces_and_byte_pieces():
    got = TokenBytes(_SentencePiece())([1, 2, 3, 4, 5, 6])
    assert b"".join(bytes(p) for p in got) == " Hi😀 café".encode()


class _DecodeOnly:
    def decode(self, ids, **kw):
        return "".join(chr(65 + i % 26) for i in ids)


def test_a_tokenizer_without_a_vocabulary_spelling_gives_each_tokens_text():
    assert TokenBytes(_DecodeOnly())([0, 1]) == [[65], [66]]
