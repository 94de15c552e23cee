"""Decode attention over a paged KV pool (Triton, split-K "flash decoding").

One program per (sequence, kv head, split): it reads its share of the sequence's
KV blocks once and serves all query heads of the GQA group from them, so each KV
byte crosses memory once per step. Splits keep the GPU busy at small batch and
long context; a small torch epilogue merges them (log-sum-exp). Shapes are
static given the batch, so the call can be captured in a CUDA graph; each
program finds its own work range from the sequence's length at run time.

Layouts: q [B,Hq,D]; kv_pool [num_blocks, 2 (k, v), block_size, Hkv, D];
table [B, max_blocks] int (block ids, row i valid up to ceil(seq_lens[i] / bs));
seq_lens [B] int. Returns o [B,Hq,D] in q's dtype.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _paged_decode_split(Q, KV, Table, Lens, Acc, M, L,
                        s_qb, s_qh, s_kb, s_kk, s_kt, s_kh, s_tb, s_ab, s_ah, s_as,
                        scale, NUM_SPLITS, HQ,
                        G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BS: tl.constexpr,
                        TILE: tl.constexpr):
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
        s = tl.dot(q, tl.trans(k)) * scale  # [GP, TILE] fp32
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    out = Acc + b * s_ab + heads[:, None] * s_ah + split * s_as + d[None, :]
    tl.store(out, acc, mask=g[:, None] < G)
    ml = (b * HQ + heads) * NUM_SPLITS + split  # M and L are [B, Hq, S] contiguous
    tl.store(M + ml, m_i, mask=g < G)
    tl.store(L + ml, l_i, mask=g < G)


def default_splits(batch: int, kv_heads: int, max_len: int, tile: int = 64) -> int:
    """Enough programs to fill ~2 waves of 132 SMs, never more splits than tiles."""
    want = max(1, -(-264 // (batch * kv_heads)))
    return max(1, min(want, -(-max_len // tile), 64))


def paged_decode_attention(q, kv_pool, table, seq_lens, scale, num_splits: int | None = None):
    B, Hq, D = q.shape
    _, two, BS, Hkv, Dk = kv_pool.shape
    assert two == 2 and Dk == D and Hq % Hkv == 0 and q.stride(2) == 1 and kv_pool.is_contiguous()
    G = Hq // Hkv
    TILE = max(64, BS)
    S = num_splits or default_splits(B, Hkv, table.shape[1] * BS, TILE)
    acc = torch.empty(B, Hq, S, D, device=q.device, dtype=torch.float32)
    m = torch.empty(B, Hq, S, device=q.device, dtype=torch.float32)
    lsum = torch.empty(B, Hq, S, device=q.device, dtype=torch.float32)
    _paged_decode_split[(B, Hkv, S)](
        q, kv_pool, table, seq_lens, acc, m, lsum,
        q.stride(0), q.stride(1), kv_pool.stride(0), kv_pool.stride(1), kv_pool.stride(2), kv_pool.stride(3),
        table.stride(0), acc.stride(0), acc.stride(1), acc.stride(2),
        scale, S, Hq, G=G, GP=max(16, triton.next_power_of_2(G)), D=D, BS=BS, TILE=TILE,
        num_warps=4, num_stages=2)
    # merge the splits; an empty split has m = -inf and contributes nothing
    m_max = m.amax(dim=2, keepdim=True)
    w = torch.exp(m - m_max)  # [B,Hq,S]
    num = (acc * w[..., None]).sum(dim=2)
    den = (lsum * w).sum(dim=2)
    return (num / den[..., None]).to(q.dtype)
