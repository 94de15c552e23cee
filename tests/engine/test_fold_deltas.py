"""The GPU decode step's folded projections (runner._frozen_consts): a DSLA layer with low-rank
deltas (the shipped store's: delta_rank 8, an output bias) runs the fused path with W + U D as
plain weights, instead of the op-by-op path (~115 us a layer on an H200 for SmolLM2-135M).
The folding is checked here on any device; the fused step itself by test_gpu_default_model.py."""
import pytest
import torch
import torch.nn.functional as F

from dsla_model.dsla_attention import DSLAConfig
from dsla_model.engine import Engine, EngineConfig
from dsla_model.hybrid import HybridModel
from tests.conftest import randomize_dsla, tiny_model


def test_folded_projections_equal_the_modules_own():
    h = HybridModel(tiny_model(seed=0), DSLAConfig(delta_rank=4, output_bias=True))
    for i in (1, 3):
        h.convert(i)
    randomize_dsla(h, 0)
    eng = Engine(h, None, EngineConfig(cache_memory_bytes=4 << 20))
    runner = eng.runner
    runner._fuse_weights()  # the CUDA runner's [q;k;v] weights (views of the teacher's)
    mod = h.attention(1).dsla
    assert mod.deltas is not None and runner._fused_step(1, mod)
    _, _, _, (qkv_w, o_w) = runner._frozen_consts(mod)
    x = torch.randn(3, h.config.hidden_size)
    with torch.no_grad():
        want = torch.cat([mod._proj("q", x), mod._proj("k", x), mod._proj("v", x)], -1)
        torch.testing.assert_close(F.linear(x, qkv_w), want, rtol=1e-5, atol=1e-5)
        o = torch.randn(3, h.num_heads * h.head_dim)
        want_o = mod.teacher.o_proj(o) + mod.deltas["o"](o)
        torch.testing.assert_close(F.linear(o, o_w), want_o, rtol=1e-5, atol=1e-5)
    # the teacher's own weights are untouched (an unconverted layer and a revert read them)
    assert not torch.equal(o_w, mod.teacher.o_proj.weight)
    plain = HybridModel(tiny_model(seed=0))
    plain.convert(1)
    peng = Engine(plain, None, EngineConfig(cache_memory_bytes=4 << 20))
    peng.runner._fuse_weights()
    assert peng.runner._frozen_consts(plain.attention(1).dsla)[3] is None


def test_the_gpu_cache_budget_leaves_room_for_folded_projections():
    """The cache takes 85% of the free memory at start, before any layer is folded: a 7B model's
    folded q/k/v/o (128 MiB a layer) came out of the 15% kept for activations and graphs."""
    from dsla_model.engine.runner import fold_reserve_bytes

    h = HybridModel(tiny_model(seed=0), DSLAConfig(delta_rank=4))
    attn = h.model.model.layers[0].self_attn.teacher  # the wrapped HF attention
    per_layer = sum(getattr(attn, f"{n}_proj").weight.nbytes for n in "qkvo")
    assert fold_reserve_bytes(h) == per_layer * h.num_layers > 0
    assert fold_reserve_bytes(HybridModel(tiny_model(seed=0))) == 0  # no deltas: nothing is folded


@pytest.mark.parametrize("delta_rank,output_bias", [(4, True), (0, False)])
def test_prefill_through_the_runners_consts_equals_the_modules_forms(delta_rank, output_bias):
    """On the fused (CUDA) runner a DSLA layer's prefill piece runs on what the decode keeps: one
    [q;k;v] GEMM (deltas folded in), one GEMM for both gates' codes, the head scales and the folded o
    projection. Forced on here (the CPU runner's prefill takes the module's op-by-op forms); the
    logits of a prompt in two pieces, and then of two prompts in one step, must match."""
    from dsla_model.engine import SamplingParams
    from dsla_model.engine.scheduler import WorkItem
    from dsla_model.engine.seq_cache import SeqCache

    h = HybridModel(tiny_model(seed=0), DSLAConfig(delta_rank=delta_rank, output_bias=output_bias))
    for i in (1, 3):
        h.convert(i)
    randomize_dsla(h, 0)
    eng = Engine(h, None, EngineConfig(cache_memory_bytes=4 << 20))
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, h.config.vocab_size, (n,), generator=g).tolist() for n in (40, 9)]
    logits = []
    for fused in (False, True):
        eng.runner.fused_decode = fused
        if fused:
            eng.runner._fuse_weights()
            _, kw = eng.runner._prefill_consts(1, h.attention(1).dsla)
            assert kw["qkv_weight"] is not None and (kw["o_weight"] is not None) == (delta_rank > 0)
        reqs = []
        for p in prompts:
            rid = eng.add_request(p, SamplingParams(max_tokens=1, temperature=0))
            req = eng.requests[rid]
            eng.scheduler.waiting.remove(req)
            req.cache = SeqCache(eng.pool, req.conf, req.max_len)
            reqs.append(req)
        a, b = reqs
        out = [eng.runner.forward_pieces(a.conf, [WorkItem(a, 0, 24)], [0]),
               eng.runner.forward_pieces(a.conf, [WorkItem(a, 24, 16), WorkItem(b, 0, 9)], [0, 1])]
        logits.append(torch.cat(out))
        for req in reqs:
            req.cache.free()
            del eng.requests[req.id]
    torch.testing.assert_close(logits[1], logits[0], rtol=1e-4, atol=1e-4)
