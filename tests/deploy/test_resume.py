"""A stream that resumes on another replica (deploy/ingress.py `_job_stream`) gives the client
the text and finish it gets from one replica: text the lost replica held back as a possible
stop-string prefix comes out, and a stop string that spans the two replicas stops the stream.
The replicas here are the real engine behind a fake Serve handle (no Ray); the first one is
lost after a given number of events."""
import asyncio

import torch

from deploy.ingress import OpenAIIngress
from deploy.replica import _event
from deploy.request_plan import Job
from dsla_model.engine import Engine, EngineConfig, SamplingParams
from tests.engine.conftest import tiny_hybrid


class _Letters:  # one letter per token: text positions are token positions
    eos_token_id = None

    def decode(self, ids, **kw):
        return "".join(chr(65 + i % 26) for i in ids)


class _Handle:
    """What `_job_stream` calls on its Serve handle: `llm.options(...).generate.remote(...)`."""

    def options(self, **kw):
        return self

    @property
    def generate(self):
        return self


class _Replicas(_Handle):
    """`llm` for `_job_stream`: each call a fresh engine; the first one is lost after `lose_after` events."""

    def __init__(self, h, lose_after):
        self.h, self.lose_after, self.calls = h, lose_after, []

    def remote(self, prompt_ids, params, request_id):
        self.calls.append((list(prompt_ids), dict(params)))
        lose = self.lose_after if len(self.calls) == 1 else None

        async def events():
            eng = Engine(self.h, _Letters(), EngineConfig(cache_memory_bytes=4 << 20))
            eng.add_request(prompt_ids, SamplingParams(**params))
            n = 0
            while eng.has_unfinished():
                for ev in eng.step():
                    yield [_event(ev)]
                    n += 1
                    if n == lose:
                        yield [{"token_id": None, "text": "", "logprob": None, "finish_reason": "abort",
                                "num_prompt_tokens": 0, "num_generated_tokens": 0}]
                        return

        class Stream:
            def __init__(self):
                self.it = events()

            def __aiter__(self):
                return self.it

            def cancel(self):
                pass
        return Stream()


def _run(h, prompt, params, lose_after):
    ingress = type("Ingress", (), {})()
    ingress.llm = _Replicas(h, lose_after)
    job = Job(0, prompt, params)

    async def main():
        return [ev async for batch in OpenAIIngress.func_or_class._job_stream(ingress, job) for ev in batch]
    return asyncio.run(main()), ingress.llm.calls


def test_resumed_stream_keeps_held_back_text_and_stops_across_replicas():
    torch.manual_seed(0)
    h = tiny_hybrid()
    prompt = [5, 9, 200, 17]
    base = dict(max_tokens=14, temperature=0.0, top_p=1.0, top_k=0, seed=None, stop=[], stop_token_ids=[],
                ignore_eos=True, logprobs=False)
    full = "".join(e["text"] for e in _run(h, prompt, base, None)[0])
    assert len(full) == 14
    # a 3-letter stop string first found at k: the first replica is lost two letters into it
    k = next(i for i in range(3, 10) if full.find(full[i:i + 3]) == i)
    evs, calls = _run(h, prompt, dict(base, stop=[full[k:k + 3]]), lose_after=k + 2)
    assert len(calls) == 2 and calls[1][1]["resume_tokens"] == k + 2
    assert "".join(e["text"] for e in evs) == full[:k] and evs[-1]["finish_reason"] == "stop"
    # without a stop string the resumed text is the whole text, nothing repeated or lost
    evs, _ = _run(h, prompt, dict(base, stop=[full[-1] + "#"]), lose_after=5)
    assert "".join(e["text"] for e in evs) == full and evs[-1]["finish_reason"] == "length"
    assert evs[-1]["num_generated_tokens"] == 14


def test_a_seeded_sampled_stream_resumes_with_the_draws_it_would_have_made():
    torch.manual_seed(0)
    h = tiny_hybrid()
    prompt = [5, 9, 200, 17]
    params = dict(max_tokens=14, temperature=1.0, top_p=0.9, top_k=0, seed=1234, stop=[], stop_token_ids=[],
                  ignore_eos=True, logprobs=False)
    full = [e["token_id"] for e in _run(h, prompt, params, None)[0]]
    assert len(full) == 14 and len(set(full)) > 3
    for lost in (1, 5, 13):
        evs, calls = _run(h, prompt, params, lose_after=lost)
        assert len(calls) == 2 and [e["token_id"] for e in evs if e["token_id"] is not None] == full, lost


class _DiesAfterFinish(_Handle):
    """`llm` whose replica sends a whole answer (finish included) and is lost before its stream ends."""

    def __init__(self, events):
        self.events, self.calls = events, 0

    def remote(self, prompt_ids, params, request_id):
        from ray.exceptions import RayActorError

        self.calls += 1
        events = self.events

        async def stream():
            yield events
            raise RayActorError()

        class Stream:
            def __aiter__(self):
                return stream()

            def cancel(self):
                pass
        return Stream()


def test_a_finished_stream_is_not_resumed_when_its_replica_is_lost_after_the_finish():
    done = [{"token_id": 7, "text": "H", "logprob": None, "finish_reason": None, "num_prompt_tokens": 2,
             "num_generated_tokens": 1},
            {"token_id": 8, "text": "i", "logprob": None, "finish_reason": "stop", "num_prompt_tokens": 2,
             "num_generated_tokens": 2}]
    ingress = type("Ingress", (), {})()
    ingress.llm = _DiesAfterFinish(done)
    job = Job(0, [1, 2], dict(max_tokens=10, stop=["!"]))

    async def main():
        return [ev async for batch in OpenAIIngress.func_or_class._job_stream(ingress, job) for ev in batch]
    evs = asyncio.run(main())
    # the answer was complete: nothing may be generated after its stop, nor an error raised
    assert ingress.llm.calls == 1
    assert "".join(e["text"] for e in evs) == "Hi" and evs[-1]["finish_reason"] == "stop"
