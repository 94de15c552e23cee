"""Errors the ingress (deploy/ingress.py) reports after its checks, without Ray: a stream that
fails after its 200, and /status while Serve restarts the controller."""
from __future__ import annotations

import asyncio
import json

import pytest

from deploy.config import AppConfig
from deploy.ingress import OpenAIIngress
from deploy.openai_format import ResponseBuilder
from deploy.openai_protocol import APIError
from deploy.request_plan import Job, Plan
from tests.deploy.test_response_format import _events, _Letters


def test_a_stream_that_fails_midway_reports_the_error_then_done():
    plan = Plan("completion", [Job(0, [1, 2], {})], 2, True, False)
    builder = ResponseBuilder(plan, "m", _Letters())

    async def events():
        yield 0, _events()[0] | {"text": "C"}
        raise ValueError("seed must be an integer")

    ingress = type("Ingress", (), {"_as_api_error": OpenAIIngress.func_or_class._as_api_error})()

    async def main():
        return [x async for x in OpenAIIngress.func_or_class._sse(ingress, builder, events(), [])]
    out = asyncio.run(main())
    assert out[-1] == "data: [DONE]\n\n"
    err = json.loads(out[-2][len("data: "):])["error"]
    assert err["type"] == "invalid_request_error" and "seed" in err["message"]
    assert json.loads(out[0][len("data: "):])["choices"][0]["text"] == "C"


def test_status_while_the_controller_restarts_is_a_503():
    from ray.exceptions import RayActorError

    class Gone:
        class snapshot:
            @staticmethod
            async def remote():
                raise RayActorError()

    ingress = type("Ingress", (), {"controller": Gone, "retry_after": "2", "cfg": AppConfig()})()
    with pytest.raises(APIError) as e:
        asyncio.run(OpenAIIngress.func_or_class.status(ingress))
    assert e.value.status == 503 and e.value.headers == {"Retry-After": "2"}


def test_status_answers_a_503_in_bounded_time_when_the_controller_does_not_answer():
    """Serve queues a call to a deployment with no live replica without a deadline: /status
    waited for ever (each such call holding an ingress slot) while the controller was down."""
    cancelled = []

    class Queued:
        def __init__(self):
            self.future = asyncio.get_running_loop().create_future()  # never resolves

        def __await__(self):
            return self.future.__await__()

        def cancel(self):
            cancelled.append(True)

    class Silent:
        class snapshot:
            @staticmethod
            def remote():
                return Queued()

    cfg = AppConfig.model_validate({"controller": {"poll_interval_s": 0.1, "report_timeout_s": 0.3}})
    ingress = type("Ingress", (), {"controller": Silent, "retry_after": "1", "cfg": cfg})()

    async def main():
        return await asyncio.wait_for(OpenAIIngress.func_or_class.status(ingress), 5.0)
    with pytest.raises(APIError) as e:
        asyncio.run(main())
    assert e.value.status == 503 and "no answer" in e.value.message and cancelled == [True]


def test_a_streamed_choice_refused_after_another_started_is_a_429_not_an_error_in_the_stream():
    from ray.serve.exceptions import BackPressureError

    plan = Plan("completion", [Job(0, [1, 2], {}), Job(1, [1, 2], {})], 2, True, False)

    async def merged(_plan):  # choice 0 starts; choice 1 is refused by a full fleet
        yield 0, _events()[0] | {"text": "C"}
        raise BackPressureError(num_queued_requests=8, max_queued_requests=8)

    ingress = type("Ingress", (), {"_merged": staticmethod(merged), "retry_after": "1", "limits": None,
                                   "tok": _Letters(),
                                   "_as_api_error": OpenAIIngress.func_or_class._as_api_error})()
    ingress.limits = type("Limits", (), {"model_name": "m"})()
    with pytest.raises(APIError) as e:
        asyncio.run(OpenAIIngress.func_or_class._serve(ingress, plan, None))
    assert e.value.status == 429 and e.value.headers == {"Retry-After": "1"}


def test_ingress_limit_is_the_engines_for_a_sliding_window_model(tmp_path):
    """A Mistral with a 128-token window and 512 positions: the engine serves 128 tokens, so the
    ingress (its /v1/models, its default max_tokens, its context_length_exceeded checks) must say
    128 too; it said 512 and let the engine refuse with a bare 400."""
    import transformers
    from transformers import AutoTokenizer

    from dsla_model.loading import resolve_model
    from tests.conftest import tiny_config

    tok = AutoTokenizer.from_pretrained(resolve_model("default"))
    cfg = tiny_config("mistral", layers=2, vocab=len(tok))
    cfg.sliding_window = 128
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    user_class = OpenAIIngress.func_or_class.__mro__[1]  # the class under Serve's ASGI wrapper

    def limit(config):
        ingress = object.__new__(user_class)
        user_class.__init__(ingress, config, None, None)
        return ingress.limits.max_model_len

    assert limit({"model": str(tmp_path)}) == 128
    assert limit({"model": str(tmp_path), "engine": {"max_model_len": 100}}) == 100
