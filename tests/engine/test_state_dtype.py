"""bf16 DSLA state pools (EngineConfig.state_dtype "bfloat16": both states; "bfloat16-recency": the
recency state only): the pools really hold those dtypes, a state pair takes half (3/4) the bytes,
pairs and KV blocks never overlap, and a staggered batch still gives each request the tokens it
gets alone."""
import pytest
import torch

from dsla_model.engine import Engine, EngineConfig, SamplingParams
from tests.engine.conftest import pipelined, random_prompts, tiny_hybrid
from tests.engine.test_exactness import run_staggered


def _engine(h, state_dtype, **kw):
    kw.setdefault("cache_memory_bytes", 4 << 20)
    return Engine(h, None, EngineConfig(state_dtype=state_dtype, **kw))


def test_bf16_pools_shrink_a_state_pair():
    h = tiny_hybrid(dsla_layers=(0, 1, 2, 3))
    e32, e16, emix = _engine(h, "float32"), _engine(h, "bfloat16"), _engine(h, "bfloat16-recency")
    assert e16.pool.s1.dtype == torch.bfloat16 and e32.pool.s1.dtype == torch.float32
    assert (emix.pool.s1.dtype, emix.pool.s2.dtype) == (torch.float32, torch.bfloat16)
    assert e16.pool.pair_bytes * 2 == e32.pool.pair_bytes == emix.pool.pair_bytes * 4 // 3
    # all layers DSLA: a sequence is only its state pairs, so twice (4/3 as) many fit
    assert e16.capacity(64) >= 2 * e32.capacity(64) - 1
    assert emix.capacity(64) >= 4 * e32.capacity(64) // 3 - 1


@pytest.mark.parametrize("states", ["float32", "bfloat16", "bfloat16-recency"])
def test_state_pairs_and_kv_blocks_tile_the_budget(states):
    """Each group's bytes are exactly its pair's two states or its KV blocks: writing one state of a
    pair changes no other state of either pool and no KV block outside that group."""
    from dsla_model.engine.cache_pool import CachePool
    from dsla_model.engine.config import STATE_FORMATS

    p = CachePool(2, 16, torch.bfloat16, "cpu", 1 << 16, block_size=4, state_dtypes=STATE_FORMATS[states])
    assert p.num_groups * p.pair_bytes == p.budget_bytes == p.num_blocks * p.block_bytes == p.num_groups * p.group_bytes
    m = p.blocks_per_pair
    for g in (0, 1, p.num_groups - 1):
        for pool, other in ((p.s1, p.s2), (p.s2, p.s1)):
            p.kv.zero_()
            pool[g].fill_(1.0)
            assert bool((pool[g] == 1).all()) and int(pool.count_nonzero()) == pool[g].numel()
            assert int(other.count_nonzero()) == 0
            touched = p.kv.view(p.num_blocks, -1).count_nonzero(1).nonzero().flatten().tolist()
            assert touched and all(g * m <= b < (g + 1) * m for b in touched)


def test_a_pair_that_no_block_size_fits_takes_whole_blocks():
    """fp32 weights, head dim 18: a pair of fp32 and bf16 states (6 * 2 * 18^2 B) is no whole number
    of KV blocks at any block size; it takes its blocks' bytes with the last one partly unused, at
    the configured block size, and its two states still lie inside its own group."""
    from dsla_model.engine.cache_pool import CachePool

    p = CachePool(2, 18, torch.float32, "cpu", 1 << 16, block_size=4, state_dtypes=(torch.float32, torch.bfloat16))
    assert p.block_size == 4 and p.pair_bytes == 3888 and p.blocks_per_pair == 4 and p.group_bytes == 4608
    for g in (1, p.num_groups - 1):
        for pool in (p.s1, p.s2):
            p.kv.zero_()
            pool[g].fill_(1.0)
            touched = p.kv.view(p.num_blocks, -1).count_nonzero(1).nonzero().flatten().tolist()
            assert touched and all(g * 4 <= b < (g + 1) * 4 for b in touched)
    eng = Engine(tiny_hybrid(dsla_layers=(0, 2), heads=4, kv_heads=2, hidden=72), None,
                 EngineConfig(state_dtype="bfloat16-recency", cache_memory_bytes=1 << 20))
    prompt = random_prompts(1, 256, lo=20, hi=21, seed=3)[0]
    sp = SamplingParams(max_tokens=6, temperature=0)
    assert eng.generate([prompt], sp)[0] == _engine(eng.hybrid, "float32", cache_memory_bytes=1 << 20).generate(
        [prompt], sp)[0]


@pytest.mark.parametrize("states", ["bfloat16", "bfloat16-recency"])
@pytest.mark.parametrize("pipe", [False, True], ids=["plain", "pipelined"])
def test_staggered_greedy_requests_match_alone_with_bf16_states(pipe, states):
    """Prefill pieces are the same as alone (the token budget fits every prompt whole), so the only
    rounding points of the states are the same ones: one per stored state. Alone runs take the same
    decode path (plain or pipelined): the two paths agree to fp32 rounding, and a bf16 state can
    round that difference up to one of its ulps."""
    h = tiny_hybrid(dsla_layers=(0, 2))
    prompts = random_prompts(12, 256, lo=2, hi=60, seed=4)
    params = [SamplingParams(max_tokens=5 + (i * 5) % 13, temperature=0) for i in range(12)]
    arrivals = [(i * 3) % 7 for i in range(12)]
    eng = _engine(h, states, max_running=5, max_batched_tokens=1024)
    if pipe:
        pipelined(eng)
    got = run_staggered(eng, prompts, params, arrivals)
    assert not pipe or eng.chained_steps
    agree32 = 0
    for p, sp, g in zip(prompts, params, got):
        alone = _engine(h, states)
        assert g == (pipelined(alone) if pipe else alone).generate([p], sp)[0]
        agree32 += g == _engine(h, "float32").generate([p], sp)[0]
    assert agree32 >= 6  # a random tiny model's near-ties may flip, but most answers are the fp32 ones
    assert eng.pool.num_free == eng.pool.usable_blocks


def test_bf16_decode_logits_are_close_to_fp32_but_rounded():
    """The same request's logits over 12 decode steps: within bf16 state rounding of the fp32 pools',
    and not equal to them (the pools did round); rounding the recency state alone moves them less."""
    h = tiny_hybrid(dsla_layers=(0, 1, 3))
    prompt = random_prompts(1, 256, lo=30, hi=31, seed=7)[0]
    logits = {}
    for sd in ("float32", "bfloat16", "bfloat16-recency"):
        eng = _engine(h, sd)
        seen = []
        orig = eng.runner.forward_pieces

        def spy(*a, **k):
            out = orig(*a, **k)
            seen.append(out.clone())
            return out
        eng.runner.forward_pieces = spy
        eng.generate([prompt], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
        logits[sd] = torch.cat(seen)
    a = logits["float32"]
    rel = {sd: ((a - b).norm() / a.norm()).item() for sd, b in logits.items()}
    assert 0 < rel["bfloat16"] < 2e-2
    assert 0 < rel["bfloat16-recency"] < rel["bfloat16"]


def test_bad_state_dtypes_are_refused_up_front():
    from dsla_model.engine.cache_pool import CachePool

    for bad in ("float16", ["bfloat16"], None, "bfloat16-history"):
        with pytest.raises(ValueError, match="state_dtype"):
            EngineConfig(state_dtype=bad).validate()
    for bad in (torch.float16, (torch.float32,), (torch.float32, torch.float16)):
        with pytest.raises(ValueError, match="state pools"):
            CachePool(2, 16, torch.float32, "cpu", 1 << 20, state_dtypes=bad)


def _prefill_logits(h, state_dtype, prompt, budget):
    """The first generated token's logits when the prompt is prefilled in pieces of `budget` tokens."""
    eng = _engine(h, state_dtype, max_running=1, max_batched_tokens=budget)
    seen = []
    orig = eng.runner.forward_pieces
    eng.runner.forward_pieces = lambda *a, **k: seen.append(orig(*a, **k)) or seen[-1]
    eng.generate([prompt], SamplingParams(max_tokens=1, temperature=0))
    return seen[-1]


def test_chunked_prefill_rounds_bf16_states_once_per_piece():
    """With bf16 pools a request's result depends (a little) on how its prompt was chunked: each
    piece's final states are rounded. fp32 pools agree to fp32 rounding (the documented trade)."""
    h = tiny_hybrid(dsla_layers=(0, 1, 2, 3))
    prompt = random_prompts(1, 256, lo=60, hi=61, seed=11)[0]
    rel = {}
    for sd in ("float32", "bfloat16"):
        whole, pieces = _prefill_logits(h, sd, prompt, 64), _prefill_logits(h, sd, prompt, 7)
        rel[sd] = ((whole - pieces).norm() / whole.norm()).item()
    assert rel["float32"] < 1e-5
    assert 1e-5 < rel["bfloat16"] < 2e-2
