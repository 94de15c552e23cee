"""Host side of the fused Triton DSLA kernels: launches, varlen bookkeeping, autograd.

Public:
    dsla_chunk_fused(q, k, v, g1, g2, w, s1=None, s2=None, scale=None, cu_seqlens=None)
        fixed batch: q [B,T,Hq,Dk] ... states [B,Hkv,Dk,Dv];
        varlen:      q [1,total_T,Hq,Dk] ... with cu_seqlens [N+1], states [N,Hkv,Dk,Dv].
        Returns (o, s1_final, s2_final); differentiable w.r.t. q, k, v, g1, g2, w, s1, s2.
    dsla_decode_fused(...)   (see triton_decode.py)
"""
from __future__ import annotations

import torch
import triton

from kernels import triton_alloc
from kernels.triton_chunk_bwd import _dkv_bwd, _dq_bwd, _states_bwd
from kernels.triton_chunk_fwd import CHUNK, RANGE_MAX, SUB, _output_fwd, _scores_fwd, _scores_fwd_chunk, _states_fwd
from kernels.triton_decode import dsla_decode_fused  # noqa: F401  (re-exported)


class _Plan:
    """Where the chunks are: sequence offsets and a table from global chunk to sequence.
    Built without a host sync for fixed-length batches; varlen needs the lengths once."""

    def __init__(self, cu: torch.Tensor, n_seq: int, lens: list[int] | None, B: int = 0, T: int = 0):
        dev = cu.device
        self.cu = cu.to(torch.int32).contiguous()
        self.n_seq = n_seq
        if lens is None:  # fixed [B, T]
            nc = triton.cdiv(T, CHUNK)
            self.coff = (torch.arange(B + 1, device=dev, dtype=torch.int32) * nc)
            self.cseq = torch.arange(B, device=dev, dtype=torch.int32).repeat_interleave(nc)
            self.n_chunks = B * nc
            self.tok_seq = torch.arange(B, device=dev).repeat_interleave(T)
        else:
            ncs = [triton.cdiv(n, CHUNK) for n in lens]
            offs = [0]
            for x in ncs:
                offs.append(offs[-1] + x)
            self.coff = torch.tensor(offs, device=dev, dtype=torch.int32)
            self.cseq = torch.repeat_interleave(torch.arange(n_seq, device=dev, dtype=torch.int32),
                                                torch.tensor(ncs, device=dev))
            self.n_chunks = offs[-1]
            self.tok_seq = torch.repeat_interleave(torch.arange(n_seq, device=dev), torch.tensor(lens, device=dev))


# num_warps per kernel and the output kernel's Dv block. bench/kernels.py sweeps some of
# these; on an H200 at T=16K (bench/results/kernels.md) states_fwd 4 vs 8 was within noise
# (7.38 vs 7.48 ms) and output_bv 128 beat 64 (6.92 vs 7.37 ms). The rest are untuned:
# 8 warps because these kernels hold fp32 [64, 128] tiles (244-255 registers, no spills).
# scores_per_chunk picks `_scores_fwd_chunk` (one program per chunk; unmeasured) over
# `_scores_fwd` (one per sub-chunk; the measured 4.4 ms of the 6.9 ms forward at T=16K).
LAUNCH = dict(states_fwd=4, scores=8, output=8, output_bv=128, states_bwd=8, dq=8, dkv=8, scores_per_chunk=False,
              states_bk=64, states_bv=64)
_PLANS: dict = {}


def _fixed_plan(B, T, dev):
    """Plans of fixed-length batches are reused: building one costs a few small launches."""
    key = (B, T, str(dev))
    plan = _PLANS.get(key)
    if plan is None:
        if len(_PLANS) > 64:
            _PLANS.clear()
        plan = _PLANS[key] = _Plan(torch.arange(B + 1, device=dev, dtype=torch.int32) * T, B, None, B, T)
    return plan


def _blocks(Dk, Dv):
    # state walks: 64x64 tiles keep both states in registers; smaller tiles give more programs
    # (the walk is sequential over chunks, so parallelism comes only from heads and tiles)
    BKs = max(16, min(LAUNCH["states_bk"], triton.next_power_of_2(Dk)))
    BVs = max(16, min(LAUNCH["states_bv"], triton.next_power_of_2(Dv)))
    BK = max(16, triton.next_power_of_2(Dk))  # chunk-parallel kernels hold the whole Dk
    BV = max(16, triton.next_power_of_2(Dv))
    if BK > 256 or BV > 256:
        raise ValueError("head dims above 256 are not supported by the fused kernels")
    return BKs, BVs, BK, BV


def _states(k, v, g1, g2, s1, s2, plan, Hkv, Dk, Dv, store_h, ieee, h_dtype=None):
    BKs, BVs, _, _ = _blocks(Dk, Dv)
    dev = k.device
    N = plan.n_seq
    sT1 = triton_alloc.empty(N, Hkv, Dk, Dv, dtype=torch.float32, device=dev)
    sT2 = triton_alloc.empty(*sT1.shape, dtype=sT1.dtype, device=sT1.device)
    if store_h:
        h1 = triton_alloc.empty(plan.n_chunks, Hkv, Dk, Dv, dtype=h_dtype or k.dtype, device=dev)
        h2 = triton_alloc.empty(*h1.shape, dtype=h1.dtype, device=h1.device)
    else:
        h1 = h2 = sT1  # unused
    has = s1 is not None
    grid = (triton.cdiv(Dk, BKs), triton.cdiv(Dv, BVs), N * Hkv)
    _states_fwd[grid](k, v, g1, g2, s1 if has else sT1, s2 if has else sT2, h1, h2, sT1, sT2,
                      plan.cu, plan.coff, Hkv, Dk=Dk, Dv=Dv, C=CHUNK, BK=BKs, BV=BVs,
                      HAS_S0=has, STORE_H=store_h, IEEE=ieee, num_warps=LAUNCH["states_fwd"])
    return h1, h2, sT1, sT2


def _forward(q, k, v, g1, g2, w, s1, s2, scale, plan):
    Ttot, Hq, Dk = q.shape
    Hkv, Dv = k.shape[1], v.shape[2]
    ieee = q.dtype == torch.float32
    h1, h2, sT1, sT2 = _states(k, v, g1, g2, s1, s2, plan, Hkv, Dk, Dv, True, ieee)
    _, _, BK, BV = _blocks(Dk, Dv)
    G = Hq // Hkv
    # mixed intra-chunk scores, kept for the backward (dv needs exactly these)
    A = triton_alloc.empty(Ttot, Hq, CHUNK, dtype=v.dtype, device=q.device)
    if LAUNCH["scores_per_chunk"]:
        _scores_fwd_chunk[(plan.n_chunks, Hq)](q, k, g1, g2, w, A, plan.cu, plan.cseq, plan.coff,
                                               Hq, Hkv, G=G, Dk=Dk, C=CHUNK, SUB=SUB, BK=BK,
                                               RANGE_MAX=RANGE_MAX, IEEE=ieee, num_warps=LAUNCH["scores"])
    else:
        _scores_fwd[(plan.n_chunks, Hq, CHUNK // SUB)](q, k, g1, g2, w, A, plan.cu, plan.cseq, plan.coff,
                                                       Hq, Hkv, G=G, Dk=Dk, C=CHUNK, SUB=SUB, BK=BK,
                                                       RANGE_MAX=RANGE_MAX, IEEE=ieee, num_warps=LAUNCH["scores"])
    o = triton_alloc.empty(Ttot, Hq, Dv, dtype=q.dtype, device=q.device)
    BVo = min(BV, LAUNCH["output_bv"])
    _output_fwd[(plan.n_chunks, Hq, triton.cdiv(Dv, BVo))](q, v, g1, g2, w, h1, h2, A, o, plan.cu, plan.cseq,
                                                           plan.coff, scale, Hq, Hkv, G=G, Dk=Dk, Dv=Dv,
                                                           C=CHUNK, BK=BK, BV=BVo, IEEE=ieee, num_warps=LAUNCH["output"])
    return o, sT1, sT2, A


def _reverse_cumsum_per_seq(x, plan):
    """sum_{u >= t, u in t's sequence} x[u] for packed [total_T, ...]; fp64 so the
    difference of two long suffix sums loses nothing."""
    xd = x.double()
    suf = xd.flip(0).cumsum(0).flip(0)
    suf = torch.cat([suf, suf.new_zeros(1, *suf.shape[1:])])
    eos = plan.cu[1:].long()[plan.tok_seq]
    return (suf[:-1] - suf[eos]).float()


def _backward(do, dsT1, dsT2, q, k, v, g1, g2, w, s1, s2, sT1, sT2, A, scale, plan):
    Ttot, Hq, Dk = q.shape
    Hkv, Dv = k.shape[1], v.shape[2]
    G = Hq // Hkv
    dev = q.device
    ieee = q.dtype == torch.float32
    BKs, BVs, BK, BV = _blocks(Dk, Dv)
    # fp32 chunk states for the backward: bf16 snapshots biased dw by ~1% (0.1% in fp32)
    h1, h2, _, _ = _states(k, v, g1, g2, s1, s2, plan, Hkv, Dk, Dv, True, ieee, torch.float32)
    do = do.contiguous()
    N = plan.n_seq
    has_dst = dsT1 is not None or dsT2 is not None
    if has_dst:
        dsT1 = torch.zeros_like(sT1) if dsT1 is None else dsT1.float().contiguous()
        dsT2 = torch.zeros_like(sT2) if dsT2 is None else dsT2.float().contiguous()
    dS1 = triton_alloc.empty(plan.n_chunks, Hkv, Dk, Dv, dtype=torch.float32, device=dev)  # see _one_state_bwd
    dS2 = triton_alloc.empty(*dS1.shape, dtype=dS1.dtype, device=dS1.device)
    ds01 = triton_alloc.empty(N, Hkv, Dk, Dv, dtype=torch.float32, device=dev)
    ds02 = triton_alloc.empty(*ds01.shape, dtype=ds01.dtype, device=ds01.device)
    grid = (triton.cdiv(Dk, BKs), triton.cdiv(Dv, BVs), N * Hkv)
    _states_bwd[grid](q, g1, g2, w, do, dsT1 if has_dst else ds01, dsT2 if has_dst else ds02,
                      dS1, dS2, ds01, ds02, plan.cu, plan.coff, scale, Hq, Hkv, G,
                      Dk=Dk, Dv=Dv, C=CHUNK, BK=BKs, BV=BVs, HAS_DST=has_dst, IEEE=ieee,
                      num_warps=LAUNCH["states_bwd"])
    f32 = dict(dtype=torch.float32, device=dev)
    dq1 = triton_alloc.empty(Ttot, Hq, Dk, **f32)
    dq2 = triton_alloc.empty(Ttot, Hq, Dk, **f32)
    dk1 = triton_alloc.empty(Ttot, Hq, Dk, **f32)
    dk2 = triton_alloc.empty(Ttot, Hq, Dk, **f32)
    dvp = triton_alloc.empty(Ttot, Hq, Dv, **f32)
    dpd = triton_alloc.empty(Ttot, Hq, **f32)
    common = dict(G=G, Dk=Dk, Dv=Dv, C=CHUNK, SUB=SUB, BK=BK, BV=BV, RANGE_MAX=RANGE_MAX, IEEE=ieee)
    _dq_bwd[(plan.n_chunks, Hq, CHUNK // SUB)](q, k, v, g1, g2, h1, h2, do, dq1, dq2, dpd, plan.cu, plan.cseq,
                                               plan.coff, scale, Hq, Hkv, num_warps=LAUNCH["dq"], **common)
    _dkv_bwd[(plan.n_chunks, Hq)](q, k, v, g1, g2, w, A, dS1, dS2, do, dk1, dk2, dvp, plan.cu, plan.cseq,
                                  plan.coff, scale, Hq, Hkv, num_warps=LAUNCH["dkv"], **common)
    # dq1/dq2, dk1/dk2 hold everything but the diagonal pairs s = t, which cancel in
    # the gate gradient; the diagonal enters dq, dk and dw here, in fp32.
    wf = w.float()
    qf = q.float()
    kf = k.float()
    grp = lambda x: x.view(Ttot, Hkv, G, x.shape[-1]).sum(2)  # noqa: E731  (sum over the GQA group)
    kq = kf.repeat_interleave(G, dim=1)  # k of each query head's group
    dpd = dpd[..., None]
    dq = (wf[0] * dq1 + wf[1] * dq2 + (wf[0] + wf[1]) * dpd * kq).to(q.dtype)
    qdq1 = qf * dq1
    qdq2 = qf * dq2
    qk_diag = (dpd * qf * kq).sum()
    dw = torch.stack([qdq1.sum() + qk_diag, qdq2.sum() + qk_diag]).to(w.dtype)
    dq_diag = grp(dpd * qf)
    dk1, dk2 = grp(dk1), grp(dk2)
    dk = (dk1 + dk2 + (wf[0] + wf[1]) * dq_diag).to(k.dtype)
    dv = grp(dvp).to(v.dtype)
    dB1 = wf[0] * grp(qdq1) - kf * dk1
    dB2 = wf[1] * grp(qdq2) - kf * dk2
    dg1 = _reverse_cumsum_per_seq(dB1, plan)
    dg2 = _reverse_cumsum_per_seq(dB2, plan)
    if has_dst:  # the final states carry exp(B_T) in every term
        dg1 = dg1 + (dsT1 * sT1).sum(-1)[plan.tok_seq]
        dg2 = dg2 + (dsT2 * sT2).sum(-1)[plan.tok_seq]
    ds1 = ds01.to(s1.dtype) if s1 is not None else None
    ds2 = ds02.to(s2.dtype) if s2 is not None else None
    return dq, dk, dv, dg1.to(g1.dtype), dg2.to(g2.dtype), dw, ds1, ds2


class _ChunkFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g1, g2, w, s1, s2, scale, plan):
        o, sT1, sT2, A = _forward(q, k, v, g1, g2, w, s1, s2, scale, plan)
        ctx.save_for_backward(q, k, v, g1, g2, w, s1, s2, sT1, sT2, A)
        ctx.scale, ctx.plan = scale, plan
        return o, sT1, sT2

    @staticmethod
    def backward(ctx, do, dsT1, dsT2):
        q, k, v, g1, g2, w, s1, s2, sT1, sT2, A = ctx.saved_tensors
        grads = _backward(do, dsT1, dsT2, q, k, v, g1, g2, w, s1, s2, sT1, sT2, A, ctx.scale, ctx.plan)
        return (*grads, None, None)


def dsla_chunk_fused(q, k, v, g1, g2, w, s1=None, s2=None, scale=None, cu_seqlens=None):
    """Fused chunked DSLA prefill; see the module docstring for layouts."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("q, k, v must be [B, T, H, D]")
    B, T, Hq, Dk = q.shape
    Hkv, Dv = k.shape[2], v.shape[3]
    if Hq % Hkv or k.shape[:2] != (B, T) or v.shape[:3] != (B, T, Hkv) or g1.shape != k.shape or g2.shape != k.shape:
        raise ValueError(f"shape mismatch q{tuple(q.shape)} k{tuple(k.shape)} v{tuple(v.shape)}")
    scale = Dk ** -0.5 if scale is None else float(scale)
    dev = q.device
    if cu_seqlens is None:
        plan = _fixed_plan(B, T, dev)
        N = B
    else:
        if B != 1:
            raise ValueError("varlen inputs are packed as [1, total_T, H, D]")
        lens = cu_seqlens.diff().tolist()
        N = len(lens)
        plan = _Plan(cu_seqlens, N, lens)
    dt = q.dtype
    if T == 0 or N == 0:
        z = torch.zeros(N, Hkv, Dk, Dv, dtype=torch.float32, device=dev)
        o = q.new_zeros(B, T, Hq, Dv)
        return o, (s1.float() if s1 is not None else z), (s2.float() if s2 is not None else z.clone())
    flat = lambda x, d=dt: x.reshape(B * T, x.shape[2], x.shape[3]).to(d).contiguous()  # noqa: E731
    state = lambda s: None if s is None else s.float().contiguous()  # noqa: E731
    o, sT1, sT2 = _ChunkFn.apply(flat(q), flat(k), flat(v), flat(g1, torch.float32), flat(g2, torch.float32),
                                 w.float().contiguous(), state(s1), state(s2), scale, plan)
    return o.view(B, T, Hq, Dv), sT1, sT2
