"""Sampling parameters: seeds, top-k/p, stop strings and ids, max_tokens, abort, validation."""
from decimal import Decimal

import pytest
import torch

from dsla_model.engine import Engine, EngineConfig, SamplingParams
from dsla_model.generate import generate_ids
from tests.conftest import skip_without_default_model
from tests.engine.conftest import pipelined, random_prompts, tiny_hybrid


@pytest.fixture(scope="module")
def tok():
    from dsla_model.loading import default_model_dir
    from transformers import AutoTokenizer

    skip_without_default_model()
    return AutoTokenizer.from_pretrained(default_model_dir())


@pytest.fixture(scope="module")
def text_hybrid(tok):
    """A tiny random model over the real tokenizer's vocabulary, so there is text to stop on."""
    return tiny_hybrid(dsla_layers=(1,), vocab=len(tok))


@pytest.fixture(params=[False, True], ids=["plain", "pipelined"])
def make_engine(request):
    """Engine factory; the pipelined variant runs greedy decode through the pipelined graph path."""
    return lambda *a, **kw: pipelined(Engine(*a, **kw)) if request.param else Engine(*a, **kw)


def events_of(eng, prompt, sp):
    rid = eng.add_request(prompt, sp)
    evs = []
    while eng.has_unfinished():
        evs += [e for e in eng.step() if e.request_id == rid]
    return evs


def test_seed_reproducible_and_independent_of_batch(hybrid):
    prompts = random_prompts(6, 256, seed=7)
    sp = [SamplingParams(max_tokens=12, temperature=0.9, seed=100 + i) for i in range(6)]
    eng = Engine(hybrid, None, EngineConfig(cache_memory_bytes=4 << 20))
    batched = eng.generate(prompts, sp)
    for p, s, b in zip(prompts, sp, batched):
        assert eng.generate([p], s)[0] == b
        # the same draws as the reference loop with the same seed
        assert b == generate_ids(hybrid, p, 12, 0.9, seed=s.seed)
    other = eng.generate(prompts[:1], SamplingParams(max_tokens=12, temperature=0.9, seed=999))[0]
    assert other != batched[0]


def test_top_k_1_is_greedy_and_top_p_small_is_greedy(hybrid):
    p = random_prompts(1, 256, seed=8)[0]
    eng = Engine(hybrid, None, EngineConfig(cache_memory_bytes=4 << 20))
    greedy = eng.generate([p], SamplingParams(max_tokens=8, temperature=0))[0]
    assert eng.generate([p], SamplingParams(max_tokens=8, temperature=1.5, top_k=1, seed=1))[0] == greedy
    assert eng.generate([p], SamplingParams(max_tokens=8, temperature=1.5, top_p=1e-6, seed=1))[0] == greedy
    # a top_p that rounds to 0 in fp32 kept no token at all, and the failed step took the batch with it
    assert eng.generate([p], SamplingParams(max_tokens=8, temperature=1.5, top_p=1e-320, seed=1))[0] == greedy


def test_stop_strings_never_reach_the_stream(text_hybrid, tok, make_engine):
    eng = make_engine(text_hybrid, tok, EngineConfig(cache_memory_bytes=16 << 20))
    prompt = tok("Hello there, this is", add_special_tokens=False)["input_ids"]
    base = events_of(eng, prompt, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))
    full = "".join(e.text for e in base)
    assert full == tok.decode([e.token_id for e in base], skip_special_tokens=True)
    assert base[-1].finish_reason == "length" and len(base) == 24
    stop = full[len(full) // 2: len(full) // 2 + 3]
    assert len(stop) == 3
    evs = events_of(eng, prompt, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, stop=[stop]))
    text = "".join(e.text for e in evs)
    assert evs[-1].finish_reason == "stop"
    assert text == full[:full.find(stop)]
    assert stop not in text
    assert [e.token_id for e in evs] == [e.token_id for e in base[:len(evs)]]


def test_a_stop_tokens_text_is_left_out(text_hybrid, tok, make_engine):
    """As in vLLM (its detokenizer skips the stop-terminating token unless include_stop_str_in_output):
    a stop token ends the answer; its id is generated and counted, its text is not in the answer."""
    eng = make_engine(text_hybrid, tok, EngineConfig(cache_memory_bytes=16 << 20))
    prompt = tok("Hello there, this is", add_special_tokens=False)["input_ids"]
    base = events_of(eng, prompt, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    ids = [e.token_id for e in base]
    stop_id = next(t for t in ids[3:] if tok.decode([t], skip_special_tokens=True).strip())
    upto = ids[:ids.index(stop_id) + 1]
    evs = events_of(eng, prompt, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True,
                                                stop_token_ids=[stop_id]))
    assert [e.token_id for e in evs] == upto and evs[-1].finish_reason == "stop"
    assert evs[-1].num_generated_tokens == len(upto)
    assert "".join(e.text for e in evs) == tok.decode(upto[:-1], skip_special_tokens=True)


def test_stop_token_ids_and_max_tokens_and_logprobs(hybrid, make_engine):
    p = random_prompts(1, 256, seed=9)[0]
    eng = make_engine(hybrid, None, EngineConfig(cache_memory_bytes=4 << 20))
    base = events_of(eng, p, SamplingParams(max_tokens=10, temperature=0, logprobs=True))
    assert [e.num_generated_tokens for e in base] == list(range(1, 11))
    assert all(e.logprob is not None and e.logprob <= 0 for e in base)
    stop_id = base[4].token_id
    first = [e.token_id for e in base].index(stop_id)
    evs = events_of(eng, p, SamplingParams(max_tokens=10, temperature=0, stop_token_ids=[stop_id]))
    assert len(evs) == first + 1 and evs[-1].finish_reason == "stop" and evs[-1].token_id == stop_id
    short = events_of(eng, p, SamplingParams(max_tokens=3, temperature=0))
    assert [e.token_id for e in short] == [e.token_id for e in base[:3]] and short[-1].finish_reason == "length"


class Tok:
    """The smallest tokenizer the engine accepts."""
    eos_token_id = None

    def decode(self, ids, **kw):
        return "".join(chr(65 + i % 26) for i in ids)


def test_eos_stops_unless_ignored(hybrid, make_engine):
    p = random_prompts(1, 256, seed=9)[0]
    base = make_engine(hybrid, Tok(), EngineConfig(cache_memory_bytes=4 << 20)).generate(
        [p], SamplingParams(max_tokens=10, temperature=0))[0]
    t = Tok()
    t.eos_token_id = base[3]
    eng = make_engine(hybrid, t, EngineConfig(cache_memory_bytes=4 << 20))
    assert eng.generate([p], SamplingParams(max_tokens=10, temperature=0))[0] == base[:base.index(base[3]) + 1]
    assert eng.generate([p], SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))[0] == base


def test_the_generation_configs_eos_ids_stop_too(make_engine):
    """Llama-3-Instruct ends a turn with <|eot_id|>, which its generation config lists as an EOS id
    and its tokenizer does not: generation must stop there (it ran on to max_tokens). An engine
    without a tokenizer works on ids alone and stops at stop_token_ids only."""
    h = tiny_hybrid(dsla_layers=(1,))
    p = random_prompts(1, 256, seed=9)[0]
    sp = SamplingParams(max_tokens=10, temperature=0)
    h.model.generation_config.eos_token_id = None
    base = make_engine(h, Tok(), EngineConfig(cache_memory_bytes=4 << 20)).generate([p], sp)[0]
    h.model.generation_config.eos_token_id = [255, base[3]]
    got = make_engine(h, Tok(), EngineConfig(cache_memory_bytes=4 << 20)).generate([p], sp)[0]
    assert got == base[:base.index(base[3]) + 1] and len(got) < 10
    assert make_engine(h, None, EngineConfig(cache_memory_bytes=4 << 20)).generate([p], sp)[0] == base


def test_abort_frees_and_reports(hybrid, make_engine):
    eng = make_engine(hybrid, None, EngineConfig(cache_memory_bytes=4 << 20))
    ps = random_prompts(3, 256, seed=10)
    ids = [eng.add_request(p, SamplingParams(max_tokens=50, temperature=0)) for p in ps]
    eng.step()
    eng.step()
    eng.abort(ids[1])
    eng.abort("no-such-request")  # unknown ids are ignored
    evs = eng.step()
    ab = [e for e in evs if e.request_id == ids[1]]
    assert len(ab) == 1 and ab[0].finish_reason == "abort" and ab[0].token_id == -1
    assert eng.stats()["running"] == 2
    for rid in (ids[0], ids[2]):
        eng.abort(rid)
    eng.step()
    assert not eng.has_unfinished() and eng.stats()["cache_used_bytes"] == 0


@pytest.mark.parametrize("kw, msg", [
    (dict(max_tokens=0), "max_tokens"), (dict(temperature=-1), "temperature"), (dict(top_p=0), "top_p"),
    (dict(top_k=-2), "top_k"), (dict(seed=-1), "seed"), (dict(seed=2**64), "seed"), (dict(stop=[""]), "stop"),
    (dict(stop_token_ids=[-5]), "stop_token_ids"),
    # values the sampler cannot take used to pass and fail inside a step, for every request
    (dict(temperature=10**400), "temperature"), (dict(temperature=Decimal("0.7")), "temperature"),
    (dict(temperature="0.5"), "temperature"), (dict(temperature=float("inf")), "temperature"),
    (dict(top_p=Decimal("0.9")), "top_p"), (dict(stop=None), "stop"), (dict(stop_token_ids=None), "stop_token_ids"),
    (dict(stop_token_ids=[True]), "stop_token_ids"), (dict(top_k=True), "top_k"), (dict(seed=True), "seed"),
    (dict(temperature=float("nan")), "temperature"), (dict(top_p=float("nan")), "top_p"),
    (dict(max_tokens=True), "max_tokens"), (dict(resume_tokens=-1), "resume_tokens"),
    (dict(resume_emitted_chars=-1), "resume_emitted_chars")])
def test_bad_sampling_params(kw, msg):
    with pytest.raises(ValueError, match=msg):
        SamplingParams(**kw).validate()


def test_generate_hands_other_requests_events_to_the_next_step(hybrid):
    eng = Engine(hybrid, None, EngineConfig(cache_memory_bytes=4 << 20))
    prompts = random_prompts(3, 256, seed=3)
    sp = SamplingParams(max_tokens=5, temperature=0)
    alone = eng.generate([prompts[0]], sp)[0]
    a = eng.add_request(prompts[0], sp)
    b = eng.add_request(prompts[1], sp)
    first = eng.step()
    eng.abort(b)
    eng.generate([prompts[2]], sp)
    later = []
    while eng.has_unfinished():
        later += eng.step()
    evs = first + later
    assert [e.token_id for e in evs if e.request_id == a and e.token_id >= 0] == alone
    assert [e.finish_reason for e in evs if e.request_id == a][-1] == "length"
    assert [e.finish_reason for e in evs if e.request_id == b][-1] == "abort"


def test_an_id_whose_last_events_wait_for_step_is_not_reused(hybrid):
    """A request that finished inside generate() has its tokens and finish held for the next step();
    adding another request with its id before that used to drop them without a word."""
    eng = Engine(hybrid, None, EngineConfig(cache_memory_bytes=4 << 20))
    eng.add_request([1, 2, 3], SamplingParams(max_tokens=2, temperature=0), request_id="r")
    eng.generate([[4, 5, 6, 7]], SamplingParams(max_tokens=6, temperature=0))
    assert "r" not in eng.requests
    with pytest.raises(ValueError, match="still in use"):
        eng.add_request([9, 9], SamplingParams(max_tokens=1, temperature=0), request_id="r")
    evs = eng.step()
    assert [e.finish_reason for e in evs if e.request_id == "r"][-1] == "length"
    assert len([e for e in evs if e.request_id == "r" and e.token_id >= 0]) == 2
    eng.add_request([9, 9], SamplingParams(max_tokens=1, temperature=0), request_id="r")  # delivered: free


def test_generate_with_one_bad_params_leaves_nothing_behind(hybrid):
    eng = Engine(hybrid, None, EngineConfig(cache_memory_bytes=4 << 20))
    prompts = random_prompts(2, 256, seed=2)
    with pytest.raises(ValueError, match="stop"):
        eng.generate(prompts, [SamplingParams(max_tokens=4), SamplingParams(max_tokens=4, stop=None)])
    assert not eng.requests and not eng.has_unfinished()


def test_a_stop_string_completed_by_the_last_allowed_token_finishes_as_stop(hybrid):
    """The max_tokens-th token completes a character that completes a stop string: the text was
    cut at the stop but the finish reason said 'length'."""
    p = random_prompts(1, 256, seed=9)[0]
    base = Engine(hybrid, None, EngineConfig(cache_memory_bytes=4 << 20)).generate(
        [p], SamplingParams(max_tokens=10, temperature=0))[0]
    n = next(i for i in range(1, 10) if base[i] not in base[:i]) + 1  # the n-th token is new
    x = base[n - 1]

    class Tok:  # byte-level-like: x is "Z" and the first byte of a character the next token ends
        eos_token_id = None

        def decode(self, ids, **kw):
            return "".join(("Z\u00e9" if j + 1 < len(ids) else "Z\ufffd") if t == x else chr(97 + t % 26)
                           for j, t in enumerate(ids))

    eng = Engine(hybrid, Tok(), EngineConfig(cache_memory_bytes=4 << 20))
    eng.add_request(p, SamplingParams(max_tokens=n, temperature=0, stop=["Z"]))
    evs = []
    while eng.has_unfinished():
        evs += eng.step()
    assert "Z" not in "".join(e.text for e in evs) and evs[-1].finish_reason == "stop"


def test_bad_requests(hybrid):
    eng = Engine(hybrid, None, EngineConfig(cache_memory_bytes=4 << 20, max_model_len=64))
    sp = SamplingParams(max_tokens=4)
    with pytest.raises(ValueError, match="at least one token"):
        eng.add_request([], sp)
    with pytest.raises(ValueError, match="max_model_len"):
        eng.add_request([1] * 62, sp)
    with pytest.raises(ValueError, match="token ids"):
        eng.add_request([1, 999], sp)
    with pytest.raises(ValueError, match="token ids"):
        eng.add_request([1, 256], sp)  # the vocabulary is 0..255
    with pytest.raises(ValueError, match="resume_tokens"):
        eng.add_request([1, 2], SamplingParams(max_tokens=4, resume_tokens=2))  # no prompt proper left
    eng.add_request([1, 2], sp, request_id="x")
    with pytest.raises(ValueError, match="already in use"):
        eng.add_request([1, 2], sp, request_id="x")
    with pytest.raises(ValueError, match="tokenizer"):
        eng.add_request([1, 2], SamplingParams(stop=["x"]))
    with pytest.raises(ValueError, match="max_model_len"):
        eng.generate([[1, 2], [1] * 62], sp)
    assert eng.stats()["waiting"] == 1  # only "x"; generate() left nothing behind
    with pytest.raises(ValueError, match="max_batched_tokens"):
        Engine(hybrid, None, EngineConfig(max_running=8, max_batched_tokens=4))


def test_temperatures_near_zero_sample_greedily(hybrid):
    """logits / 1e-44 overflow to inf and the softmax to NaN: a temperature below GREEDY_BELOW
    (1e-5, vLLM's rule) is greedy instead of a failed step."""
    prompts = random_prompts(2, 256, seed=4)
    eng = Engine(hybrid, None, EngineConfig(cache_memory_bytes=4 << 20))
    greedy = eng.generate(prompts, SamplingParams(max_tokens=5, temperature=0))
    assert eng.generate(prompts, SamplingParams(max_tokens=5, temperature=1e-44, seed=1)) == greedy
    assert SamplingParams(temperature=1e-6).greedy and not SamplingParams(temperature=1e-4).greedy


def test_a_request_keeps_the_params_it_was_admitted_with(hybrid, make_engine):
    """One SamplingParams object reused and changed for the next request: the first keeps its own
    max_tokens (it used to read the live object: 20 tokens instead of 5, and past max_model_len a
    crash of the whole step)."""
    eng = make_engine(hybrid, None, EngineConfig(max_model_len=32, cache_memory_bytes=4 << 20))
    sp = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
    a = eng.add_request(list(range(1, 11)), sp)
    sp.max_tokens = 30  # 10 + 30 would not fit max_model_len 32
    b = eng.add_request([1, 2], sp)
    got = {a: [], b: []}
    while eng.has_unfinished():
        for e in eng.step():
            if e.token_id >= 0:
                got[e.request_id].append(e.token_id)
    assert len(got[a]) == 5 and len(got[b]) == 30


def test_abort_takes_the_id_add_request_was_given(hybrid, make_engine):
    """add_request stores str(request_id); abort(7) used to look up 7 and do nothing."""
    eng = make_engine(hybrid, None, EngineConfig(cache_memory_bytes=4 << 20))
    rid = eng.add_request([1, 2, 3], SamplingParams(max_tokens=20, temperature=0), request_id=7)
    eng.step()
    eng.abort(7)
    evs = eng.step()
    assert rid == "7" and [e.finish_reason for e in evs if e.request_id == "7"] == ["abort"]
    assert not eng.has_unfinished()


def test_a_single_stop_string_is_taken_as_a_list():
    assert SamplingParams(stop="ab").validate().stop == ["ab"]


def test_top_k_then_top_p_on_the_renormalised_top_k():
    """As HF's and vLLM's samplers: top-k first, then the nucleus of what top-k kept; the nucleus
    keeps the token whose probability crosses top_p."""
    import torch

    from dsla_model.engine.sampler import filter_logits

    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    kept = lambda lg: torch.isfinite(lg).nonzero().flatten().tolist()  # noqa: E731
    assert kept(filter_logits(logits, 0, 0.7)) == [0, 1]  # mass before token 1: 0.5 < 0.7
    assert kept(filter_logits(logits, 0, 0.5)) == [0]
    assert kept(filter_logits(logits, 3, 1.0)) == [0, 1, 2]
    # top-2 renormalised is [0.625, 0.375]: a 0.6 nucleus keeps token 0 alone (over all four tokens
    # it would keep 0 and 1)
    assert kept(filter_logits(logits, 2, 0.6)) == [0]
    out = filter_logits(logits, 0, 0.7)
    assert torch.equal(out[:2], logits[:2])  # kept logits are unchanged


def test_logprobs_are_of_the_sampled_token_under_the_model(hybrid):
    """The logprob reported with a sampled token is that token's log-probability under the model's
    own distribution (before temperature), checked against a full forward of the sequence."""
    import torch

    p = random_prompts(1, 256, seed=12)[0]
    eng = Engine(hybrid, None, EngineConfig(cache_memory_bytes=4 << 20))
    evs = events_of(eng, p, SamplingParams(max_tokens=12, temperature=1.5, seed=3, logprobs=True))
    out = [e.token_id for e in evs]
    with torch.no_grad():
        logits = hybrid(torch.tensor([p + out]))[0, len(p) - 1:-1].float()
    ref = torch.log_softmax(logits, -1)
    assert any(t != int(logits[i].argmax()) for i, t in enumerate(out))  # some draws are not the argmax
    for i, (e, t) in enumerate(zip(evs, out)):
        assert abs(e.logprob - float(ref[i, t])) < 1e-4


def test_a_resumed_sampled_request_continues_the_same_draws(hybrid):
    """A request resumed with the earlier attempt's output as the end of its prompt (resume_tokens)
    and the same seed samples what the uninterrupted request would have: the seed's draws that
    the earlier attempt used are skipped."""
    p = random_prompts(1, 256, seed=13)[0]
    eng = Engine(hybrid, None, EngineConfig(cache_memory_bytes=4 << 20))
    full = eng.generate([p], SamplingParams(max_tokens=12, temperature=1.2, seed=5, ignore_eos=True))[0]
    k = 5
    got = eng.generate([p + full[:k]], SamplingParams(max_tokens=12 - k, temperature=1.2, seed=5, ignore_eos=True,
                                                      resume_tokens=k))[0]
    assert got == full[k:]
    fresh = eng.generate([p + full[:k]], SamplingParams(max_tokens=12 - k, temperature=1.2, seed=5, ignore_eos=True))[0]
    assert fresh != full[k:]  # the skip matters for this seed


def test_a_sequence_that_can_never_fit_the_cache_is_refused_under_the_current_conversion():
    """39 usable 16-token blocks over 4 attention layers: at most 9 blocks (144 tokens) a layer. A
    longer request would wait at the head of the queue forever (and block every one behind it);
    with every layer converted it fits (4 state pairs)."""
    eng = Engine(tiny_hybrid(dsla_layers=()), None, EngineConfig(cache_memory_bytes=40 * 4096, max_model_len=1024))
    assert eng.pool.usable_blocks == 39 and eng.pool.block_size == 16
    ok = eng.add_request([1] * 10, SamplingParams(max_tokens=134, temperature=0))
    with pytest.raises(ValueError, match="does not fit the cache budget"):
        eng.add_request([1] * 10, SamplingParams(max_tokens=135, temperature=0))
    eng.abort(ok)
    eng.step()
    eng.set_conversion([0, 1, 2, 3])
    rid = eng.add_request([1] * 10, SamplingParams(max_tokens=135, temperature=0, ignore_eos=True))
    evs = []
    while eng.has_unfinished():
        evs += eng.step()
    assert [e.finish_reason for e in evs if e.request_id == rid][-1] == "length"


def test_a_request_due_to_finish_by_length_is_not_chained_again(hybrid):
    """The pipelined path chains a decode step only if its token can be used: a request of n tokens
    takes its prefill and n - 1 decode launches, no launch whose token is dropped."""
    eng = pipelined(Engine(hybrid, None, EngineConfig(cache_memory_bytes=4 << 20)))
    launches = []
    run = eng.graphs.run
    eng.graphs.run = lambda *a, **kw: launches.append(1) or run(*a, **kw)
    p = random_prompts(1, 256, seed=14)[0]
    assert eng.generate([p], SamplingParams(max_tokens=6, temperature=0)) == [generate_ids(hybrid, p, 6, 0.0)]
    assert len(launches) == 5 and eng.chained_steps


def test_ttft_and_tpot_under_a_fake_clock(hybrid, monkeypatch):
    """The engine's TTFT (arrival to first token) and TPOT (first to last token over the tokens after
    the first) on a clock the test moves: one time unit per step."""
    import types

    import dsla_model.engine.engine as engine_mod
    import dsla_model.engine.request as request_mod

    now = [0.0]
    fake = types.SimpleNamespace(perf_counter=lambda: now[0])
    monkeypatch.setattr(engine_mod, "time", fake)
    monkeypatch.setattr(request_mod, "time", fake)
    eng = Engine(hybrid, None, EngineConfig(cache_memory_bytes=4 << 20))
    eng.add_request([1, 2, 3], SamplingParams(max_tokens=4, temperature=0))
    aborted = eng.add_request([4, 5, 6], SamplingParams(max_tokens=9, temperature=0))
    while eng.has_unfinished():
        now[0] += 2.0 if now[0] else 3.0  # first token at t=3, then every 2
        eng.step()
        if aborted in eng.requests and eng.requests[aborted].num_generated == 2:
            eng.abort(aborted)  # an aborted request counts in neither mean
    st = eng.stats()
    assert st["ttft_s"] == 3.0 and st["tpot_s"] == 2.0


def test_an_abort_event_counts_the_tokens_generated_before_it(hybrid):
    eng = Engine(hybrid, None, EngineConfig(cache_memory_bytes=4 << 20))
    rid = eng.add_request([1, 2, 3], SamplingParams(max_tokens=20, temperature=0))
    for _ in range(3):
        eng.step()
    eng.abort(rid)
    ev = [e for e in eng.step() if e.request_id == rid]
    assert [(e.finish_reason, e.num_prompt_tokens, e.num_generated_tokens) for e in ev] == [("abort", 3, 3)]


def test_waiting_prompt_tokens_count_what_is_left_of_prompts_in_prefill(hybrid):
    """The controller's load signal: the prompt tokens not yet computed, of waiting requests and of
    running ones still in a chunked prefill."""
    eng = Engine(hybrid, None, EngineConfig(max_running=1, max_batched_tokens=8, cache_memory_bytes=4 << 20))
    eng.add_request(list(range(1, 21)), SamplingParams(max_tokens=2, temperature=0))
    eng.add_request([1, 2, 3], SamplingParams(max_tokens=2, temperature=0))
    assert eng.stats()["waiting_prompt_tokens"] == 23
    eng.step()  # 8 of the first prompt's 20 tokens
    assert eng.stats()["waiting_prompt_tokens"] == 12 + 3
    eng.step()
    assert eng.stats()["waiting_prompt_tokens"] == 4 + 3


def test_text_held_back_for_a_stop_string_comes_out_when_a_stop_token_ends_the_request(hybrid):
    """The token before the stop token, held back as the start of a stop string that the end of
    the request leaves incomplete, is in the answer (once it was lost); the stop token's own text
    is not."""
    p = random_prompts(1, 256, seed=9)[0]
    base = Engine(hybrid, Tok(), EngineConfig(cache_memory_bytes=4 << 20)).generate(
        [p], SamplingParams(max_tokens=10, temperature=0))[0]
    k = next(i for i in range(2, 10) if base[i] not in base[:i])
    held = Tok().decode([base[k - 1]])
    eng = Engine(hybrid, Tok(), EngineConfig(cache_memory_bytes=4 << 20))
    evs = events_of(eng, p, SamplingParams(max_tokens=10, temperature=0, stop_token_ids=[base[k]],
                                           stop=[held + "never"]))
    assert [e.token_id for e in evs] == base[:k + 1] and evs[-1].finish_reason == "stop"
    assert evs[-2].text == "" and "".join(e.text for e in evs) == Tok().decode(base[:k])


def test_a_row_with_non_finite_logits_does_not_fail_its_neighbours():
    """torch.multinomial raised on one sampled row's inf logit; the failed step aborted every request
    in the batch. That row now takes its argmax and consumes its draw; the others sample as alone."""
    import types

    from dsla_model.engine.sampler import sample

    def req(seed):
        return types.SimpleNamespace(params=SamplingParams(max_tokens=4, temperature=1.0, seed=seed),
                                     generator=torch.Generator().manual_seed(seed))

    g = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 50, generator=g)
    bad = logits.clone()
    bad[1, 7] = float("inf")
    bad[2, 11] = float("nan")
    alone, _ = sample(logits[:1], [req(0)])
    reqs = [req(0), req(1), req(2)]
    toks, _ = sample(bad, reqs)
    assert toks[0] == alone[0] and toks[1] == 7 and 0 <= toks[2] < 50
    # the bad rows consumed one draw each, as a normal draw does
    for r, seed in zip(reqs[1:], (1, 2)):
        ref = torch.Generator().manual_seed(seed)
        torch.multinomial(torch.ones(50), 1, generator=ref)
        assert torch.equal(r.generator.get_state(), ref.get_state())
