"""Stream chunks and final bodies built from token events (deploy/openai_format.py), without Ray."""
from __future__ import annotations

import pytest

from deploy.openai_format import ResponseBuilder
from deploy.request_plan import Job, Plan


class _Letters:  # one letter per token
    def decode(self, ids, **kw):
        return "".join(chr(65 + i % 26) for i in ids)


def _events():
    # token 3's text is held back (a possible stop-string prefix, or part of a character)
    # and comes out with token 4's
    return [{"token_id": 3, "text": "", "logprob": -0.1, "finish_reason": None, "num_generated_tokens": 1},
            {"token_id": 4, "text": "DE", "logprob": -0.2, "finish_reason": None, "num_generated_tokens": 2},
            {"token_id": 5, "text": "F", "logprob": -0.3, "finish_reason": "length", "num_generated_tokens": 3}]


def _streamed_logprobs(kind):
    plan = Plan(kind, [Job(0, [1, 2], {"logprobs": True})], 2, True, False)
    b = ResponseBuilder(plan, "m", _Letters())
    chunks = [c for ev in _events() for c in b.add(0, ev)]
    final = b.final()["choices"][0]["logprobs"]
    lps = [c["choices"][0]["logprobs"] for c in chunks if c["choices"][0]["logprobs"]]
    return lps, final


@pytest.mark.parametrize("kind", ["completion", "chat"])
def test_streamed_logprobs_cover_every_token_also_held_back_ones(kind):
    lps, final = _streamed_logprobs(kind)
    if kind == "completion":
        streamed = [(t, lp) for x in lps for t, lp in zip(x["tokens"], x["token_logprobs"])]
        assert streamed == list(zip(final["tokens"], final["token_logprobs"]))
    else:
        streamed = [(e["token"], e["logprob"]) for x in lps for e in x["content"]]
        assert streamed == [(e["token"], e["logprob"]) for e in final["content"]]
    assert [t for t, _ in streamed] == ["D", "E", "F"]


def test_completion_logprobs_carry_text_offsets_and_top_logprobs_streamed_or_not():
    """Both were null: clients that index text_offset[i] or top_logprobs[i] failed."""
    lps, final = _streamed_logprobs("completion")
    assert final["text_offset"] == [0, 1, 2]
    assert final["top_logprobs"] == [{"D": -0.1}, {"E": -0.2}, {"F": -0.3}]
    assert [o for x in lps for o in x["text_offset"]] == final["text_offset"]
    assert [d for x in lps for d in x["top_logprobs"]] == final["top_logprobs"]


@pytest.mark.parametrize("kind", ["completion", "chat"])
def test_continuous_usage_puts_the_running_counts_in_every_chunk(kind):
    """vLLM's stream_options.continuous_usage_stats: each chunk's usage counts its choice's tokens so far."""
    plan = Plan(kind, [Job(0, [1, 2], {}), Job(1, [1, 2, 3], {})], 5, True, True, continuous_usage=True)
    b = ResponseBuilder(plan, "m", _Letters())
    chunks = [c for ev in _events() for c in b.add(0, ev)]
    chunks += [c for c in b.add(1, dict(_events()[1], num_generated_tokens=1))]
    got = [(c["choices"][0]["index"], c["usage"]["prompt_tokens"], c["usage"]["completion_tokens"],
            c["usage"]["total_tokens"]) for c in chunks]
    # the held-back token makes no chunk of its own; chat's role chunk comes before any token
    role = [(0, 2, 0, 2)] if kind == "chat" else []
    assert got == role + [(0, 2, 2, 4), (0, 2, 3, 5)] + ([(1, 3, 0, 3)] if kind == "chat" else []) + [(1, 3, 1, 4)]
    assert b.usage_chunk()["usage"] == {"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9}
    plain = ResponseBuilder(Plan(kind, [Job(0, [1, 2], {})], 2, True, True), "m", _Letters())
    assert not any("usage" in c for ev in _events() for c in plain.add(0, ev))
