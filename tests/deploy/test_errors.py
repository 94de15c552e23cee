"""Bad input gets a 4xx with an OpenAI error body, and the server goes on serving."""
from __future__ import annotations

import httpx
import openai
import pytest

from tests.deploy.conftest import MODEL_NAME

GOOD = {"model": MODEL_NAME, "prompt": "hello", "max_tokens": 2}
CHAT = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


def post(server, path, body=None, raw=None):
    kw = {"content": raw, "headers": {"content-type": "application/json"}} if raw is not None else {"json": body}
    return httpx.post(server["base"] + path, timeout=60, **kw)


def assert_openai_error(r, status, param=None):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    if param is not None:
        assert err["param"] == param, err


@pytest.mark.parametrize("path,raw", [
    ("/v1/completions", b'{"model": "tiny-test", "prompt": '),
    ("/v1/completions", b"not json at all"),
    ("/v1/chat/completions", b'{"model": "tiny-test", "messages": [}'),
    ("/v1/completions", b"[1, 2, 3]"),
])
def test_malformed_json(server, path, raw):
    assert_openai_error(post(server, path, raw=raw), 400)


@pytest.mark.parametrize("path,body,param", [
    ("/v1/completions", {"prompt": "x"}, "model"),
    ("/v1/completions", {"model": MODEL_NAME}, "prompt"),
    ("/v1/chat/completions", {"model": MODEL_NAME}, "messages"),
    ("/v1/chat/completions", {**CHAT, "messages": []}, "messages"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "wizard", "content": "x"}]}, "messages"),
    ("/v1/completions", {**GOOD, "max_tokens": "5"}, "max_tokens"),
    ("/v1/completions", {**GOOD, "max_tokens": 2.5}, "max_tokens"),
    ("/v1/completions", {**GOOD, "temperature": "hot"}, "temperature"),
    ("/v1/completions", {**GOOD, "temperature": 3.0}, "temperature"),
    ("/v1/completions", {**GOOD, "top_p": 0}, "top_p"),
    ("/v1/completions", {**GOOD, "n": 0}, "n"),
    ("/v1/completions", {**GOOD, "stream": "yes"}, "stream"),
    ("/v1/completions", {**GOOD, "prompt": 42}, "prompt"),
    ("/v1/completions", {**GOOD, "prompt": ""}, "prompt"),
    ("/v1/completions", {**GOOD, "prompt": [10**9]}, "prompt"),
    ("/v1/completions", {**GOOD, "stop": ""}, "stop"),
    ("/v1/completions", {**GOOD, "max_tokens": 0}, "max_tokens"),
    ("/v1/completions", {**GOOD, "max_tokens": -3}, "max_tokens"),
    ("/v1/completions", {**GOOD, "max_tokens": 257}, "max_tokens"),  # the server's limit is 256
    ("/v1/chat/completions", {**CHAT, "max_tokens": 0}, "max_tokens"),
    ("/v1/chat/completions", {**CHAT, "max_completion_tokens": 100000}, "max_completion_tokens"),
    ("/v1/completions", {**GOOD, "n": 5}, "n"),  # the server allows 4 choices
    ("/v1/completions", {**GOOD, "prompt": ["a", "b", "c"], "n": 2}, "n"),
    ("/v1/chat/completions", {**CHAT, "n": 9}, "n"),
    ("/v1/completions", {**GOOD, "frequency_penalty": 1.0}, "frequency_penalty"),
    ("/v1/chat/completions", {**CHAT, "tools": [{"type": "function"}]}, "tools"),
    ("/v1/completions", {**GOOD, "stream_options": {"include_usage": True}}, "stream_options"),  # not streaming
    ("/v1/completions", {**GOOD, "stop_token_ids": [5, -1]}, "stop_token_ids"),
    ("/v1/completions", {**GOOD, "seed": 2**63}, "seed"),  # seeds are int64, as in vLLM
    ("/v1/chat/completions", {**CHAT, "seed": -2**63 - 1}, "seed"),
])
def test_bad_fields(server, path, body, param):
    assert_openai_error(post(server, path, body), 400, param)


def test_prompt_longer_than_the_context(server):
    long = " ".join(["word"] * 700)  # the tiny model's context is 512 tokens
    r = post(server, "/v1/completions", {**GOOD, "prompt": long})
    assert_openai_error(r, 400, "prompt")
    assert r.json()["error"]["code"] == "context_length_exceeded"
    r = post(server, "/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": long}]})
    assert_openai_error(r, 400, "messages")
    # fits alone, but not with the completion asked for
    r = post(server, "/v1/completions", {**GOOD, "prompt": [5] * 400, "max_tokens": 200})
    assert_openai_error(r, 400, "max_tokens")


def test_unknown_model(server, client):
    assert_openai_error(post(server, "/v1/completions", {**GOOD, "model": "gpt-99"}), 404, "model")
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-99", messages=[{"role": "user", "content": "x"}])


def test_unknown_model_card(client):
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-99")


def test_unknown_route_and_method(server):
    assert_openai_error(httpx.get(server["base"] + "/v1/nothing-here"), 404)
    r = httpx.get(server["base"] + "/v1/completions")
    assert_openai_error(r, 405)
    assert r.headers.get("allow") == "POST"  # RFC 9110: a 405 names the methods the route takes


def test_client_sees_bad_request(client):
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL_NAME, prompt="x", max_tokens=0)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL_NAME, prompt="x", n=20)


def test_still_serving_after_bad_input(server, client):
    for raw in (b"{", b'{"model": 1}', b"\xff\xfe"):
        post(server, "/v1/completions", raw=raw)
    r = client.completions.create(model=MODEL_NAME, prompt="still here?", max_tokens=3,
                                  extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 3
    r = client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "ok?"}], max_tokens=2,
                                       extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 2


def test_streaming_request_with_bad_input_is_refused_before_the_stream(server):
    r = post(server, "/v1/completions", {**GOOD, "stream": True, "max_tokens": 0})
    assert_openai_error(r, 400, "max_tokens")


@pytest.mark.parametrize("seed", [-1, 2**63 - 1])
def test_seeds_across_the_int64_range_sample_and_repeat(server, seed):
    # n choices get seeds seed, seed + 1, ...: at the ends of the range they must neither be
    # refused by the replica nor overflow its generator inside a stream that already answered 200
    body = {**GOOD, "max_tokens": 4, "n": 2, "temperature": 1.0, "seed": seed, "ignore_eos": True}
    a, b = post(server, "/v1/completions", body), post(server, "/v1/completions", body)
    assert a.status_code == 200 and b.status_code == 200, a.text
    assert [c["text"] for c in a.json()["choices"]] == [c["text"] for c in b.json()["choices"]]
    stream = post(server, "/v1/completions", {**body, "stream": True})
    assert stream.status_code == 200 and '"error"' not in stream.text and stream.text.rstrip().endswith("[DONE]")


@pytest.mark.parametrize("body,code", [({**GOOD, "n": 0}, "invalid_value"), ({**GOOD, "max_tokens": "5"}, "invalid_type"),
                                       ({"prompt": "x"}, "missing_required_parameter")])
def test_error_codes_say_what_kind_of_problem(server, body, code):
    r = post(server, "/v1/completions", body)
    assert r.status_code == 400 and r.json()["error"]["code"] == code, r.text
