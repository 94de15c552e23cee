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
