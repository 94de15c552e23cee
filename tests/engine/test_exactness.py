"""Batched, chunked, staggered engine runs give each request the tokens it gets alone."""
import pytest
import torch

from dsla_model.engine import Engine, EngineConfig, SamplingParams
from dsla_model.generate import generate_ids
from tests.engine.conftest import padded_decode_inputs, pipelined, random_prompts, tiny_hybrid


def run_staggered(engine, prompts, params, arrivals):
    """Add prompt i before step arrivals[i]; returns generated ids per prompt."""
    out, ids, step, pending = {}, {}, 0, sorted(range(len(prompts)), key=lambda i: arrivals[i])
    while pending or engine.has_unfinished():
        while pending and arrivals[pending[0]] <= step:
            i = pending.pop(0)
            ids[engine.add_request(prompts[i], params[i])] = i
        for ev in engine.step():
            out.setdefault(ids[ev.request_id], []).append(ev.token_id)
        step += 1
    return [out[i] for i in range(len(prompts))]


@pytest.mark.parametrize("pipe", [False, True], ids=["plain", "pipelined"])
def test_16_staggered_greedy_requests_match_alone_tiny(pipe):
    h = tiny_hybrid(dsla_layers=(0, 2))
    prompts = random_prompts(16, 256, lo=2, hi=90, seed=1)
    params = [SamplingParams(max_tokens=4 + (i * 7) % 17, temperature=0) for i in range(16)]
    arrivals = [(i * 3) % 11 for i in range(16)]
    # a small token budget forces chunked prefill; a small running cap forces queueing
    eng = Engine(h, None, EngineConfig(max_running=6, max_batched_tokens=40, cache_memory_bytes=4 << 20))
    if pipe:
        pipelined(eng)
    got = run_staggered(eng, prompts, params, arrivals)
    assert not pipe or eng.chained_steps
    for p, sp, g in zip(prompts, params, got):
        alone = Engine(h, None, EngineConfig(cache_memory_bytes=4 << 20)).generate([p], sp)[0]
        assert g == alone
        assert g == generate_ids(h, p, sp.max_tokens, 0.0)
    assert eng.pool.num_free == eng.pool.usable_blocks  # everything given back


def test_decode_form_matches_piece_form():
    """The static-shape decode forward (what CUDA graphs capture) agrees with the general one."""
    h = tiny_hybrid()
    eng = Engine(h, None, EngineConfig(cache_memory_bytes=4 << 20))
    prompts = random_prompts(5, 256, seed=3)
    for p in prompts:
        eng.add_request(p, SamplingParams(max_tokens=8, temperature=0))
    eng.step()  # prefill all; every request now decodes
    items = eng.scheduler.schedule()
    assert all(it.n == 1 for it in items)
    conf = items[0].req.conf
    s1, s2, kv = eng.pool.s1.clone(), eng.pool.s2.clone(), eng.pool.kv.clone()
    ref = eng.runner.forward_pieces(conf, items, list(range(len(items))))
    eng.pool.s1.copy_(s1), eng.pool.s2.copy_(s2), eng.pool.kv.copy_(kv)
    ids, pos, tables, slots = padded_decode_inputs(items, len(conf.modules), pad_rows=2)
    out = eng.runner.forward_decode(conf, ids, pos, tables, slots)
    torch.testing.assert_close(out[:len(items)], ref, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_16_staggered_greedy_requests_match_alone_default_model(default_hybrid):
    h, tok = default_hybrid
    h.set_dsla_layers([0, 7, 14, 29])
    try:
        texts = ["The GNU General Public License is", "def fibonacci(n):", "Once upon a time",
                 "Paris is the capital of", "1, 2, 3, 4,", "The quick brown fox", "import numpy as np\n",
                 "Linear attention replaces softmax with", "Q: What is two plus two?\nA:", "Dear Sir,",
                 "The weather today", "In 1905 Einstein", "Rust and C++ both", "A list of fruits: apple,",
                 "Hello! How", "To be or not to be,"]
        prompts = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
        params = [SamplingParams(max_tokens=3 + i % 6, temperature=0, ignore_eos=True) for i in range(16)]
        arrivals = [i // 3 for i in range(16)]
        eng = Engine(h, tok, EngineConfig(max_running=16, max_batched_tokens=64, cache_memory_bytes=64 << 20))
        got = run_staggered(eng, prompts, params, arrivals)
        for p, sp, g in zip(prompts, params, got):
            assert g == generate_ids(h, p, sp.max_tokens, 0.0)
    finally:
        h.set_dsla_layers([])


def test_reused_request_id_gets_its_own_cache_on_the_graph_path():
    """A request id used again after its request finished names a new request with a new cache:
    the decode graphs must load the new request's block tables and state slots even when the
    batch has the same ids in the same places as before (a longer request here needs more blocks)."""
    h = tiny_hybrid(dsla_layers=(0, 2))
    short, long_, other = random_prompts(3, 256, lo=5, hi=40, seed=9)
    eng = pipelined(Engine(h, None, EngineConfig(max_running=2, cache_memory_bytes=4 << 20)))
    greedy = lambda n: SamplingParams(max_tokens=n, temperature=0)  # noqa: E731
    eng.add_request(other, greedy(40), request_id="x")
    eng.add_request(short[:5], greedy(3), request_id="a")
    out = {"x": [], "a": []}
    while "a" in eng.requests or eng._inflight is not None and any(it.req.id == "a" for it in eng._inflight[0]):
        for ev in eng.step():
            out[ev.request_id].append(ev.token_id)
    assert len(out["a"]) == 3
    out["a"] = []
    eng.add_request(long_, greedy(12), request_id="a")  # same id, same place in the batch, more blocks
    while eng.has_unfinished():
        for ev in eng.step():
            out[ev.request_id].append(ev.token_id)
    assert out["a"] == generate_ids(h, long_, 12, 0.0)
    assert out["x"] == generate_ids(h, other, 40, 0.0)


def test_one_token_prompt_chunks_stay_off_the_pipelined_path():
    """With max_batched_tokens == max_running a full batch gives a request in prefill one prompt
    token per step, which samples nothing: it must not run as a pipelined greedy decode (whose
    guess would be emitted and fed back as the next prompt token)."""
    h = tiny_hybrid(dsla_layers=(0, 2))
    pa, pb = random_prompts(2, 256, lo=6, hi=10, seed=1)
    sp = SamplingParams(max_tokens=6, temperature=0)
    eng = pipelined(Engine(h, None, EngineConfig(max_running=2, max_batched_tokens=2, cache_memory_bytes=4 << 20)))
    a = eng.add_request(pa, sp)
    while eng.requests[a].in_prefill:
        eng.step()
    b = eng.add_request(pb, sp)
    out = {a: [], b: []}
    while eng.has_unfinished():
        for ev in eng.step():
            out[ev.request_id].append(ev.token_id)
    assert out[b] == generate_ids(h, pb, 6, 0.0) and out[a] == generate_ids(h, pa, 6, 0.0)
