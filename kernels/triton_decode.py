"""Fused DSLA decode step over a slot pool (Triton).

One program owns one (sequence, kv head, block of Dv columns): it reads the two
state tiles once (fp32 or bf16 pools; the math is fp32), decays and updates both in registers, writes them back in
place, and produces the mixed output of every query head of the GQA group from
the same registers. Each state byte is read once and written once, which is the
floor for this operation, so the kernel is memory-bound by design.

No host synchronisation: slot indices and mixing weights are read on the device,
shapes are fixed by the inputs, so the launch can be captured in a CUDA graph.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import triton_alloc
from kernels.reference import check_pool_dtypes


@triton.jit
def _state_tile(slots, ss1, ss2, NS, Hkv, Dk: tl.constexpr, Dv: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """This program's sequence, kv head and Dk/Dv indices (grid: sequence, kv head, Dv block),
    its state tile's offsets in the two slot pools [NS slots, Hkv, Dk, Dv] (slot strides ss1,
    ss2 elements: the pools of a pair may differ in dtype, so in stride) and the tile's mask,
    empty for a slot outside the pool (the pools share their bytes with the KV blocks: a stray
    slot would overwrite another sequence's cache; checking on the host would need a sync)."""
    ib = tl.program_id(0)
    hk = tl.program_id(1)
    dk = tl.arange(0, BK)
    dv = tl.program_id(2) * BV + tl.arange(0, BV)
    mk = dk < Dk
    mv = dv < Dv
    slot = tl.load(slots + ib).to(tl.int64)
    sv = slot + 0 * dk  # a vector: the interpreter rejects scalar masks
    inside = mk & (sv >= 0) & (sv < NS)
    inner = (hk * Dk + dk[:, None]) * Dv + dv[None, :]
    return ib, hk, dk, dv, mk, mv, slot * ss1 + inner, slot * ss2 + inner, inside[:, None] & mv[None, :]


@triton.jit
def _step_states(s1, s2, st1, st2, mst, S1, S2, kk, vv, a1, a2, w, scale):
    """Decay the two loaded state tiles, add k^T v, store them back in place; returns the mixed
    state scaled for the output. Shared with triton_decode_step.py so that both kernels do the
    same operations in the same order: that kernel must match this one bit for bit."""
    kv = kk[:, None] * vv[None, :]
    S1 = S1.to(tl.float32) * a1[:, None] + kv
    S2 = S2.to(tl.float32) * a2[:, None] + kv
    # A bf16 pool holds each state rounded once per step; the update and the output use fp32.
    tl.store(s1 + st1, S1.to(s1.dtype.element_ty), mask=mst)
    tl.store(s2 + st2, S2.to(s2.dtype.element_ty), mask=mst)
    # Mixing before the product with q: one reduction per query head, not two.
    return (tl.load(w) * S1 + tl.load(w + 1) * S2) * scale


@triton.jit
def _decode_kernel(q, k, v, g1, g2, w, s1, s2, slots, o, scale, ss1, ss2, NS,
                   Hkv: tl.constexpr, G: tl.constexpr, Dk: tl.constexpr, Dv: tl.constexpr,
                   BK: tl.constexpr, BV: tl.constexpr):
    ib, hk, dk, dv, mk, mv, st1, st2, mst = _state_tile(slots, ss1, ss2, NS, Hkv, Dk, Dv, BK, BV)
    kv_row = ib * Hkv + hk
    kk = tl.load(k + kv_row * Dk + dk, mask=mk, other=0.).to(tl.float32)
    vv = tl.load(v + kv_row * Dv + dv, mask=mv, other=0.).to(tl.float32)
    a1 = tl.exp(tl.load(g1 + kv_row * Dk + dk, mask=mk, other=0.).to(tl.float32))
    a2 = tl.exp(tl.load(g2 + kv_row * Dk + dk, mask=mk, other=0.).to(tl.float32))
    M = _step_states(s1, s2, st1, st2, mst, tl.load(s1 + st1, mask=mst, other=0.),
                     tl.load(s2 + st2, mask=mst, other=0.), kk, vv, a1, a2, w, scale)
    for gi in tl.static_range(G):
        hq = hk * G + gi
        qq = tl.load(q + (ib * Hkv * G + hq) * Dk + dk, mask=mk, other=0.).to(tl.float32)
        out = tl.sum(qq[:, None] * M, axis=0)
        tl.store(o + (ib * Hkv * G + hq) * Dv + dv, out.to(o.dtype.element_ty), mask=mv)


def check_state_pools(s1_pool, s2_pool):
    """Slot pools of one shape, each fp32 or bf16 (reference.STATE_DTYPES), each slot's state
    contiguous; slots may be any stride apart (a pool of fp32 history and bf16 recency states
    interleaves them)."""
    check_pool_dtypes(s1_pool, s2_pool)
    if s1_pool.dim() != 4 or s1_pool.shape != s2_pool.shape:
        raise ValueError(f"state pools must be [num_slots, Hkv, Dk, Dv] of one shape, got "
                         f"{tuple(s1_pool.shape)} / {tuple(s2_pool.shape)}")
    _, Hkv, Dk, Dv = s1_pool.shape
    for p in (s1_pool, s2_pool):
        if p.stride()[1:] != (Dk * Dv, Dv, 1) or p.stride(0) < Hkv * Dk * Dv:
            raise ValueError(f"each slot of a state pool must be one contiguous state, apart from the next; "
                             f"got strides {p.stride()}")


def dsla_decode_fused(q, k, v, g1, g2, w, s1_pool, s2_pool, slots, scale=None):
    """One token per sequence over slot pools [num_slots, Hkv, Dk, Dv] (each fp32 or bf16), updated in place.

    q [B,Hq,Dk], k/g1/g2 [B,Hkv,Dk], v [B,Hkv,Dv], w [2], slots [B] (distinct). Returns o [B,Hq,Dv].
    """
    B, Hq, Dk = q.shape
    Hkv, Dv = k.shape[1], v.shape[2]
    if Hq % Hkv:
        raise ValueError(f"query heads {Hq} must be a multiple of kv heads {Hkv}")
    if (tuple(k.shape) != (B, Hkv, Dk) or g1.shape != k.shape or g2.shape != k.shape or tuple(v.shape[:2]) != (B, Hkv)
            or tuple(slots.shape) != (B,) or w.numel() != 2):
        raise ValueError(f"q{tuple(q.shape)} k{tuple(k.shape)} v{tuple(v.shape)} g{tuple(g1.shape)}/{tuple(g2.shape)} "
                         f"slots{tuple(slots.shape)} w{tuple(w.shape)} do not match")
    check_state_pools(s1_pool, s2_pool)
    if tuple(s1_pool.shape[1:]) != (Hkv, Dk, Dv):
        raise ValueError(f"state pools must be [num_slots, {Hkv}, {Dk}, {Dv}], got {tuple(s1_pool.shape)}")
    scale = Dk ** -0.5 if scale is None else float(scale)
    o = triton_alloc.empty(B, Hq, Dv, dtype=q.dtype, device=q.device)
    if B == 0:
        return o
    BK = triton.next_power_of_2(Dk)
    # 32 columns per program: 128-byte rows of fp32 (64 of bf16: that pool reaches only 43-50% of the
    # copy bandwidth at B >= 16, bench/results/engine_notes.md), enough programs to fill the chip at B=1.
    BV = min(32, triton.next_power_of_2(Dv))
    grid = (B, Hkv, triton.cdiv(Dv, BV))
    _decode_kernel[grid](q.contiguous(), k.contiguous(), v.contiguous(), g1.contiguous(), g2.contiguous(),
                         w.float().contiguous(), s1_pool, s2_pool, slots.contiguous(), o, scale,
                         s1_pool.stride(0), s2_pool.stride(0), s1_pool.shape[0], Hkv=Hkv, G=Hq // Hkv, Dk=Dk, Dv=Dv, BK=BK, BV=BV, num_warps=4)
    return o
