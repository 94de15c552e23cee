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
from triton.runtime.errors import OutOfResources

from kernels import triton_alloc
from kernels.reference import check_cu_seqlens, check_mix_weights, check_states
from kernels.triton_chunk_bwd import (_dA_bwd, _dg_finish, _dg_suffix, _dk_bwd, _dq_bwd, _dv_bwd, _inter_bwd,
                                      _states_bwd)
from kernels.triton_chunk_fwd import CHUNK, RANGE_MAX, SUB, _block_cumsum_fwd, _output_fwd, _scores_fwd, _states_fwd
from kernels.triton_decode import dsla_decode_fused  # noqa: F401  (re-exported)
from kernels.triton_walk_out import _walk_out_fwd


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
        else:
            ncs = [triton.cdiv(n, CHUNK) for n in lens]
            offs = [0]
            for x in ncs:
                offs.append(offs[-1] + x)
            self.coff = torch.tensor(offs, device=dev, dtype=torch.int32)
            self.cseq = torch.repeat_interleave(torch.arange(n_seq, device=dev, dtype=torch.int32),
                                                torch.tensor(ncs, device=dev))
            self.n_chunks = offs[-1]


# num_warps per kernel, the state walks' tiles and the output kernel's Dv block.
# bench/kernels.py sweeps them at T=16K and reports what it kept; the values here are the
# ones that measured best there (H200, bench/results/kernels.md). walk_pre: the forward's
# walk reads the scores pass's block cumsums instead of scanning the gates (whole forward
# 3.03 vs 3.45 ms). dq/dk (per 16-row block): num_warps and Dk block. inter: the backward's
# inter-chunk products (warps, Dk block, Dv slice). dA: the backward's dO v^T per chunk.
# suffix_blocks: 16-row blocks per step of the gate gradient's suffix-sum walk (a power of 2).
# <kernel>_stages: software-pipelining depth where Triton's default (3) lost, else None
# (outputs bitwise the same either way). Since dq and dk read dP and the block cumsums
# instead of computing them (session 23, H200, T=16K): dq at Dk block 64 and the default
# depth 1.93 -> 1.38 ms, dk at depth 1 3.29 -> 2.49, states_bwd at 4 warps 1.38 -> 0.97.
# scores_pre: the block cumsums come from a first pass (`_block_cumsum_fwd`, `cumsum` warps) and
# the scores pass reads them instead of scanning each earlier block again (H200, T=16K: 1.22 ms
# -> 0.27 + 0.94, a wash for the training forward). walk_output: inference folds the output pass
# into the walk (triton_walk_out.py; `walk_out` warps, Dv block and depth; its scores pass,
# `scores_fold`, also writes the decayed q and k): 0.91 + 0.66 ms -> 0.85, whole forward 2.79
# -> 2.32 (session 24); with each chunk's decays loaded a chunk ahead the walk takes 0.68 ms and
# the forward 2.16, 2.14 with `scores_fold` at Triton's default depth instead of 2 (session 25).
# A split walk (segments walked at once, then combined) measured 0.82 ms for the walk but 1.05
# for the output pass it fed: removed.
LAUNCH = dict(scores=2, scores_stages=1, states_fwd=4, states_bk=16, states_bv=128, prefetch=False, walk_pre=True,
              scores_pre=False, cumsum=4, walk_output=True, walk_out=4, walk_out_bv=32, walk_out_stages=2,
              scores_fold=2, scores_fold_stages=None,
              output=4, output_bv=128, states_bwd=4, dq=4, dq_bk=64, dq_stages=None, dk=4, dk_bk=32, dk_stages=1,
              dv=8, dv_bv=128, dA=4, dA_bv=128, inter=4, inter_bk=64, inter_bv=64, suffix_blocks=64)
_PLANS: dict = {}
_NO_FOLD: set = set()  # shapes whose folded walk did not fit this device's shared memory


def _launch(kernel: str) -> dict:
    """num_warps (and num_stages where LAUNCH sets `<kernel>_stages`; else Triton's default) of a kernel."""
    stages = LAUNCH.get(kernel + "_stages")
    return dict(num_warps=LAUNCH[kernel], **({} if stages is None else dict(num_stages=stages)))


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


def _states(k, v, g1, g2, s1, s2, plan, Hkv, Dk, Dv, store_h, ieee, h_dtype=None, pre=False):
    """The walk; with pre=True, g1 and g2 are the block cumsums `_scores_fwd` wrote."""
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
                      HAS_S0=has, STORE_H=store_h, PREFETCH=LAUNCH["prefetch"], IEEE=ieee, PRE=pre, SUB=SUB,
                      **_launch("states_fwd"))
    return h1, h2, sT1, sT2


def _walk_out(qe1, qe2, kd1, kd2, v, b1, b2, w, A, s1, s2, scale, plan, Hq, Hkv, Dk, Dv, ieee):
    """The inference walk with the output folded in (triton_walk_out.py): o and the final states."""
    _, _, BK, BV = _blocks(Dk, Dv)
    BVw = min(BV, LAUNCH["walk_out_bv"])
    N = plan.n_seq
    o = triton_alloc.empty(qe1.shape[0], Hq, Dv, dtype=qe1.dtype, device=v.device)
    sT1, sT2 = (triton_alloc.empty(N, Hkv, Dk, Dv, dtype=torch.float32, device=v.device) for _ in range(2))
    has = s1 is not None
    _walk_out_fwd[(1, triton.cdiv(Dv, BVw), N * Hkv)](
        qe1, qe2, kd1, kd2, v, b1, b2, w, A, o, s1 if has else sT1, s2 if has else sT2, sT1, sT2, plan.cu, plan.coff,
        scale, Hq, Hkv, G=Hq // Hkv, Dk=Dk, Dv=Dv, C=CHUNK, SUB=SUB, BK=BK, BV=BVw, HAS_S0=has, IEEE=ieee,
        **_launch("walk_out"))
    return o, sT1, sT2


def _forward(q, k, v, g1, g2, w, s1, s2, scale, plan, h_dtype=None):
    """h_dtype: the chunk states' storage (default q's dtype); fp32 when the backward will read them."""
    Ttot, Hq, Dk = q.shape
    Hkv, Dv = k.shape[1], v.shape[2]
    ieee = q.dtype == torch.float32
    _, _, BK, BV = _blocks(Dk, Dv)
    dev = q.device
    A = triton_alloc.empty(Ttot, Hq, CHUNK, dtype=v.dtype, device=dev)  # mixed scores; the backward's dv reads them
    b1 = triton_alloc.empty(Ttot, Hkv, Dk, dtype=torch.float32, device=dev)
    b2 = triton_alloc.empty(*b1.shape, dtype=b1.dtype, device=dev)
    # inference only (the backward reads the chunk states), and where its pipeline fits
    fold_key = (Hq // Hkv, Dk, Dv, q.dtype, str(dev), LAUNCH["walk_out"], LAUNCH["walk_out_bv"],
                LAUNCH["walk_out_stages"])
    fold = LAUNCH["walk_output"] and h_dtype is None and fold_key not in _NO_FOLD
    pre = LAUNCH["scores_pre"] or fold
    if fold:
        qe1, qe2 = (triton_alloc.empty(*q.shape, dtype=q.dtype, device=dev) for _ in range(2))
        kd1, kd2 = (triton_alloc.empty(*k.shape, dtype=k.dtype, device=dev) for _ in range(2))
        emit = dict(qe1=qe1, qe2=qe2, kd1=kd1, kd2=kd2, EMIT=True)
    else:
        emit = {}
    if pre:
        _block_cumsum_fwd[(plan.n_chunks, Hkv)](g1, g2, b1, b2, plan.cu, plan.cseq, plan.coff, Hkv, Dk=Dk, C=CHUNK,
                                                SUB=SUB, BK=BK, num_warps=LAUNCH["cumsum"])
    _scores_fwd[(plan.n_chunks, Hq, CHUNK // SUB)](q, k, g1, g2, w, A, b1, b2, plan.cu, plan.cseq, plan.coff, Hq, Hkv,
                                                   G=Hq // Hkv, Dk=Dk, C=CHUNK, SUB=SUB, BK=BK, RANGE_MAX=RANGE_MAX,
                                                   IEEE=ieee, B_PRE=pre, **emit,
                                                   **_launch("scores_fold" if fold else "scores"))
    if fold:
        try:
            o, sT1, sT2 = _walk_out(qe1, qe2, kd1, kd2, v, b1, b2, w, A, s1, s2, scale, plan, Hq, Hkv, Dk, Dv, ieee)
            return o, sT1, sT2, A, b1, b2, None, None
        except OutOfResources:
            # its pipeline buffers G query heads' qe and A rows per stage: wide heads, fp32 and large
            # GQA groups can outgrow shared memory; they take the unfused walk and output pass
            _NO_FOLD.add(fold_key)
    if LAUNCH["walk_pre"]:
        h1, h2, sT1, sT2 = _states(k, v, b1, b2, s1, s2, plan, Hkv, Dk, Dv, True, ieee, h_dtype, pre=True)
    else:
        h1, h2, sT1, sT2 = _states(k, v, g1, g2, s1, s2, plan, Hkv, Dk, Dv, True, ieee, h_dtype)
    o = triton_alloc.empty(Ttot, Hq, Dv, dtype=q.dtype, device=dev)
    BVo = min(BV, LAUNCH["output_bv"])
    _output_fwd[(plan.n_chunks, Hq, triton.cdiv(Dv, BVo))](
        q, v, b1, b2, w, h1, h2, A, o, plan.cu, plan.cseq, plan.coff, scale, Hq, Hkv, G=Hq // Hkv, Dk=Dk, Dv=Dv,
        C=CHUNK, BK=BK, BV=BVo, IEEE=ieee, SUB=SUB, **_launch("output"))
    return o, sT1, sT2, A, b1, b2, h1, h2


def _backward(do, dsT1, dsT2, q, k, v, g1, g2, w, s1, s2, sT1, sT2, A, b1, b2, h1, h2, scale, plan):
    Ttot, Hq, Dk = q.shape
    Hkv, Dv = k.shape[1], v.shape[2]
    G = Hq // Hkv
    dev = q.device
    ieee = q.dtype == torch.float32
    BKs, BVs, BK, BV = _blocks(Dk, Dv)
    do = do.contiguous()
    N = plan.n_seq
    has_dst = dsT1 is not None or dsT2 is not None
    if has_dst:
        dsT1 = torch.zeros_like(sT1) if dsT1 is None else dsT1.float().contiguous()
        dsT2 = torch.zeros_like(sT2) if dsT2 is None else dsT2.float().contiguous()
    f32 = dict(dtype=torch.float32, device=dev)
    dS1 = triton_alloc.empty(plan.n_chunks, Hkv, Dk, Dv, **f32)
    dS2 = triton_alloc.empty(*dS1.shape, **f32)
    ds01 = triton_alloc.empty(N, Hkv, Dk, Dv, **f32)
    ds02 = triton_alloc.empty(*ds01.shape, **f32)
    grid = (triton.cdiv(Dk, BKs), triton.cdiv(Dv, BVs), N * Hkv)
    _states_bwd[grid](q, b1, b2, w, do, dsT1 if has_dst else ds01, dsT2 if has_dst else ds02,
                      dS1, dS2, ds01, ds02, plan.cu, plan.coff, scale, Hq, Hkv, G,
                      Dk=Dk, Dv=Dv, C=CHUNK, BK=BKs, BV=BVs, HAS_DST=has_dst, IEEE=ieee, SUB=SUB,
                      **_launch("states_bwd"))
    NB = CHUNK // SUB  # dq and dk: one program per 16-row block and Dk block
    BKq, BKk = min(BK, LAUNCH["dq_bk"]), min(BK, LAUNCH["dk_bk"])
    dq = triton_alloc.empty(Ttot, Hq, Dk, dtype=q.dtype, device=dev)
    dBq1 = triton_alloc.empty(Ttot, Hq, Dk, **f32)
    dBq2 = triton_alloc.empty(Ttot, Hq, Dk, **f32)
    dgl1 = triton_alloc.empty(Ttot, Hkv, Dk, **f32)
    dgl2 = triton_alloc.empty(Ttot, Hkv, Dk, **f32)
    # the inter-chunk terms at M = C rows, into the buffers dq / dk read them from and then overwrite
    BKi = min(BK, LAUNCH["inter_bk"])
    inter = dict(G=G, Dk=Dk, Dv=Dv, C=CHUNK, SUB=SUB, BK=BKi, BV=BV, BVH=min(BV, LAUNCH["inter_bv"]), IEEE=ieee,
                 **_launch("inter"))
    _inter_bwd[(plan.n_chunks, Hq, triton.cdiv(Dk, BKi))](
        do, h1, h2, b1, b2, dBq1, dBq2, plan.cu, plan.cseq, plan.coff, scale, Hq, Hkv, FROM_START=True,
        PRECISE=False, **inter)
    _inter_bwd[(plan.n_chunks, Hkv, triton.cdiv(Dk, BKi))](
        v, dS1, dS2, b1, b2, dgl1, dgl2, plan.cu, plan.cseq, plan.coff, 1.0, Hkv, Hkv, FROM_START=False,
        PRECISE=True, **dict(inter, G=1))
    dA = triton_alloc.empty(Ttot, Hq, CHUNK, **f32)
    dpd = triton_alloc.empty(Ttot, Hq, **f32)
    _dA_bwd[(plan.n_chunks, Hq)](do, v, dA, dpd, plan.cu, plan.cseq, plan.coff, scale, Hq, Hkv, G=G, Dv=Dv,
                                 C=CHUNK, BV=min(BV, LAUNCH["dA_bv"]), IEEE=ieee, **_launch("dA"))
    blk = dict(G=G, Dk=Dk, C=CHUNK, SUB=SUB, RANGE_MAX=RANGE_MAX, IEEE=ieee)
    dwp = triton_alloc.empty(plan.n_chunks * NB, Hq, triton.cdiv(Dk, BKq), 2, **f32)
    _dq_bwd[(plan.n_chunks * NB, Hq, triton.cdiv(Dk, BKq))](
        q, k, g1, g2, b1, b2, w, dA, dpd, dq, dBq1, dBq2, dwp, plan.cu, plan.cseq, plan.coff, Hq, Hkv,
        BK=BKq, **_launch("dq"), **blk)
    dv = triton_alloc.empty(Ttot, Hkv, Dv, dtype=v.dtype, device=dev)
    BVd = min(BV, LAUNCH["dv_bv"])
    _dv_bwd[(plan.n_chunks, Hkv, triton.cdiv(Dv, BVd))](k, b1, b2, A, dS1, dS2, do, dv, plan.cu, plan.cseq,
                                                        plan.coff, scale, Hq, Hkv, G=G, Dk=Dk, Dv=Dv, C=CHUNK,
                                                        BK=BK, BV=BVd, IEEE=ieee, SUB=SUB, **_launch("dv"))
    dk = triton_alloc.empty(Ttot, Hkv, Dk, dtype=k.dtype, device=dev)
    tot1 = triton_alloc.empty(plan.n_chunks, NB, Hkv, Dk, **f32)
    tot2 = triton_alloc.empty(*tot1.shape, **f32)
    _dk_bwd[(plan.n_chunks * NB, Hkv, triton.cdiv(Dk, BKk))](
        q, k, g1, g2, b1, b2, w, dA, dpd, dBq1, dBq2, dk, dgl1, dgl2, tot1, tot2, plan.cu, plan.cseq, plan.coff,
        Hq, Hkv, BK=BKk, **_launch("dk"), **blk)
    dw = dwp.sum((0, 1, 2)).to(w.dtype)
    dgs = []
    for dgl, tot, dsT, sT, g in ((dgl1, tot1, dsT1, sT1, g1), (dgl2, tot2, dsT2, sT2, g2)):
        # per block: the later blocks' totals of its sequence, plus (the final states carry exp(B_T)
        # in every term) the final state's term
        fin = (dsT * sT).sum(-1).contiguous() if has_dst else tot
        suf = triton_alloc.empty(*tot.shape, **f32)
        _dg_suffix[(N, Hkv)](tot, fin, suf, plan.coff, Hkv, Dk=Dk, NB=NB, BK=BK, TB=LAUNCH["suffix_blocks"],
                             HAS_FIN=has_dst, num_warps=4)
        dg = triton_alloc.empty(Ttot, Hkv, Dk, dtype=g.dtype, device=dev)
        _dg_finish[(plan.n_chunks, Hkv)](dgl, suf, dg, plan.cu, plan.cseq, plan.coff,
                                         Hkv, Dk=Dk, C=CHUNK, SUB=SUB, BK=BK, num_warps=4)
        dgs.append(dg)
    ds1 = ds01.to(s1.dtype) if s1 is not None else None
    ds2 = ds02.to(s2.dtype) if s2 is not None else None
    return dq, dk, dv, dgs[0], dgs[1], dw, ds1, ds2


class _ChunkFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g1, g2, w, s1, s2, scale, plan):
        # When a gradient is wanted the forward keeps its chunk states in fp32 for the backward
        # (bf16 snapshots biased dw by ~1%, 0.1% in fp32) instead of the backward walking them
        # again; the output kernel rounds them to q's dtype either way, so o does not change.
        # b1, b2 (fp32 block cumsums, the size of g1, g2) are kept too: no gate scans later.
        h_dtype = torch.float32 if any(ctx.needs_input_grad) else None
        o, sT1, sT2, A, b1, b2, h1, h2 = _forward(q, k, v, g1, g2, w, s1, s2, scale, plan, h_dtype)
        ctx.save_for_backward(q, k, v, g1, g2, w, s1, s2, sT1, sT2, A, b1, b2, h1, h2)
        ctx.scale, ctx.plan = scale, plan
        return o, sT1, sT2

    @staticmethod
    def backward(ctx, do, dsT1, dsT2):
        q, k, v, g1, g2, w, s1, s2, sT1, sT2, A, b1, b2, h1, h2 = ctx.saved_tensors
        grads = _backward(do, dsT1, dsT2, q, k, v, g1, g2, w, s1, s2, sT1, sT2, A, b1, b2, h1, h2, ctx.scale,
                          ctx.plan)
        return (*grads, None, None)


def dsla_chunk_fused(q, k, v, g1, g2, w, s1=None, s2=None, scale=None, cu_seqlens=None):
    """Fused chunked DSLA prefill; see the module docstring for layouts."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("q, k, v must be [B, T, H, D]")
    B, T, Hq, Dk = q.shape
    Hkv, Dv = k.shape[2], v.shape[3]
    if (Hq % Hkv or k.shape[:2] != (B, T) or k.shape[3] != Dk or v.shape[:3] != (B, T, Hkv) or g1.shape != k.shape
            or g2.shape != k.shape):
        raise ValueError(f"shape mismatch q{tuple(q.shape)} k{tuple(k.shape)} v{tuple(v.shape)}")
    check_mix_weights(w)
    scale = Dk ** -0.5 if scale is None else float(scale)
    dev = q.device
    for name, x in (("k", k), ("v", v), ("g1", g1), ("g2", g2), ("w", w), ("s1", s1), ("s2", s2)):
        if x is not None and x.device != dev:  # the kernels would read another device's pointers
            raise ValueError(f"{name} is on {x.device}, q on {dev}")
    if cu_seqlens is None:
        plan = _fixed_plan(B, T, dev)
        N = B
    else:
        if B != 1:
            raise ValueError("varlen inputs are packed as [1, total_T, H, D]")
        if cu_seqlens.dim() != 1 or cu_seqlens.dtype.is_floating_point or cu_seqlens.dtype == torch.bool:
            raise ValueError(f"cu_seqlens must be a 1-D integer tensor, got {cu_seqlens.dtype} {tuple(cu_seqlens.shape)}")
        cu_seqlens = cu_seqlens.to(dev)
        bounds = cu_seqlens.tolist()
        check_cu_seqlens(bounds, T)
        lens = [b - a for a, b in zip(bounds, bounds[1:])]
        N = len(lens)
        plan = _Plan(cu_seqlens, N, lens)
    check_states(N, Hkv, Dk, Dv, s1, s2)
    # fp16 runs in fp32: the kernels factor a block's decay as exp(+-b) up to exp(RANGE_MAX) = 1e26,
    # which bf16 and fp32 hold and fp16 (max 65504) does not
    dt = torch.float32 if q.dtype == torch.float16 else q.dtype
    if (s1 is None) != (s2 is None):  # one initial state given: the other starts at zero
        z = torch.zeros(N, Hkv, Dk, Dv, dtype=torch.float32, device=dev)
        s1, s2 = (z if s1 is None else s1), (z if s2 is None else s2)
    if T == 0 or N == 0:
        z = torch.zeros(N, Hkv, Dk, Dv, dtype=torch.float32, device=dev)
        o = q.new_zeros(B, T, Hq, Dv)
        return o, (s1.float() if s1 is not None else z), (s2.float() if s2 is not None else z.clone())
    flat = lambda x, d=dt: x.reshape(B * T, x.shape[2], x.shape[3]).to(d).contiguous()  # noqa: E731
    state = lambda s: None if s is None else s.float().contiguous()  # noqa: E731
    args = (flat(q), flat(k), flat(v), flat(g1, torch.float32), flat(g2, torch.float32), w.float().contiguous(),
            state(s1), state(s2))
    if torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in args):
        o, sT1, sT2 = _ChunkFn.apply(*args, scale, plan)
    else:  # inference (the engine's prefill pieces): autograd's Function machinery costs ~30 us a call on the host
        o, sT1, sT2 = _forward(*args, scale, plan)[:3]
    return o.view(B, T, Hq, Dv).to(q.dtype), sT1, sT2
