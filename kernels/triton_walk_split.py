"""The forward's state walk split in time (Triton): P segments of each sequence walk at once.

The walk (`_states_fwd`) is a chain of dependent chunk steps per (sequence, kv head, tile): at
T=16K, 256 steps of ~4 us with the GPU mostly idle. Both states are linear in their start, with
a diagonal decay (per Dk row), so a segment can walk from zero and be corrected afterwards:
    h_c = h_c^local + D_c * S_start(p)        (D_c: the decay from the segment's start to chunk c)
  1. `_states_split_fwd` per (sequence, kv head, tile, segment): the local walk from a zero state,
     storing h^local per chunk, D_c (per Dk row), the segment's local final state L_p and its
     total decay G_p;
  2. `_states_combine` per (sequence, kv head, tile): S_start(0) = s0, S_start(p+1) = G_p S_start(p)
     + L_p over the P segments (the final states are S_start(P));
  3. the output pass adds (q exp(b) D_c) S_start(p) beside (q exp(b)) h_c^local.
Inference only: the backward reads true chunk states, so the training forward walks unsplit.
"""
from __future__ import annotations

import triton
import triton.language as tl

from kernels.triton_chunk_fwd import load_state_pair, store_chunk_states, walk_rows, walk_step


@triton.jit
def _states_split_fwd(k, v, b1, b2, h1, h2, dc1, dc2, L1, L2, G1, G2, cu, coff,
                      Hkv, Dk: tl.constexpr, Dv: tl.constexpr, C: tl.constexpr, BK: tl.constexpr,
                      BV: tl.constexpr, P: tl.constexpr, IEEE: tl.constexpr, SUB: tl.constexpr):
    ik = tl.program_id(0)
    iv = tl.program_id(1)
    pid = tl.program_id(2)
    p = pid % P
    n = pid // P // Hkv
    hk = pid // P % Hkv
    bos = tl.load(cu + n).to(tl.int64)
    eos = tl.load(cu + n + 1).to(tl.int64)
    c0 = tl.load(coff + n).to(tl.int64)
    nc = tl.cdiv(eos - bos, C)
    per = tl.cdiv(nc, P)
    cs = tl.minimum(p * per, nc)
    ce = tl.minimum(cs + per, nc)
    dk = ik * BK + tl.arange(0, BK)
    dv = iv * BV + tl.arange(0, BV)
    mk = dk < Dk
    mv = dv < Dv
    mst = mk[:, None] & mv[None, :]
    S1 = tl.zeros([BK, BV], dtype=tl.float32)
    S2 = tl.zeros([BK, BV], dtype=tl.float32)
    D1 = tl.full([BK], 1.0, tl.float32)
    D2 = tl.full([BK], 1.0, tl.float32)
    for c in range(cs, ce):
        t0 = bos + c * C
        t = t0 + tl.arange(0, C)
        kk, vv, ba, bb = walk_rows(k, v, b1, b2, t, eos, Hkv, hk, Dk, Dv, dk, dv, mk, mv)
        store_chunk_states(h1, h2, S1, S2, c0 + c, Hkv, hk, Dk, Dv, dk, dv, mst)
        if iv == 0:
            doff = ((c0 + c) * Hkv + hk).to(tl.int64) * Dk + dk
            tl.store(dc1 + doff, D1, mask=mk)
            tl.store(dc2 + doff, D2, mask=mk)
        S1, S2, da, db = walk_step(S1, S2, kk, vv, ba, bb, b1, b2, t0, eos, Hkv, hk, Dk, dk, mk, C, SUB, IEEE)
        D1 = D1 * da
        D2 = D2 * db
    seg = (n * Hkv + hk) * P + p
    st = (seg * Dk + dk[:, None]).to(tl.int64) * Dv + dv[None, :]
    tl.store(L1 + st, S1, mask=mst)
    tl.store(L2 + st, S2, mask=mst)
    if iv == 0:
        tl.store(G1 + seg.to(tl.int64) * Dk + dk, D1, mask=mk)
        tl.store(G2 + seg.to(tl.int64) * Dk + dk, D2, mask=mk)


@triton.jit
def _states_combine(s01, s02, L1, L2, G1, G2, Ss1, Ss2, sT1, sT2, Hkv, Dk: tl.constexpr, Dv: tl.constexpr,
                    BK: tl.constexpr, BV: tl.constexpr, P: tl.constexpr, HAS_S0: tl.constexpr):
    """Per (sequence, kv head, tile): each segment's start state Ss [sequences * Hkv * P, Dk, Dv]
    and the final states sT."""
    ik = tl.program_id(0)
    iv = tl.program_id(1)
    nh = tl.program_id(2)
    dk = ik * BK + tl.arange(0, BK)
    dv = iv * BV + tl.arange(0, BV)
    mk = dk < Dk
    mst = mk[:, None] & (dv < Dv)[None, :]
    tile = dk[:, None].to(tl.int64) * Dv + dv[None, :]
    S1, S2 = load_state_pair(s01, s02, nh.to(tl.int64) * Dk * Dv + tile, mst, HAS_S0, BK, BV)
    for p in range(P):
        seg = (nh * P + p).to(tl.int64)
        st = seg * Dk * Dv + tile
        tl.store(Ss1 + st, S1, mask=mst)
        tl.store(Ss2 + st, S2, mask=mst)
        S1 = tl.load(G1 + seg * Dk + dk, mask=mk, other=1.)[:, None] * S1 + tl.load(L1 + st, mask=mst, other=0.)
        S2 = tl.load(G2 + seg * Dk + dk, mask=mk, other=1.)[:, None] * S2 + tl.load(L2 + st, mask=mst, other=0.)
    tl.store(sT1 + nh.to(tl.int64) * Dk * Dv + tile, S1, mask=mst)
    tl.store(sT2 + nh.to(tl.int64) * Dk * Dv + tile, S2, mask=mst)
