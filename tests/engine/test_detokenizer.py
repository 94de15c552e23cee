"""Incremental detokenization against the real tokenizer's full decode, incomplete characters included."""
import random

import pytest

from dsla_model.engine.detokenizer import IncrementalDetokenizer
from tests.conftest import skip_without_default_model

TEXTS = ["héllo wörld ", "日本語のテキスト", "emoji 😀🎉 ok", "plain ascii text. ", "ça va? ", "Ωμέγα"]


@pytest.fixture(scope="module")
def tok():
    from dsla_model.loading import default_model_dir
    from transformers import AutoTokenizer

    skip_without_default_model()
    return AutoTokenizer.from_pretrained(default_model_dir())


def _decode(tok, ids):
    return tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def _stream(tok, prompt, gen, stop=()):
    d = IncrementalDetokenizer(tok, prompt, list(stop))
    out, hit = "", False
    for t in gen:
        delta, hit = d.add(t)
        out += delta
        if hit:
            return out, True
    rest, hit = d.flush()
    return out + rest, hit


def _partial_tokens(tok):
    """Tokens whose bytes are not whole characters on their own (they decode with U+FFFD)."""
    return [i for i in range(len(tok)) if "\ufffd" in _decode(tok, [i])]


def test_last_token_with_an_incomplete_character_keeps_what_it_completes(tok):
    # a token holding a whole character followed by the first bytes of another: the stream
    # used to hold it back for the next token and drop it at the end (the character was lost)
    mixed = next(i for i in _partial_tokens(tok) if _decode(tok, [i]).rstrip("\ufffd") not in ("", " "))
    prompt, gen = tok.encode("The answer is"), tok.encode(" plain") + [mixed]
    out, hit = _stream(tok, prompt, gen)
    assert not hit and out == _decode(tok, gen) and _decode(tok, [mixed]).rstrip("\ufffd") in out


def test_stream_equals_full_decode_with_incomplete_characters(tok):
    rng = random.Random(0)
    partial = _partial_tokens(tok)
    for _ in range(150):
        prompt = tok.encode(rng.choice(TEXTS))
        gen = tok.encode("".join(rng.choice(TEXTS) for _ in range(3)))
        gen = [rng.choice(partial) if rng.random() < 0.3 else t for t in gen]
        out, _ = _stream(tok, prompt, gen)
        assert out == _decode(tok, gen)


def test_stop_string_completed_by_the_final_flush_is_not_emitted(tok):
    mixed = next(i for i in _partial_tokens(tok) if _decode(tok, [i]).rstrip("\ufffd").strip())
    whole = _decode(tok, [mixed]).rstrip("\ufffd")
    gen = tok.encode(" one two") + [mixed]
    out, _ = _stream(tok, tok.encode("Count:"), gen, stop=[whole])
    assert out == _decode(tok, gen)[:_decode(tok, gen).index(whole)] and whole not in out
