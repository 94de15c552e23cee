"""The engine's decode-step kernels over a paged KV pool (Triton).

  - `paged_decode_attention`: split-K ("flash decoding") attention of one query
    token per sequence over its KV blocks. One program per (sequence, kv head,
    split) reads its share of the blocks once and serves every query head of the
    GQA group from them, so each KV byte crosses memory once per step. Splits keep
    the GPU busy at small batch and long context; a second small kernel merges
    them (log-sum-exp).
  - `rope_and_cache_write`: RoPE on q and k, and k, v stored into each sequence's
    current block slot: one launch instead of a dozen small ones.
  - `add_rms_norm`, `silu_mul`: the residual add fused with the next RMSNorm (HF
    Llama semantics: statistics in fp32, weight applied in the model dtype), and
    SiLU(gate) * up. The engine now does both in its projections' epilogues
    (triton_gemv.py); these stay as the separate-kernel form bench/gemv_chain.py
    compares against.
A decode step of a 7B model is ~1500 tiny launches when written op by op; even
inside a CUDA graph each costs ~2 us, a large share of a ~5 ms step. These kernels
and the GEMV epilogues cut most of them. Shapes are fixed by the batch and every program finds its
work from device-side lengths, so everything here can be captured in a graph.

Layouts: q [B,Hq,D]; kv_pool [num_blocks, 2 (k, v), block_size, Hkv, D];
table [B, max_blocks] int (block ids, valid up to ceil(seq_lens[i] / bs));
seq_lens [B] int.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _paged_decode_split(Q, KV, Table, Lens, Acc, M, L,
                        s_qb, s_qh, s_kb, s_kk, s_kt, s_kh, s_tb,
                        scale, NUM_SPLITS, HQ,
                        G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BS: tl.constexpr,
                        TILE: tl.constexpr, PREC: tl.constexpr):
    b = tl.program_id(0)
    hkv = tl.program_id(1)
    split = tl.program_id(2)
    length = tl.load(Lens + b).to(tl.int32)
    n_tiles = tl.cdiv(length, TILE)
    per_split = tl.cdiv(n_tiles, NUM_SPLITS)
    t0 = split * per_split
    t1 = tl.minimum(t0 + per_split, n_tiles)

    g = tl.arange(0, GP)
    d = tl.arange(0, D)
    heads = hkv * G + g
    q = tl.load(Q + b * s_qb + heads[:, None] * s_qh + d[None, :], mask=g[:, None] < G, other=0.0)
    m_i = tl.full([GP], float("-inf"), tl.float32)
    l_i = tl.zeros([GP], tl.float32)
    acc = tl.zeros([GP, D], tl.float32)
    for t in range(t0, t1):
        pos = t * TILE + tl.arange(0, TILE)
        valid = pos < length
        blk = tl.load(Table + b * s_tb + pos // BS, mask=valid, other=0).to(tl.int64)
        base = blk * s_kb + (pos % BS).to(tl.int64) * s_kt + hkv * s_kh
        k = tl.load(KV + base[:, None] + d[None, :], mask=valid[:, None], other=0.0)
        v = tl.load(KV + s_kk + base[:, None] + d[None, :], mask=valid[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale  # [GP, TILE] fp32
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m_i = m_new
    row = (b * HQ + heads) * NUM_SPLITS + split  # Acc [B,Hq,S,D], M and L [B,Hq,S], contiguous
    tl.store(Acc + row[:, None] * D + d[None, :], acc, mask=g[:, None] < G)
    tl.store(M + row, m_i, mask=g < G)
    tl.store(L + row, l_i, mask=g < G)


@triton.jit
def _merge_splits(Acc, M, L, O, NUM_SPLITS, SP: tl.constexpr, D: tl.constexpr):
    r = tl.program_id(0)  # one (sequence, query head)
    s = tl.arange(0, SP)
    d = tl.arange(0, D)
    ok = s < NUM_SPLITS
    m = tl.load(M + r * NUM_SPLITS + s, mask=ok, other=float("-inf"))
    lsum = tl.load(L + r * NUM_SPLITS + s, mask=ok, other=0.0)
    acc = tl.load(Acc + (r * NUM_SPLITS + s)[:, None] * D + d[None, :], mask=ok[:, None], other=0.0)
    w = tl.exp(m - tl.max(m, 0))  # an empty split has m = -inf: weight 0
    w = tl.where(ok, w, 0.0)
    out = tl.sum(acc * w[:, None], 0) / tl.sum(lsum * w, 0)
    tl.store(O + r * D + d, out.to(O.dtype.element_ty))


def default_splits(batch: int, kv_heads: int, max_len: int, tile: int = 64) -> int:
    """Enough programs for ~2 waves of 132 SMs, never more splits than tiles."""
    want = max(1, -(-264 // (batch * kv_heads)))
    return max(1, min(want, -(-max_len // tile), 64))


def paged_decode_attention(q, kv_pool, table, seq_lens, scale, num_splits: int | None = None):
    """q [B,Hq,D] -> o [B,Hq,D] in q's dtype."""
    B, Hq, D = q.shape
    _, two, BS, Hkv, Dk = kv_pool.shape
    # checked, not asserted (python -O drops asserts): each would be a wrong read, not an error
    if two != 2 or Dk != D or Hq % Hkv or D & (D - 1) or q.stride(2) != 1 or not kv_pool.is_contiguous():
        raise ValueError(f"q [B, Hq, D] with unit stride over D (a power of two) and a contiguous pool [N, 2, bs, "
                         f"Hkv, D] with Hq % Hkv == 0: got q{tuple(q.shape)} pool{tuple(kv_pool.shape)}")
    if table.dim() != 2 or table.shape[0] != B or table.stride(1) != 1 or tuple(seq_lens.shape) != (B,):
        raise ValueError(f"table must be [B, max_blocks] with unit stride along a row and seq_lens [B]: got "
                         f"table{tuple(table.shape)} stride {table.stride()}, seq_lens{tuple(seq_lens.shape)}")
    G = Hq // Hkv
    TILE = max(64, BS)
    S = num_splits or default_splits(B, Hkv, table.shape[1] * BS, TILE)
    acc = torch.empty(B, Hq, S, D, device=q.device, dtype=torch.float32)
    m = torch.empty(B, Hq, S, device=q.device, dtype=torch.float32)
    lsum = torch.empty(B, Hq, S, device=q.device, dtype=torch.float32)
    _paged_decode_split[(B, Hkv, S)](
        q, kv_pool, table, seq_lens, acc, m, lsum,
        q.stride(0), q.stride(1), kv_pool.stride(0), kv_pool.stride(1), kv_pool.stride(2), kv_pool.stride(3),
        table.stride(0), scale, S, Hq,
        G=G, GP=max(16, triton.next_power_of_2(G)), D=D, BS=BS, TILE=TILE,
        PREC="ieee" if q.dtype == torch.float32 else None, num_warps=4, num_stages=2)  # fp32: no TF32 shortcut
    o = torch.empty(B, Hq, D, device=q.device, dtype=q.dtype)
    _merge_splits[(B * Hq,)](acc, m, lsum, o, S, SP=triton.next_power_of_2(S), D=D, num_warps=2)
    return o


@triton.jit
def _rope_write(Q, K, V, Cos, Sin, QO, KV, Blk, Off, s_qb, s_kb, s_cb, s_pb, s_pk, s_pt,
                HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)  # 0..HQ-1: query heads; HQ..HQ+HKV-1: kv heads
    half = tl.arange(0, D // 2)
    c1 = tl.load(Cos + b * s_cb + half).to(tl.float32)
    c2 = tl.load(Cos + b * s_cb + D // 2 + half).to(tl.float32)
    s1 = tl.load(Sin + b * s_cb + half).to(tl.float32)
    s2 = tl.load(Sin + b * s_cb + D // 2 + half).to(tl.float32)
    if h < HQ:
        src = Q + b * s_qb + h * D
        x1 = tl.load(src + half).to(tl.float32)
        x2 = tl.load(src + D // 2 + half).to(tl.float32)
        dst = QO + (b * HQ + h) * D
        tl.store(dst + half, (x1 * c1 - x2 * s1).to(QO.dtype.element_ty))
        tl.store(dst + D // 2 + half, (x2 * c2 + x1 * s2).to(QO.dtype.element_ty))
    else:
        hk = h - HQ
        src = K + b * s_kb + hk * D
        x1 = tl.load(src + half).to(tl.float32)
        x2 = tl.load(src + D // 2 + half).to(tl.float32)
        blk = tl.load(Blk + b).to(tl.int64)
        off = tl.load(Off + b).to(tl.int64)
        dst = KV + blk * s_pb + off * s_pt + hk * D
        tl.store(dst + half, (x1 * c1 - x2 * s1).to(KV.dtype.element_ty))
        tl.store(dst + D // 2 + half, (x2 * c2 + x1 * s2).to(KV.dtype.element_ty))
        d = tl.arange(0, D)
        vv = tl.load(V + b * s_kb + hk * D + d)
        tl.store(dst + s_pk + d, vv.to(KV.dtype.element_ty))


def rope_and_cache_write(q, k, v, cos, sin, kv_pool, blk, off):
    """q [B,Hq*D], k, v [B,Hkv*D] (rows contiguous); cos, sin [B,D]; writes rotated k and v
    at (blk[b], off[b]) of the pool and returns the rotated q [B,Hq,D]."""
    B = q.shape[0]
    _, _, _, Hkv, D = kv_pool.shape
    Hq = q.shape[1] // D
    if (q.shape[1] % D or D & (D - 1) or tuple(k.shape) != (B, Hkv * D) or tuple(v.shape) != (B, Hkv * D)
            or tuple(cos.shape) != (B, D) or sin.shape != cos.shape):
        raise ValueError(f"q [B, Hq*D], k and v [B, {Hkv}*D], cos and sin [B, D] for D = {D} (a power of two): got "
                         f"q{tuple(q.shape)} k{tuple(k.shape)} v{tuple(v.shape)} cos{tuple(cos.shape)}")
    if (q.stride(1) != 1 or k.stride(1) != 1 or v.stride(1) != 1 or k.stride(0) != v.stride(0)
            or cos.stride(1) != 1 or sin.stride() != cos.stride()):
        raise ValueError("q, k, v, cos and sin need unit stride along a row, k and v one row stride, cos and sin "
                         "the same strides (the kernel reads them with one set)")
    qo = torch.empty(B, Hq, D, device=q.device, dtype=q.dtype)
    _rope_write[(B, Hq + Hkv)](q, k, v, cos, sin, qo, kv_pool, blk, off,
                               q.stride(0), k.stride(0), cos.stride(0),
                               kv_pool.stride(0), kv_pool.stride(1), kv_pool.stride(2),
                               HQ=Hq, HKV=Hkv, D=D, num_warps=1)
    return qo


@triton.jit
def _add_rms_norm(X, Dx, W, XO, NO, H, eps, HAS_D: tl.constexpr, BLOCK: tl.constexpr):
    r = tl.program_id(0)
    c = tl.arange(0, BLOCK)
    ok = c < H
    x = tl.load(X + r * H + c, mask=ok, other=0.0)
    if HAS_D:
        x = x + tl.load(Dx + r * H + c, mask=ok, other=0.0)  # rounded to the model dtype, as HF does
        tl.store(XO + r * H + c, x, mask=ok)
    xf = x.to(tl.float32)
    inv = tl.rsqrt(tl.sum(xf * xf, 0) / H + eps)
    y = (xf * inv).to(NO.dtype.element_ty)
    w = tl.load(W + c, mask=ok, other=0.0)
    tl.store(NO + r * H + c, (w * y).to(NO.dtype.element_ty), mask=ok)


def add_rms_norm(x, delta, weight, eps):
    """(x + delta, rmsnorm(x + delta) * weight) for x, delta [B,H] contiguous; delta may be None
    (then x is returned as is)."""
    B, H = x.shape
    if not x.is_contiguous() or (delta is not None and (not delta.is_contiguous() or delta.shape != x.shape)):
        raise ValueError("x and delta must be contiguous [B, H] of one shape")
    normed = torch.empty_like(x)
    xo = torch.empty_like(x) if delta is not None else x
    _add_rms_norm[(B,)](x, delta if delta is not None else x, weight, xo, normed, H, eps,
                        HAS_D=delta is not None, BLOCK=triton.next_power_of_2(H), num_warps=8)
    return xo, normed


@triton.jit
def _silu_mul(X, O, I, BLOCK: tl.constexpr):
    r = tl.program_id(0)
    c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = c < I
    g = tl.load(X + r * 2 * I + c, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(X + r * 2 * I + I + c, mask=ok, other=0.0).to(tl.float32)
    tl.store(O + r * I + c, (g / (1.0 + tl.exp(-g)) * u).to(O.dtype.element_ty), mask=ok)


def silu_mul(x):
    """x [B, 2I] = [gate | up] -> silu(gate) * up [B, I] (the Llama MLP's middle)."""
    B, I2 = x.shape
    if I2 % 2 or not x.is_contiguous():
        raise ValueError(f"x must be a contiguous [B, 2I] = [gate | up], got {tuple(x.shape)} stride {x.stride()}")
    I = I2 // 2
    o = torch.empty(B, I, device=x.device, dtype=x.dtype)
    _silu_mul[(B, triton.cdiv(I, 1024))](x, o, I, BLOCK=1024, num_warps=4)
    return o
