"""The ends of a CUDA-graph decode step in one launch each (Triton): what the step reads
before its first GEMV, and the greedy token it writes after the lm_head.

Why: done op by op in torch these were ~20 small kernels per step (embedding gather, the
first RMSNorm's parts, cos/sin gathers, each layer's write block, the argmax, the next
inputs), ~45 us of a 6 ms step on an H200 (bench/results/engine_profile.txt); the torch
forms are in kernels/decode_io.py.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _prologue_kernel(IDS, POS, EMB, NW, COS_T, SIN_T, TABLES, X, HG, SQ, COS, SIN, WBLK, WOFF, LENS,
                     B, L, s_emb, s_tl, s_tb, s_x, s_c, s_ct, BS,
                     H: tl.constexpr, D: tl.constexpr, BH: tl.constexpr, LP: tl.constexpr):
    b = tl.program_id(0)
    if b < B:
        tok = tl.load(IDS + b)
        p = tl.load(POS + b)
        acc = tl.zeros([BH], dtype=tl.float32)
        for h0 in range(0, H, BH):
            hh = h0 + tl.arange(0, BH)
            ok = hh < H
            x = tl.load(EMB + tok * s_emb + hh, mask=ok, other=0.0)
            tl.store(X + b * s_x + hh, x, mask=ok)
            xf = x.to(tl.float32)
            # the product of two 16-bit floats is exact in fp32: one rounding, as in norm_parts
            hg = xf * tl.load(NW + hh, mask=ok, other=0.0).to(tl.float32)
            tl.store(HG + b * s_x + hh, hg.to(HG.dtype.element_ty), mask=ok)
            acc += xf * xf
        tl.store(SQ + b, tl.sum(acc, 0))
        d = tl.arange(0, D)
        tl.store(COS + b * s_c + d, tl.load(COS_T + p * s_ct + d))
        tl.store(SIN + b * s_c + d, tl.load(SIN_T + p * s_ct + d))
        li = tl.arange(0, LP)
        blk = tl.load(TABLES + li * s_tl + b * s_tb + p // BS, mask=li < L, other=0)
        tl.store(WBLK + li * B + b, blk, mask=li < L)
        tl.store(WOFF + b, p % BS)
        tl.store(LENS + b, p + 1)
    else:
        tl.store(SQ + b, 0.0)  # the partial is zero-padded to the GEMV's 16 rows


@triton.jit
def _greedy_kernel(LOGITS, s_l, V, LIVE, IDS, POS, NXT, BV: tl.constexpr):
    b = tl.program_id(0)
    lane = tl.arange(0, BV)
    # a running maximum per lane, reduced across the warps once at the end: two cross-warp
    # reductions per chunk made this launch 8.5 us for 4 x 32000 logits (H200)
    best = tl.full([BV], -float("inf"), tl.float32)
    arg = tl.full([BV], 0, tl.int32)
    for v0 in range(0, V, BV):
        vv = v0 + lane
        x = tl.load(LOGITS + b * s_l + vv, mask=vv < V, other=-float("inf")).to(tl.float32)
        # strictly: on a tie the earlier index keeps it (torch.argmax: the first maximum); a NaN
        # counts as the maximum, as in torch.argmax, and the first one stays
        up = (x > best) | ((x != x) & (best == best))
        arg = tl.where(up, vv, arg)
        best = tl.where(up, x, best)
    nan = best != best
    m = tl.max(tl.where(nan, -float("inf"), best), 0)
    # the first maximum: the smallest index among the lanes holding it (lane 0 holds index 0
    # when every logit is -inf, as torch.argmax returns)
    first = tl.min(tl.where(best == m, arg, V), 0)
    first_nan = tl.min(tl.where(nan, arg, V), 0)  # V when no lane holds a NaN
    first = tl.where(first_nan < V, first_nan, first)
    live = tl.load(LIVE + b)
    tl.store(NXT + b, first.to(tl.int64))
    tl.store(IDS + b, first.to(tl.int64) * live)
    tl.store(POS + b, tl.load(POS + b) + live)
