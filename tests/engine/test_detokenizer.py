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


class _Pieces:
    """A tokenizer whose token i decodes to PIECES[i]; `sp` mimics SentencePiece, whose decode drops
    the leading space of the first piece."""
    PIECES = ["x", "a", "b", "c", "d", "xbycd", " w1", " w2", " w3", "hello", " there"]

    def __init__(self, sp=False):
        self.sp = sp

    def decode(self, ids, **kw):
        text = "".join(self.PIECES[i] for i in ids)
        return text.lstrip(" ") if self.sp else text


def _deltas(tok, prompt, gen, stop=(), **kw):
    d = IncrementalDetokenizer(tok, prompt, list(stop), **kw)
    out = []
    for t in gen:
        delta, hit = d.add(t)
        out.append(delta)
        if hit:
            return out, True
    rest, hit = d.flush()
    return out + [rest], hit


def test_a_stop_string_prefix_spread_over_tokens_is_held_back():
    x, a, b, c, d = range(5)
    out, hit = _deltas(_Pieces(), [x], [x, x, a, b, c, x], stop=["abc"])
    assert hit and out == ["x", "x", "", "", ""]  # "a", "ab" held until "abc" completes
    out, hit = _deltas(_Pieces(), [x], [x, a, b, d], stop=["abc"])
    assert not hit and "".join(out) == "xabd" and out[:3] == ["x", "", ""]


def test_held_back_text_comes_out_when_the_request_ends():
    x, a, b = 0, 1, 2
    out, hit = _deltas(_Pieces(), [x], [x, a, b], stop=["abc"])  # ends (length) on a stop's prefix
    assert not hit and out == ["x", "", "", "ab"]


def test_the_earliest_stop_string_ends_the_text():
    out, hit = _deltas(_Pieces(), [0], [5], stop=["cd", "b"])  # one token: "xbycd"
    assert hit and "".join(out) == "x"


def test_the_first_tokens_spacing_comes_from_the_prompt():
    """A SentencePiece-like decode drops the first piece's leading space: decoded alone, the first
    generated token would lose the space that separates it from the prompt."""
    tok = _Pieces(sp=True)
    prompt, gen = [9, 10], [6, 7, 8]  # "hello there" + " w1 w2 w3"
    out, _ = _deltas(tok, prompt, gen)
    assert "".join(out) == tok.decode(prompt + gen)[len(tok.decode(prompt)):] == " w1 w2 w3"


def test_a_resumed_stream_continues_after_what_the_earlier_attempt_emitted():
    """resumed tokens' text was handed out (all but the held-back stop prefix) by the earlier attempt:
    the new stream starts after it, and the held-back part comes out if no stop completes."""
    x, a, b, c, d = range(5)
    out, hit = _deltas(_Pieces(), [x], [d], stop=["abc"], resumed=[x, a, b], emitted=1)
    assert not hit and "".join(out) == "abd"
    out, hit = _deltas(_Pieces(), [x], [c], stop=["abc"], resumed=[x, a, b], emitted=1)
    assert hit and "".join(out) == ""
    out, _ = _deltas(_Pieces(), [x], [6], resumed=[9], emitted=5)
    assert "".join(out) == " w1"
