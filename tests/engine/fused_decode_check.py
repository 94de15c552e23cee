"""Run under TRITON_INTERPRET=1 (CPU): the CUDA decode step (fused Triton kernels, fused weight
views) against the general piece-wise forward, for attention layers and every DSLA layer form.
Started in a subprocess by test_fused_decode.py, since the interpreter must be chosen before
triton is imported."""
import contextlib
import sys

import torch

from dsla_model.dsla_attention import DSLAConfig
from dsla_model.engine import Engine, EngineConfig, SamplingParams
from kernels import ops
from tests.engine.conftest import padded_decode_inputs, random_prompts, tiny_hybrid


@contextlib.contextmanager
def _projections(kind):
    """The decode projections through the dispatch as is (torch off CUDA), or through the Triton
    GEMV with a small config (interpreted)."""
    if kind == "torch":
        yield
        return
    from kernels import gemv_dispatch
    from kernels.triton_gemv import gemv_triton

    def linear(x, w, w2=None, epi=gemv_dispatch.PLAIN):
        y = gemv_triton(x.contiguous(), w, w2, (16, 32, 4, 2), epi)
        return (y[:, :w.shape[0]], y[:, w.shape[0]:]) if w2 is not None else y

    saved, gemv_dispatch.linear = gemv_dispatch.linear, linear
    try:
        yield
    finally:
        gemv_dispatch.linear = saved


def main():
    torch.set_num_threads(1)
    h = tiny_hybrid(dsla_layers=(1,), heads=4, kv_heads=2, hidden=128)
    # layer 2: output bias; layer 3: low-rank deltas (the op-by-op fallback)
    for layer, cfg in ((2, DSLAConfig(output_bias=True)), (3, DSLAConfig(delta_rank=4))):
        mod = h.new_dsla_module(layer, dsla_config=cfg)
        with torch.no_grad():
            for p in mod.parameters():
                p.add_(torch.randn_like(p) * 0.1)
        h.install(layer, mod)
        h.attention(layer).use_dsla = True
    eng = Engine(h, None, EngineConfig(cache_memory_bytes=4 << 20))
    for p in random_prompts(3, 256, seed=3, hi=40):
        eng.add_request(p, SamplingParams(max_tokens=8, temperature=0))
    eng.step()
    items = eng.scheduler.schedule()
    conf = items[0].req.conf
    saved = [t.clone() for t in (eng.pool.s1, eng.pool.s2, eng.pool.kv)]
    ref = eng.runner.forward_pieces(conf, items, list(range(len(items))))
    after_ref = [t.clone() for t in (eng.pool.s1, eng.pool.s2, eng.pool.kv)]
    for t, s in zip((eng.pool.s1, eng.pool.s2, eng.pool.kv), saved):
        t.copy_(s)
    ids, pos, tables, slots = padded_decode_inputs(items, len(conf.modules), pad_rows=1)
    r = eng.runner
    r.fused_decode = True
    r._fuse_weights()
    # the DSLA ops take their Triton kernels too (interpreted), as they do on CUDA; the projections
    # run once through the dispatch's CPU form (torch epilogues) and once through the Triton GEMV
    use_triton, ops._use_triton = ops._use_triton, lambda t: True
    try:
        for gemv in ("torch", "triton"):
            for t, s in zip((eng.pool.s1, eng.pool.s2, eng.pool.kv), saved):
                t.copy_(s)
            with _projections(gemv):
                out = r.forward_decode(conf, ids, pos, tables, slots)
            torch.testing.assert_close(out[:len(items)], ref, rtol=1e-4, atol=1e-4)
            skip = eng.pool.blocks_per_pair  # group 0 is scratch: padding rows write there
            torch.testing.assert_close(eng.pool.kv[skip:], after_ref[2][skip:], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(eng.pool.s1[1:], after_ref[0][1:], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(eng.pool.s2[1:], after_ref[1][1:], rtol=1e-5, atol=1e-5)
    finally:
        ops._use_triton = use_triton
    t = h.decoder_layers[0].self_attn.teacher
    assert t.q_proj.weight.data_ptr() == r.qkv_w[0].data_ptr()  # fused weights are views, not copies
    print("fused decode matches")
    return 0


if __name__ == "__main__":
    sys.exit(main())
