"""The DSLA attention module: what it shares, what it trains, how it starts."""
import torch

from dsla_model.dsla_attention import DSLAConfig
from dsla_model.hybrid import HybridModel
from tests.conftest import tiny_model


def test_trainable_parameters_are_exactly_the_dsla_ones():
    h = HybridModel(tiny_model(hidden=64, heads=4, kv_heads=2))
    h.convert(1)
    dsla = h.attention(1).dsla
    names = {n for n, _ in dsla.named_parameters()}
    assert names == {"gate1.down.weight", "gate1.up.weight", "gate1.up.bias", "gate2.down.weight",
                     "gate2.up.weight", "gate2.up.bias", "alpha", "log_head_scale"}
    teacher_ids = {id(p) for p in h.attention(1).teacher.parameters()}
    assert not teacher_ids & {id(p) for p in dsla.parameters()}
    # q/k/v/o are the teacher's own modules, not copies
    assert dsla.teacher.q_proj is h.attention(1).teacher.q_proj
    # a small addition: gates at rank 16 on a tiny model are still well under the layer's weights
    assert sum(p.numel() for p in dsla.parameters()) < sum(p.numel() for p in dsla.teacher.parameters())


def test_delta_rank_adds_zero_initialised_corrections():
    h = HybridModel(tiny_model(), DSLAConfig(delta_rank=4))
    x = torch.randn(1, 5, 64)
    h.convert(0)
    d = h.attention(0).dsla
    assert set(d.deltas.keys()) == {"q", "k", "v", "o"}
    torch.testing.assert_close(d._proj("q", x), d.teacher.q_proj(x))


def test_history_gate_remembers_longer_than_recency_gate():
    h = HybridModel(tiny_model())
    h.convert(0)
    g1, g2 = h.attention(0).dsla.gates(torch.randn(2, 7, 64))
    assert g1.shape == (2, 7, 2, 16)
    assert (g1 <= 0).all() and (g2 <= 0).all()
    assert g1.mean() > -0.01 and g2.mean() < -0.03  # decays ~1 for history, clearly <1 for recency
    assert torch.softmax(h.attention(0).dsla.alpha, 0).tolist() == [0.5, 0.5]


def test_gqa_state_is_per_kv_head():
    h = HybridModel(tiny_model(heads=4, kv_heads=1))
    h.convert(0)
    cache = h.new_cache()
    h(torch.tensor([[5, 6, 7]]), cache=cache)
    s1, s2 = cache.dsla_state(0)
    assert s1.shape == (1, 1, 16, 16) and s1.dtype == torch.float32


def test_the_layer_computes_the_specified_recurrence():
    """DSLAAttention.forward against the formulas of ARCHITECTURE.md, written out token by token here,
    with the teacher's projections and HF's own RoPE:
        g_i,t = max(logsigmoid(G_i x_t + b_i) / 16, -50),  S_i,t = diag(exp(g_i,t)) S_i,t-1 + k_t^T v_t,
        o_t = (w_1 q_t S_1,t + w_2 q_t S_2,t) / sqrt(Dk), (w_1, w_2) = softmax(alpha),
    then the per-head scales, o_proj (plus its low-rank delta) and the output bias; GQA (query head h
    reads kv head h // G), low-rank deltas on q/k/v/o and initial states included."""
    import torch.nn.functional as F
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from tests.conftest import randomize_dsla

    torch.manual_seed(0)
    h = HybridModel(tiny_model(heads=4, kv_heads=2), DSLAConfig(delta_rank=2, output_bias=True, chunk_size=4))
    h.convert(0)
    randomize_dsla(h, 1)
    m = h.attention(0).dsla
    with torch.no_grad():
        m.alpha.copy_(torch.tensor([0.8, -0.4]))
        m.gate2.up.bias[:3] = -2000.0  # far below the floor: these dims decay by exactly exp(-50)
    B, T, Hq, Hkv, D = 1, 11, 4, 2, 16
    x = torch.randn(B, T, 64)
    cos, sin = h.model.model.rotary_emb(x, torch.arange(T)[None])
    s1_0, s2_0 = torch.randn(B, Hkv, D, D), torch.randn(B, Hkv, D, D)
    with torch.no_grad():
        out, s1, s2 = m(x, cos, sin, s1_0.clone(), s2_0.clone())
        t = m.teacher

        def proj(name, inp):
            return getattr(t, f"{name}_proj")(inp) + m.deltas[name].up(m.deltas[name].down(inp))
        q = proj("q", x).view(B, T, Hq, D).transpose(1, 2)
        k = proj("k", x).view(B, T, Hkv, D).transpose(1, 2)
        v = proj("v", x).view(B, T, Hkv, D)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        gates = [(F.logsigmoid(g.up(g.down(x))) / 16).clamp_min(-50).view(B, T, Hkv, D) for g in (m.gate1, m.gate2)]
        g1, g2 = m.gates(x)
        torch.testing.assert_close(g1, gates[0])
        torch.testing.assert_close(g2, gates[1])
        assert (g2[..., 0, :3] == -50).all()
        w = torch.softmax(torch.tensor([0.8, -0.4]), 0)
        S = [s1_0.clone(), s2_0.clone()]
        o = torch.zeros(B, T, Hq, D)
        for step in range(T):
            for i in range(2):
                S[i] = gates[i][:, step].exp()[..., None] * S[i] + k[:, step, :, :, None] * v[:, step, :, None, :]
            for hq in range(Hq):
                kv = hq // (Hq // Hkv)
                o[:, step, hq] = sum(w[i] * (q[:, step, hq, None, :] @ S[i][:, kv])[:, 0] for i in range(2)) / D ** 0.5
        o = (o * m.log_head_scale.exp()[:, None]).reshape(B, T, Hq * D)
        ref = t.o_proj(o) + m.deltas["o"].up(m.deltas["o"].down(o)) + m.out_bias
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(s1, S[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(s2, S[1], rtol=1e-4, atol=1e-4)


def test_apply_rope_is_hfs_rotate_half():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from dsla_model.dsla_attention import apply_rope

    h = HybridModel(tiny_model())
    x = torch.randn(2, 9, 3, 16)
    cos, sin = h.model.model.rotary_emb(x, torch.arange(9)[None].expand(2, -1))
    want, _ = apply_rotary_pos_emb(x.transpose(1, 2), x.transpose(1, 2), cos, sin)
    torch.testing.assert_close(apply_rope(x, cos, sin), want.transpose(1, 2))
    xb = x.bfloat16()  # in the input's dtype, with fp32 cos / sin
    assert apply_rope(xb, cos, sin).dtype == torch.bfloat16
