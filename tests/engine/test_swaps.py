"""Hot swaps under load: in-flight requests finish under the configuration they were admitted with;
requests still waiting at a swap take the new one."""
import pytest
import torch

from dsla_model.engine import Engine, EngineConfig, SamplingParams
from dsla_model.generate import generate_ids
from tests.engine.conftest import pipelined, random_prompts, tiny_hybrid


def random_weights(hybrid, layer, seed):
    """DSLA weights for `layer` that differ from the installed ones (a 'newly distilled' version)."""
    g = torch.Generator().manual_seed(seed)
    mod = hybrid.new_dsla_module(layer)
    return {k: v + torch.randn(v.shape, generator=g) * 0.2 for k, v in mod.state_dict().items()}


def alone_under(hybrid, conf, prompt, max_tokens):
    """The reference loop with the model set to a pinned configuration."""
    for i, mod in enumerate(conf.modules):
        if mod is None:
            hybrid.revert(i)
        else:
            hybrid.install(i, mod)
            hybrid.attention(i).use_dsla = True
    return generate_ids(hybrid, prompt, max_tokens, 0.0)


@pytest.mark.parametrize("pipe", [False, True], ids=["plain", "pipelined"])
def test_requests_in_flight_during_10_swaps_match_their_pinned_config(pipe):
    h = tiny_hybrid(dsla_layers=())
    eng = Engine(h, None, EngineConfig(max_running=8, max_batched_tokens=48, cache_memory_bytes=4 << 20))
    if pipe:
        pipelined(eng)
    prompts = random_prompts(30, 256, lo=3, hi=50, seed=5)
    schedules = [[1], [1, 3], [0, 1, 3], [3], [], [0, 2], [0, 1, 2, 3], [2], [1, 2], [0, 3]]
    sp = SamplingParams(max_tokens=10, temperature=0)
    rid_to = {}
    done = {}
    admitted = {}  # request id -> its configuration when it got its cache

    def step():
        for ev in eng.step():
            done.setdefault(ev.request_id, []).append(ev)
        for rid, r in eng.requests.items():
            if r.cache is not None:
                assert admitted.setdefault(rid, r.conf) is r.conf  # never changes once admitted

    p = 0
    for swap, layers in enumerate(schedules):
        for _ in range(3):  # three new requests per configuration
            rid = eng.add_request(prompts[p], sp)
            rid_to[rid] = (p, eng.requests[rid].conf, eng.requests[rid])
            p += 1
        for _ in range(3):  # let them get going (some mid-prefill, some mid-decode) before the swap
            step()
        # a new distilled version of one converted layer arrives with every other swap
        weights = {layers[0]: random_weights(h, layers[0], swap)} if layers and swap % 2 else None
        eng.set_conversion(layers, store_version=swap, layer_weights=weights)
        assert eng.stats()["dsla_layers"] == layers
    while eng.has_unfinished():
        step()
    assert eng.swaps == 10
    assert not pipe or eng.chained_steps
    assert set(done) == set(rid_to)
    repinned = 0
    for rid, evs in done.items():
        assert evs[-1].finish_reason == "length" and all(e.finish_reason is None for e in evs[:-1])
        i, at_add, req = rid_to[rid]
        assert req.conf is admitted[rid]
        repinned += req.conf is not at_add  # it waited through a swap
        assert [e.token_id for e in evs] == alone_under(h, req.conf, prompts[i], 10)
    assert repinned > 0
    assert eng.pool.num_free == eng.pool.usable_blocks


def test_a_conversion_admits_the_queue_under_the_new_configuration():
    """The controller converts because the queue is long: the waiting requests (no cache yet) must
    take the converted configuration, or they keep needing the old cache and the queue stays as
    long (4 of 10 ran, 6 waited, and stayed waiting after converting every layer). A revert keeps
    a waiting request's configuration when the reverted one could never fit it."""
    h = tiny_hybrid(dsla_layers=())
    eng = Engine(h, None, EngineConfig(max_running=16, max_batched_tokens=4096, cache_memory_bytes=1 << 20))
    sp = SamplingParams(max_tokens=20, temperature=0)
    for p in random_prompts(10, 256, lo=180, hi=181, seed=3):
        eng.add_request(p, sp)
    eng.step()
    before = eng.stats()
    assert before["running"] < 10 and before["waiting"] > 0
    eng.set_conversion([0, 1, 2, 3])
    eng.step()
    assert eng.stats()["running"] == 10 and eng.stats()["waiting"] == 0
    while eng.has_unfinished():
        eng.step()
    assert eng.pool.num_free == eng.pool.usable_blocks
    # a request that only fits converted stays converted when the engine reverts while it waits
    big = eng.pool.usable_blocks * eng.pool.block_size  # more KV tokens than the pool holds
    small = Engine(h, None, EngineConfig(max_running=1, max_batched_tokens=4096, cache_memory_bytes=1 << 20,
                                        max_model_len=big + 64))
    small.set_conversion([0, 1, 2, 3])
    first = small.add_request([1] * 40, SamplingParams(max_tokens=4, temperature=0))
    waiting = small.add_request([1] * 40, SamplingParams(max_tokens=big, temperature=0, ignore_eos=True))
    small.step()
    small.set_conversion([])
    assert list(small.requests[waiting].conf.dsla_layers) == [0, 1, 2, 3]
    small.abort(first)
    small.abort(waiting)
    small.step()
    assert not small.has_unfinished()


def test_capacity_grows_with_conversion():
    h = tiny_hybrid(dsla_layers=(), layers=8)
    eng = Engine(h, None, EngineConfig(cache_memory_bytes=8 << 20, max_model_len=512))
    caps = []
    for n in range(0, 9, 2):
        eng.set_conversion(list(range(n)))
        caps.append(eng.capacity(512))
        assert eng.stats()["capacity_4k"] == eng.capacity(4096)
    assert all(a < b for a, b in zip(caps, caps[1:])), caps
    # all-DSLA: a sequence's cache no longer depends on its length
    assert eng.capacity(16) == eng.capacity(512)


def test_admission_is_by_memory_and_frees_on_finish():
    h = tiny_hybrid(dsla_layers=(), layers=4)
    eng = Engine(h, None, EngineConfig(max_running=64, cache_memory_bytes=1 << 20, max_model_len=512))
    cap = eng.capacity(200)
    assert 1 <= cap < 64
    for p in random_prompts(cap + 3, 256, lo=190, hi=191, seed=2):
        eng.add_request(p, SamplingParams(max_tokens=10, temperature=0))
    eng.step()
    st = eng.stats()
    assert st["running"] == cap and st["waiting"] == 3
    assert 0 < st["cache_usage"] <= 1 and st["waiting_prompt_tokens"] == 3 * 190
    while eng.has_unfinished():
        eng.step()
    assert eng.stats()["cache_used_bytes"] == 0
    # converting every layer shrinks a 200-token sequence's cache: more fit
    eng.set_conversion([0, 1, 2, 3])
    assert eng.capacity(200) > cap


def test_a_bad_layer_in_a_swap_changes_nothing():
    """set_conversion with weights that do not fit one layer used to switch the layers before it
    and fail there, leaving the model half-converted for the next swap and for direct callers."""
    h = tiny_hybrid(dsla_layers=())
    eng = Engine(h, None, EngineConfig(cache_memory_bytes=4 << 20))
    eng.set_conversion([1, 3])
    conf, swaps = eng.conf, eng.swaps
    mod1 = h.attention(1).dsla
    good = h.new_dsla_module(0).state_dict()
    with pytest.raises(ValueError, match="layer 2"):
        eng.set_conversion([0, 1, 2], layer_weights={0: good, 2: {"no_such_weight": torch.zeros(1)}})
    assert h.dsla_layers == [1, 3] and h.attention(1).dsla is mod1 and h.attention(0).dsla is None
    assert eng.conf is conf and eng.swaps == swaps
    p = random_prompts(1, 256, seed=9)[0]
    sp = SamplingParams(max_tokens=6, temperature=0)
    assert eng.generate([p], sp)[0] == generate_ids(h, p, 6, 0.0)


def test_capacity_is_how_many_sequences_are_admitted_at_once():
    """capacity(L): the sequences of L tokens that fit the pool together (its scratch group is no room)."""
    h = tiny_hybrid(dsla_layers=())
    eng = Engine(h, None, EngineConfig(max_running=64, cache_memory_bytes=40 * 4096))
    cap = eng.capacity(16)  # 39 usable blocks, 4 a sequence of 16 tokens
    assert cap == 9
    for p in random_prompts(cap + 1, 256, lo=8, hi=9, seed=6):
        eng.add_request(p, SamplingParams(max_tokens=8, temperature=0))
    eng.step()
    assert eng.stats()["running"] == cap and eng.stats()["waiting"] == 1
    eng.set_conversion([0, 1])  # half the layers: 2 blocks + 2 pairs (1 block each) a sequence
    assert eng.capacity(16) == 39 // 4 and eng.capacity(32) == 39 // 6


def test_a_conversion_to_the_same_layers_is_no_swap_and_keeps_the_store_version():
    h = tiny_hybrid(dsla_layers=())
    eng = Engine(h, None, EngineConfig(cache_memory_bytes=4 << 20))
    eng.set_conversion([1, 3], store_version=5)
    conf = eng.conf
    eng.set_conversion([3, 1])  # same modules, no version given: nothing changes
    assert eng.conf is conf and eng.swaps == 1 and eng.stats()["store_version"] == 5
    eng.set_conversion([1, 3], store_version=6)  # same modules, a newer store: recorded, still no swap
    assert eng.conf is conf and eng.swaps == 1 and eng.stats()["store_version"] == 6
    eng.set_conversion([1, 3], layer_weights={1: random_weights(h, 1, 0)})  # new weights: a swap
    assert eng.conf is not conf and eng.swaps == 2 and eng.conf.modules[1] is not conf.modules[1]
    p = random_prompts(1, 256, seed=9)[0]
    sp = SamplingParams(max_tokens=6, temperature=0)
    assert eng.generate([p], sp)[0] == generate_ids(h, p, 6, 0.0)  # with the new weights


def test_layer_configs_are_the_same_only_with_the_same_module_objects():
    from dsla_model.engine.layer_config import LayerConfig

    a, b = object(), object()
    conf = LayerConfig(0, (None, a, None, b))
    assert conf.attn_layers == (0, 2) and conf.dsla_layers == (1, 3)
    assert conf.same_modules(LayerConfig(1, (None, a, None, b)))
    assert not conf.same_modules(LayerConfig(2, (None, a, None, object())))  # a new version of layer 3
    assert not conf.same_modules(LayerConfig(3, (None, a, None)))  # another model's depth
    assert not conf.same_modules(LayerConfig(4, (None, a, None, b, None)))
