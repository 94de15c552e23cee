"""Torch reference forms of the dual-state linear attention (DSLA) recurrence.

Per kv head and for each state i in {1 (history), 2 (recency)}:

    S_i,t = diag(exp(g_i,t)) S_i,t-1 + k_t^T v_t
    o_t   = scale * (w_1 q_t S_1,t + w_2 q_t S_2,t)

Layout (the projections' natural layout, as in flash-linear-attention):
    q        [B, T, Hq, Dk]      Hq = G * Hkv; query head h reads kv head h // G
    k        [B, T, Hkv, Dk]
    v        [B, T, Hkv, Dv]
    g1, g2   [B, T, Hkv, Dk]     log decays (<= 0)
    w        [2]                 mixing weights (softmax of the layer's alpha)
    s1, s2   [B, Hkv, Dk, Dv]    fp32 states; None means zeros
    returns  o [B, T, Hq, Dv] in q's dtype, and the two final fp32 states.

Sharing one state between the query heads of a GQA group keeps the state as
small as the model's KV heads allow.

`dsla_decode_step` adds what surrounds one decode step of a layer with plain
low-rank gates in the engine (RoPE on q and k, the gates' up projections and log
decays, the per-head output scales), rounded where the fused kernel rounds.
"""
from __future__ import annotations

import torch

# What a slot pool may hold. bf16 halves the state traffic of a decode step; each state is then
# rounded to bf16 once per token (the update itself and the output run in fp32). The two pools
# of a layer may differ: the history state in fp32 and the recency state in bf16.
STATE_DTYPES = (torch.float32, torch.bfloat16)


def _check(q, k, v, g1, g2):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("q, k, v must be [B, T, H, D]")
    B, T, Hq, Dk = q.shape
    if k.shape[:2] != (B, T) or v.shape[:2] != (B, T) or k.shape[3] != Dk:
        raise ValueError(f"shape mismatch q{tuple(q.shape)} k{tuple(k.shape)} v{tuple(v.shape)}")
    Hkv = k.shape[2]
    if v.shape[2] != Hkv or Hq % Hkv:
        raise ValueError(f"query heads {Hq} must be a multiple of kv heads {Hkv}")
    if g1.shape != k.shape or g2.shape != k.shape:
        raise ValueError("gates must have k's shape")
    return B, T, Hq, Hkv, Dk, v.shape[3]


def check_mix_weights(w):
    """The two states' mixing weights: exactly two (the kernels read w[0] and w[1])."""
    if w.numel() != 2:
        raise ValueError(f"w must hold the two states' mixing weights, got {w.numel()} values")


def _zeros_state(k, v):
    B, _, H, Dk = k.shape
    return torch.zeros(B, H, Dk, v.shape[3], dtype=torch.float32, device=k.device)


def _grouped(q, Hkv):
    B, T, Hq, Dk = q.shape
    return q.float().reshape(B, T, Hkv, Hq // Hkv, Dk)


def check_states(N, Hkv, Dk, Dv, *states):
    """Initial states must be [N, Hkv, Dk, Dv]: one of batch 1 broadcast silently in torch, and the
    fused kernels read (and the decode wrote) past it."""
    for s in states:
        if s is not None and tuple(s.shape) != (N, Hkv, Dk, Dv):
            raise ValueError(f"states must be [{N}, {Hkv}, {Dk}, {Dv}], got {tuple(s.shape)}")


def check_cu_seqlens(bounds: list, total: int):
    """Sequence offsets rising from 0 to the packed length (else rows go unwritten or are duplicated)."""
    if not bounds or bounds[0] != 0 or bounds[-1] != total or any(b < a for a, b in zip(bounds, bounds[1:])):
        raise ValueError(f"cu_seqlens must rise from 0 to total_T={total}, got {bounds}")


def dsla_recurrent(q, k, v, g1, g2, w, s1=None, s2=None, scale=None):
    """Token-by-token form: the plainest statement of the math."""
    B, T, Hq, Hkv, Dk, Dv = _check(q, k, v, g1, g2)
    check_states(B, Hkv, Dk, Dv, s1, s2)
    check_mix_weights(w)
    scale = Dk ** -0.5 if scale is None else scale
    s1 = _zeros_state(k, v) if s1 is None else s1.float()
    s2 = _zeros_state(k, v) if s2 is None else s2.float()
    qg = _grouped(q, Hkv)
    kf, vf = k.float(), v.float()
    w = w.float()
    outs = []
    for t in range(T):
        kv = kf[:, t, :, :, None] * vf[:, t, :, None, :]
        s1 = torch.exp(g1[:, t].float())[..., None] * s1 + kv
        s2 = torch.exp(g2[:, t].float())[..., None] * s2 + kv
        o = w[0] * torch.einsum("bhgk,bhkv->bhgv", qg[:, t], s1)
        o = o + w[1] * torch.einsum("bhgk,bhkv->bhgv", qg[:, t], s2)
        outs.append(o.reshape(B, Hq, Dv) * scale)
    o = torch.stack(outs, dim=1) if outs else q.new_zeros(B, 0, Hq, Dv, dtype=torch.float32)
    return o.to(q.dtype), s1, s2


def _chunk_one_state(qg, kc, vc, gc, s):
    """One state over chunked inputs; returns (unscaled output, final state).

    qg [B,N,C,H,G,Dk], kc [B,N,C,H,Dk], vc [B,N,C,H,Dv], gc [B,N,C,H,Dk] (fp32).
    Every exponent below is a sum of log decays over a forward span, so it is
    <= 0 and nothing overflows however strong the decay.
    """
    B, N, C = kc.shape[:3]
    b = gc.cumsum(dim=2)  # inclusive cumulative log decay within the chunk
    # intra-chunk scores A[t, s] = sum_d q_t,d k_s,d exp(b_t,d - b_s,d), s <= t
    diff = b[:, :, :, None] - b[:, :, None, :]  # [B,N,C(t),C(s),H,Dk]
    causal = torch.ones(C, C, dtype=torch.bool, device=kc.device).tril()
    diff = diff.masked_fill(~causal[None, None, :, :, None, None], float("-inf"))
    scores = torch.einsum("bntshk,bnthgk,bnshk->bnthgs", diff.exp(), qg, kc)
    intra = torch.einsum("bnthgs,bnshv->bnthgv", scores, vc)
    q_decayed = qg * b.exp()[:, :, :, :, None, :]
    k_to_end = kc * (b[:, :, -1:] - b).exp()  # decay from s to the chunk's end
    chunk_decay = b[:, :, -1].exp()  # [B,N,H,Dk]
    outs = []
    for n in range(N):
        outs.append(torch.einsum("bthgk,bhkv->bthgv", q_decayed[:, n], s))
        s = chunk_decay[:, n, :, :, None] * s + torch.einsum("bshk,bshv->bhkv", k_to_end[:, n], vc[:, n])
    inter = torch.stack(outs, dim=1)
    return intra + inter, s


def dsla_chunk(q, k, v, g1, g2, w, s1=None, s2=None, scale=None, chunk_size=32):
    """Chunked parallel form (prefill and training): matmuls inside chunks,
    a recurrence across chunks. Differentiable through autograd."""
    B, T, Hq, Hkv, Dk, Dv = _check(q, k, v, g1, g2)
    check_states(B, Hkv, Dk, Dv, s1, s2)
    check_mix_weights(w)
    if chunk_size < 1:
        raise ValueError("chunk_size must be >= 1")
    scale = Dk ** -0.5 if scale is None else scale
    s1 = _zeros_state(k, v) if s1 is None else s1.float()
    s2 = _zeros_state(k, v) if s2 is None else s2.float()
    if T == 0 or B == 0:
        return q.new_zeros(B, T, Hq, Dv), s1, s2
    C = min(chunk_size, T)
    pad = (-T) % C
    G = Hq // Hkv

    def chunked(x, zero_pad=True):
        x = x.float()
        if pad:
            x = torch.nn.functional.pad(x, (0,) * (2 * (x.dim() - 2)) + (0, pad))
        return x.reshape(B, (T + pad) // C, C, *x.shape[2:])

    # Padded steps carry k = v = 0 and g = 0: they change neither state.
    qg = chunked(_grouped(q, Hkv).reshape(B, T, Hkv * G, Dk)).reshape(B, -1, C, Hkv, G, Dk)
    kc, vc = chunked(k), chunked(v)
    o1, s1 = _chunk_one_state(qg, kc, vc, chunked(g1), s1)
    o2, s2 = _chunk_one_state(qg, kc, vc, chunked(g2), s2)
    w = w.float()
    o = (w[0] * o1 + w[1] * o2) * scale
    o = o.reshape(B, T + pad, Hq, Dv)[:, :T]
    return o.to(q.dtype), s1, s2


def dsla_step(q, k, v, g1, g2, w, s1, s2, scale=None):
    """One decode step (T == 1). Returns o [B,1,Hq,Dv] and the new states."""
    if q.shape[1] != 1:
        raise ValueError("dsla_step takes exactly one token per sequence")
    return dsla_recurrent(q, k, v, g1, g2, w, s1, s2, scale)


def check_pool_dtypes(s1_pool, s2_pool):
    if s1_pool.dtype not in STATE_DTYPES or s2_pool.dtype not in STATE_DTYPES:
        raise ValueError(f"state pools must each be one of {STATE_DTYPES}, got {s1_pool.dtype} / {s2_pool.dtype}")


def dsla_step_slots(q, k, v, g1, g2, w, s1_pool, s2_pool, slots, scale=None):
    """One decode step over a slot pool, updating the pools in place.

    q [B,Hq,Dk], k/g [B,Hkv,Dk], v [B,Hkv,Dv]; pools [num_slots,Hkv,Dk,Dv] in one of
    STATE_DTYPES; slots [B] int64 distinct slot indices. Returns o [B,Hq,Dv] (from the fp32
    states, before they are rounded to the pools' dtype).
    """
    check_pool_dtypes(s1_pool, s2_pool)
    slots = slots.long()  # index_copy_ takes int64 only; the kernels take either
    s1 = s1_pool.index_select(0, slots)
    s2 = s2_pool.index_select(0, slots)
    o, s1, s2 = dsla_recurrent(q[:, None], k[:, None], v[:, None], g1[:, None], g2[:, None], w, s1, s2, scale)
    s1_pool.index_copy_(0, slots, s1.to(s1_pool.dtype))
    s2_pool.index_copy_(0, slots, s2.to(s2_pool.dtype))
    return o[:, 0]


def decode_step_dims(qkv, t, up1, up2, cos, sin, w, head_scale, s1_pool, s2_pool, slots, num_heads, num_kv_heads):
    """Checks the shapes of dsla_decode_step's arguments; returns (B, Hq, Hkv, Dk, Dv, R)."""
    Hq, Hkv = int(num_heads), int(num_kv_heads)
    if qkv.dim() != 2 or t.dim() != 2 or cos.dim() != 2 or cos.shape != sin.shape:
        raise ValueError("qkv and t must be [B, *], cos and sin [B, Dk]")
    B, Dk = cos.shape
    if Hkv < 1 or Hq % Hkv:
        raise ValueError(f"query heads {Hq} must be a multiple of kv heads {Hkv}")
    if Dk % 2:
        raise ValueError(f"RoPE needs an even head dim, got {Dk}")
    rest = qkv.shape[1] - (Hq + Hkv) * Dk
    if qkv.shape[0] != B or rest <= 0 or rest % Hkv:
        raise ValueError(f"qkv {tuple(qkv.shape)} is not [B, (Hq + Hkv) * Dk + Hkv * Dv] for B={B}, "
                         f"Hq={Hq}, Hkv={Hkv}, Dk={Dk}")
    Dv, R = rest // Hkv, up1[0].shape[-1]
    for wu, bu in (up1, up2):
        if tuple(wu.shape) != (Hkv * Dk, R) or tuple(bu.shape) != (Hkv * Dk,):
            raise ValueError(f"up projections must be weight [{Hkv * Dk}, R] and bias [{Hkv * Dk}]")
    if tuple(t.shape) != (B, 2 * R):
        raise ValueError(f"t must be [B, 2R] = [{B}, {2 * R}], got {tuple(t.shape)}")
    if tuple(head_scale.shape) != (Hq,) or tuple(slots.shape) != (B,):
        raise ValueError("head_scale must be [Hq] and slots [B]")
    check_mix_weights(w)
    for p in (s1_pool, s2_pool):
        if tuple(p.shape[1:]) != (Hkv, Dk, Dv):
            raise ValueError(f"state pools must be [num_slots, {Hkv}, {Dk}, {Dv}], got {tuple(p.shape)}")
    return B, Hq, Hkv, Dk, Dv, R


def _rope_rounded(x, cos, sin):
    """x [B,H,D], cos/sin [B,D]: HF's rotate-half RoPE computed in fp32, rounded to x's dtype once."""
    half = x.shape[-1] // 2
    xf, c, s = x.float(), cos.float()[:, None], sin.float()[:, None]
    lo = xf[..., :half] * c[..., :half] - xf[..., half:] * s[..., :half]
    hi = xf[..., half:] * c[..., half:] + xf[..., :half] * s[..., half:]
    return torch.cat([lo, hi], -1).to(x.dtype)


def _log_decays(code, up, dtype, shape, norm, floor):
    """max(logsigmoid(up(code)) / norm, floor) in fp32, the up projection rounded to `dtype` first."""
    wu, bu = up
    p = (code.float() @ wu.float().T + bu.float()).to(dtype).float()
    return (torch.nn.functional.logsigmoid(p) / norm).clamp_min(floor).view(shape)


def dsla_decode_step(qkv, t, up1, up2, cos, sin, w, head_scale, s1_pool, s2_pool, slots,
                     num_heads, num_kv_heads, gate_norm, gate_floor, scale=None):
    """One decode step of a plain-gates DSLA layer, from its projections to its o projection's input.

    qkv [B, Hq*Dk + Hkv*Dk + Hkv*Dv]: the q, k, v projections side by side; t [B, 2R]: both
    gates' low-rank codes (down projections); up1, up2: (up weight [Hkv*Dk, R], bias [Hkv*Dk]);
    cos, sin [B, Dk]; w [2]; head_scale [Hq]; pools [num_slots, Hkv, Dk, Dv] (STATE_DTYPES), updated in
    place at slots [B] (distinct). Returns o [B, Hq, Dv] in qkv's dtype: the step's output
    rounded to that dtype, times the head scales in fp32, rounded again."""
    B, Hq, Hkv, Dk, Dv, R = decode_step_dims(qkv, t, up1, up2, cos, sin, w, head_scale, s1_pool, s2_pool,
                                             slots, num_heads, num_kv_heads)
    a = (Hq + Hkv) * Dk
    q = _rope_rounded(qkv[:, :Hq * Dk].reshape(B, Hq, Dk), cos, sin)
    k = _rope_rounded(qkv[:, Hq * Dk:a].reshape(B, Hkv, Dk), cos, sin)
    v = qkv[:, a:].reshape(B, Hkv, Dv)
    g1, g2 = (_log_decays(c, up, qkv.dtype, (B, Hkv, Dk), gate_norm, gate_floor)
              for c, up in ((t[:, :R], up1), (t[:, R:], up2)))
    o = dsla_step_slots(q, k, v, g1, g2, w, s1_pool, s2_pool, slots, scale)
    return (o.float() * head_scale.float()[:, None]).to(o.dtype)
