"""How requests become engine jobs (deploy/request_plan.py), without Ray: prompt tokens and max_tokens."""
from __future__ import annotations

import pytest

from deploy.openai_protocol import APIError, CompletionRequest
from deploy.request_plan import Limits, plan_completion


@pytest.fixture(scope="module")
def bos_tok():
    """The default model's tokenizer made to add a BOS, as Llama's and Mistral's do."""
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer

    from dsla_model.loading import default_model_dir
    from tests.conftest import skip_without_default_model

    skip_without_default_model()
    tok = AutoTokenizer.from_pretrained(default_model_dir())
    tok.backend_tokenizer.post_processor = TemplateProcessing(single="<|endoftext|> $A",
                                                              special_tokens=[("<|endoftext|>", 0)])
    return tok


def _limits(tok, max_model_len=512, max_tokens_limit=256):
    return Limits("m", len(tok), max_model_len, max_tokens_limit, 256, 4)


def _req(**kw):
    return CompletionRequest.model_validate({"model": "m", **kw})


def test_a_text_prompt_gets_the_tokenizers_bos_unless_asked_not_to(bos_tok):
    plain = bos_tok("Once upon", add_special_tokens=False)["input_ids"]
    jobs = plan_completion(_req(prompt="Once upon"), bos_tok, _limits(bos_tok)).jobs
    assert jobs[0].prompt_ids == [0] + plain
    jobs = plan_completion(_req(prompt="Once upon", add_special_tokens=False), bos_tok, _limits(bos_tok)).jobs
    assert jobs[0].prompt_ids == plain
    ids = plan_completion(_req(prompt=plain), bos_tok, _limits(bos_tok)).jobs[0].prompt_ids
    assert ids == plain  # token ids are taken as given


def test_omitted_max_tokens_is_16_clamped_to_the_room_and_the_servers_limit(bos_tok):
    lim = _limits(bos_tok, max_tokens_limit=8)
    assert plan_completion(_req(prompt="hello"), bos_tok, lim).jobs[0].params["max_tokens"] == 8
    assert plan_completion(_req(prompt="hello"), bos_tok, _limits(bos_tok)).jobs[0].params["max_tokens"] == 16
    long = list(range(5, 505))
    assert plan_completion(_req(prompt=long), bos_tok, _limits(bos_tok)).jobs[0].params["max_tokens"] == 12
    with pytest.raises(APIError) as e:  # asked for explicitly, the limit is an error
        plan_completion(_req(prompt="hello", max_tokens=9), bos_tok, lim)
    assert e.value.status == 400 and e.value.param == "max_tokens"


def test_a_messages_text_parts_are_joined_by_newlines_as_vllm_does():
    from deploy.openai_protocol import ChatMessage

    msg = ChatMessage.model_validate({"role": "user", "content": [{"type": "text", "text": "Name a colour."},
                                                                  {"type": "text", "text": "One word."}]})
    assert msg.text() == "Name a colour.\nOne word."
    assert ChatMessage.model_validate({"role": "user", "content": "plain"}).text() == "plain"
    assert ChatMessage.model_validate({"role": "assistant"}).text() == ""


def test_plans_are_made_off_the_event_loop():
    """Tokenizing a multi-megabyte prompt took ~2 s on the ingress' event loop, stalling every
    other stream it served; plans are made on a worker thread while the loop goes on."""
    import asyncio
    import threading
    import time

    from deploy.ingress import off_loop

    def slow_plan():
        time.sleep(0.3)
        return threading.current_thread()

    async def main():
        ticks = []

        async def ticker():
            while True:
                await asyncio.sleep(0.01)
                ticks.append(1)

        t = asyncio.create_task(ticker())
        worker = await off_loop(slow_plan)
        t.cancel()
        return worker, len(ticks)

    worker, ticks = asyncio.run(main())
    assert worker is not threading.main_thread() and ticks >= 3


@pytest.mark.parametrize("field,value", [("min_p", 0.1), ("repetition_penalty", 1.2), ("min_tokens", 4),
                                         ("include_stop_str_in_output", True), ("guided_json", {"type": "object"}),
                                         ("use_beam_search", True), ("bad_words", ["x"])])
def test_vllm_extensions_we_do_not_implement_are_refused_unless_neutral(field, value):
    """They used to be dropped silently: a 200 with an answer they never constrained."""
    from deploy.openai_protocol import ChatCompletionRequest

    body = {"model": "m", "prompt": "hi"}
    assert CompletionRequest.model_validate({**body, field: value}).unsupported()[0] == field
    chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    assert ChatCompletionRequest.model_validate({**chat, field: value}).unsupported()[0] == field
    neutral = {"min_p": 0, "repetition_penalty": 1.0, "min_tokens": 0, "include_stop_str_in_output": False,
               "guided_json": None, "use_beam_search": False, "bad_words": []}[field]
    assert CompletionRequest.model_validate({**body, field: neutral}).unsupported() is None
    assert CompletionRequest.model_validate({**body, "some_sdk_field": 3}).unsupported() is None


@pytest.mark.parametrize("field,value", [("echo", True), ("continue_final_message", True),
                                         ("add_generation_prompt", False), ("chat_template", "{{ 'x' }}"),
                                         ("skip_special_tokens", False), ("add_special_tokens", True)])
def test_vllm_chat_extensions_we_do_not_implement_are_refused_unless_neutral(field, value):
    """A chat request with echo or continue_final_message got a 200 answering a new turn instead."""
    from deploy.openai_protocol import ChatCompletionRequest

    chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    assert ChatCompletionRequest.model_validate({**chat, field: value}).unsupported()[0] == field
    neutral = {"echo": False, "continue_final_message": False, "add_generation_prompt": True, "chat_template": None,
               "skip_special_tokens": True, "add_special_tokens": False}[field]
    assert ChatCompletionRequest.model_validate({**chat, field: neutral}).unsupported() is None
    # completions' own echo field keeps its own message
    assert CompletionRequest.model_validate({"model": "m", "prompt": "hi", "echo": True}).unsupported()[0] == "echo"


def test_legacy_function_calling_is_refused_like_tools():
    from deploy.openai_protocol import ChatCompletionRequest

    chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    fn = [{"name": "f", "parameters": {"type": "object"}}]
    assert ChatCompletionRequest.model_validate({**chat, "functions": fn}).unsupported()[0] == "functions"
    assert ChatCompletionRequest.model_validate({**chat, "function_call": "auto"}).unsupported()[0] == "function_call"
    assert ChatCompletionRequest.model_validate({**chat, "function_call": "none"}).unsupported() is None


@pytest.mark.parametrize("so,usage,continuous", [
    (None, False, False),  # no stream_options: no usage chunk (OpenAI's and vLLM's default)
    ({}, True, False),  # given, include_usage defaults to true in vLLM's StreamOptions
    ({"include_usage": None}, False, False),
    ({"include_usage": True, "continuous_usage_stats": True}, True, True),
    ({"continuous_usage_stats": True}, True, True),
    ({"include_usage": False, "continuous_usage_stats": True}, False, False)])
def test_stream_options_resolve_as_in_vllm(bos_tok, so, usage, continuous):
    """stream_options without include_usage streamed no usage, where vLLM (include_usage: True by
    default) streams it; and continuous usage needs include_usage."""
    extra = {} if so is None else {"stream_options": so}
    plan = plan_completion(_req(prompt="hi", stream=True, **extra), bos_tok, _limits(bos_tok))
    assert (plan.include_usage, plan.continuous_usage) == (usage, continuous)


def test_the_choices_cap_is_checked_before_any_prompt_is_tokenized():
    """40,000 prompts were tokenized (seconds on the ingress's one planning thread) before the 400."""
    class NoTok:
        def __call__(self, *a, **kw):
            raise AssertionError("tokenized before the choices cap was checked")

    lim = Limits("m", 1000, 512, 256, 256, 8)
    with pytest.raises(APIError) as e:
        plan_completion(_req(prompt=["word"] * 9), NoTok(), lim)
    assert e.value.status == 400 and e.value.param == "n"
    with pytest.raises(APIError) as e:
        plan_completion(_req(prompt=[[1, 2]] * 3, n=3), NoTok(), lim)
    assert e.value.param == "n"
    assert len(plan_completion(_req(prompt=[[1, 2]] * 2, n=4), NoTok(), lim).jobs) == 8


def test_chat_template_kwargs_reach_the_template_and_may_not_override_the_call():
    """vLLM's chat_template_kwargs were dropped silently; a template variable now changes the prompt."""
    from transformers import AutoTokenizer

    from deploy.openai_protocol import ChatCompletionRequest
    from deploy.request_plan import chat_prompt
    from dsla_model.loading import default_model_dir
    from tests.conftest import skip_without_default_model

    skip_without_default_model()
    tok = AutoTokenizer.from_pretrained(default_model_dir())
    tok.chat_template = ("{% for m in messages %}{{ m['content'] }}{% endfor %}"
                         "{% if shout is defined and shout %}!!{% endif %}")
    chat = {"model": "m", "messages": [{"role": "user", "content": "hello"}]}
    plain = chat_prompt(ChatCompletionRequest.model_validate(chat), tok)
    loud = chat_prompt(ChatCompletionRequest.model_validate({**chat, "chat_template_kwargs": {"shout": True}}), tok)
    assert tok.decode(plain) == "hello" and tok.decode(loud) == "hello!!"
    bad = ChatCompletionRequest.model_validate({**chat, "chat_template_kwargs": {"tokenize": True, "x": 1}})
    assert bad.unsupported() == ("chat_template_kwargs", "chat_template_kwargs may not set tokenize")
    with pytest.raises(Exception):  # not an object: refused by the schema (a 400 at the ingress)
        ChatCompletionRequest.model_validate({**chat, "chat_template_kwargs": ["shout"]})


@pytest.mark.parametrize("field,value,neutral", [
    ("response_format", {"type": "json_object"}, {"type": "text"}),
    ("return_tokens_as_token_ids", True, False), ("priority", 5, 0), ("logits_processors", ["x"], None),
    ("vllm_xargs", {"a": 1}, None), ("structural_tag", "{}", None), ("prompt_embeds", "abc", None)])
def test_vllm_fields_that_change_the_answer_are_refused_on_completions_and_chat(field, value, neutral):
    """These reached a 200 that ignored them (a JSON response_format on completions got plain text)."""
    from deploy.openai_protocol import ChatCompletionRequest

    body = {"model": "m", "prompt": "hi"}
    chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    for cls, b in ((CompletionRequest, body), (ChatCompletionRequest, chat)):
        assert cls.model_validate({**b, field: value}).unsupported()[0] == field
        assert cls.model_validate({**b, field: neutral}).unsupported() is None
