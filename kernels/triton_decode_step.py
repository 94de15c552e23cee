"""A plain-gates DSLA layer's whole decode step between its input and output GEMVs (Triton).

The engine's decode step used to run three things here: a prep kernel (RoPE on q and k, the
gates' up projections and log decays, written to memory), the slot-pool step of
triton_decode.py, and the head scales as a prologue of the o-projection GEMV. This kernel
does all three in one launch, so the prep launch and its round trip through memory go away
and the o projection is a plain GEMV.

Grid as in triton_decode.py: one program per (sequence, kv head, block of Dv columns). Each
program recomputes its kv head's rotated k and both gates over the full Dk (a few KB from L2,
the same for every Dv block) rather than passing them between programs.

In bf16, for head dims from 64, the results are bitwise those of the three-step path (the @gpu
test in tests/kernels/test_decode_step.py checks it on the Llama-2-7B layer): each value is rounded
to the model dtype where that path stored it (q and k after RoPE, the up projections, the
unscaled output); the gates and the state update run the same operations in the same order
(the update is triton_decode.py's own code); and the sums over Dk run in the same order
because the state tiles keep triton_decode.py's layout (see the load order in the kernel).
In fp16 that held for three of four shapes on an H200 (Triton 3.6) and one came out one ulp
apart: the sum order is the compiler's layout choice, not a guarantee. In fp32 the last bits
can differ: there products are not exact, and which one the compiler fuses into an FMA is its
own choice, made per kernel. Below head dim 64 the gate tiles are
too small for 4 warps to split their rows as the prep kernel's one warp did, and the up
projections sum in another order.

Layouts: qkv [B, Hq*Dk + Hkv*Dk + Hkv*Dv] (q, k, v side by side; unit stride along a row);
t [B, 2R] (both gates' low-rank codes); up weights [Hkv*Dk, R] and biases [Hkv*Dk]; cos, sin
[B, Dk]; head_scale [Hq]; slot pools [num_slots, Hkv, Dk, Dv] (each fp32 or bf16, slots any stride
apart), updated in place.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import triton_alloc
from kernels.reference import decode_step_dims
from kernels.triton_decode import _state_tile, _step_states, check_state_pools


@triton.jit
def _rope(src, c, s, D: tl.constexpr, DT: tl.constexpr):
    """One head of q or k under HF's rotate-half RoPE: x[d] c[d] -+ x[d +- D/2] s[d] in fp32, as
    the prep kernel computed it, rounded to the model dtype (what it stored), returned in fp32."""
    d = tl.arange(0, D)
    x = tl.load(src + d).to(tl.float32)
    partner = tl.load(src + (d + D // 2) % D).to(tl.float32)
    partner = tl.where(d < D // 2, -partner, partner)
    # A product of two 16-bit floats is exact in fp32, so the sum rounds once whichever product
    # the compiler fuses into an FMA: the prep kernel's bits. (Two halves joined into one vector
    # instead moved the state tiles to another layout, and so the sums over Dk to another order.)
    return (x * c + partner * s).to(DT).to(tl.float32)


@triton.jit
def _up_operands(T, Wu, Bu, hk, R, RP: tl.constexpr, D: tl.constexpr):
    """One gate's up-projection operands for kv head hk: the code t [RP], the weight rows
    [D, RP] and the bias [D], in fp32 (R padded to RP with zeros)."""
    rr = tl.arange(0, RP)
    t = tl.load(T + rr, mask=rr < R, other=0.0).to(tl.float32)
    d = tl.arange(0, D)
    wu = tl.load(Wu + (hk * D + d)[:, None] * R + rr[None, :], mask=rr[None, :] < R, other=0.0).to(tl.float32)
    return t, wu, tl.load(Bu + hk * D + d).to(tl.float32)


@triton.jit
def _log_decay(t, wu, bu, gate_norm, gate_floor, DT: tl.constexpr):
    """max(logsigmoid(wu @ t + bu) / norm, floor), the up projection rounded to DT first as in eager."""
    p = (tl.sum(wu * t[None, :], 1) + bu).to(DT).to(tl.float32)
    ls = tl.minimum(p, 0.0) - tl.log(1.0 + tl.exp(-tl.abs(p)))  # logsigmoid, stable
    return tl.maximum(ls / gate_norm, gate_floor)


@triton.jit
def _decode_step_kernel(QKV, T, Wu1, Bu1, Wu2, Bu2, Cos, Sin, w, HS, s1, s2, slots, o,
                        s_qkv, s_t, s_c, ss1, ss2, NS, R, gate_norm, gate_floor, scale,
                        Hkv: tl.constexpr, G: tl.constexpr, Dk: tl.constexpr, Dv: tl.constexpr,
                        BV: tl.constexpr, RP: tl.constexpr):
    ib, hk, dk, dv, _, mv, st1, st2, mst = _state_tile(slots, ss1, ss2, NS, Hkv, Dk, Dv, Dk, BV)
    # Every load is issued before any math, so the state tiles (nearly all of the bytes) are in
    # flight while the RoPE and the gates are computed. The gate operands are loaded before
    # them: in this order Triton (3.9) keeps the state tiles, and the sums over Dk, in the
    # layout triton_decode.py uses; state loads first moved both to the gate tiles' layout,
    # which sums in another order (and costs a shared-memory round trip).
    t1, wu1, bu1 = _up_operands(T + ib * s_t, Wu1, Bu1, hk, R, RP, Dk)
    t2, wu2, bu2 = _up_operands(T + ib * s_t + R, Wu2, Bu2, hk, R, RP, Dk)
    P1 = tl.load(s1 + st1, mask=mst, other=0.)
    P2 = tl.load(s2 + st2, mask=mst, other=0.)
    DT = o.dtype.element_ty
    row = QKV + ib * s_qkv
    c = tl.load(Cos + ib * s_c + dk).to(tl.float32)
    sn = tl.load(Sin + ib * s_c + dk).to(tl.float32)
    HQ = Hkv * G
    kk = _rope(row + (HQ + hk) * Dk, c, sn, Dk, DT)
    vv = tl.load(row + (HQ + Hkv) * Dk + hk * Dv + dv, mask=mv, other=0.).to(tl.float32)
    a1 = tl.exp(_log_decay(t1, wu1, bu1, gate_norm, gate_floor, DT))
    a2 = tl.exp(_log_decay(t2, wu2, bu2, gate_norm, gate_floor, DT))
    M = _step_states(s1, s2, st1, st2, mst, P1, P2, kk, vv, a1, a2, w, scale)
    for gi in tl.static_range(G):
        hq = hk * G + gi
        qq = _rope(row + hq * Dk, c, sn, Dk, DT)
        out = tl.sum(qq[:, None] * M, axis=0).to(DT).to(tl.float32)
        # The head scale as the o projection's prologue applied it: an fp32 product rounded once
        hs = tl.load(HS + hq).to(tl.float32)
        tl.store(o + (ib * HQ + hq) * Dv + dv, (out * hs).to(DT), mask=mv)


def _register_cap(device, programs):
    """maxnreg for this grid. At 4 warps the kernel compiles to 255 registers (Triton 3.6, sm_90):
    two programs per SM. A grid larger than that runs faster capped at 128 (four per SM, a few
    spills): H200, Llama-2-7B layer, us per launch, B=4 13.6 -> 11.7, B=16 43.4 -> 42.4, B=64
    167.7 -> 164.8; a grid that fits in one wave either way is 10% slower capped (B=1: 5.9 ->
    6.5), so it is left alone. The cap changes no arithmetic (the bitwise GPU tests pass both ways)."""
    if device.type != "cuda":
        return {}
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return {"maxnreg": 128} if programs > 2 * sms else {}


def dsla_decode_step_fused(qkv, t, up1, up2, cos, sin, w, head_scale, s1_pool, s2_pool, slots,
                           num_heads, num_kv_heads, gate_norm, gate_floor, scale=None, block_v=32, num_warps=4):
    """See reference.dsla_decode_step for the arguments. Returns o [B,Hq,Dv] in qkv's dtype,
    already multiplied by the head scales; the pools are updated in place. block_v and
    num_warps are for launch sweeps (bench/kernels.py): the defaults are triton_decode.py's,
    which the bitwise equality with the three-step path depends on."""
    B, Hq, Hkv, Dk, Dv, R = decode_step_dims(qkv, t, up1, up2, cos, sin, w, head_scale, s1_pool, s2_pool,
                                             slots, num_heads, num_kv_heads)
    if Dk & (Dk - 1):
        raise ValueError(f"the fused decode step needs a power-of-two head dim, got {Dk}")
    if qkv.stride(1) != 1 or t.stride(1) != 1 or sin.stride() != cos.stride() or cos.stride(1) != 1:
        raise ValueError("qkv, t, cos and sin need unit stride along a row (cos and sin alike)")
    if not all(x.is_contiguous() for x in (*up1, *up2, head_scale)):
        raise ValueError("the up weights, biases and head scales must be contiguous")
    check_state_pools(s1_pool, s2_pool)
    scale = Dk ** -0.5 if scale is None else float(scale)
    o = triton_alloc.empty(B, Hq, Dv, dtype=qkv.dtype, device=qkv.device)
    if B == 0:
        return o
    # BV and num_warps as triton_decode.py launches its kernel: the state tiles must get the
    # same layout there and here, or the sums over Dk would run in another order.
    BV = min(int(block_v), triton.next_power_of_2(Dv))
    _decode_step_kernel[(B, Hkv, triton.cdiv(Dv, BV))](
        qkv, t, *up1, *up2, cos, sin, w.float().contiguous(), head_scale, s1_pool, s2_pool, slots.contiguous(), o,
        qkv.stride(0), t.stride(0), cos.stride(0), s1_pool.stride(0), s2_pool.stride(0), s1_pool.shape[0], R,
        float(gate_norm),
        float(gate_floor), scale,
        Hkv=Hkv, G=Hq // Hkv, Dk=Dk, Dv=Dv, BV=BV, RP=max(16, triton.next_power_of_2(R)), num_warps=int(num_warps),
        **_register_cap(qkv.device, B * Hkv * triton.cdiv(Dv, BV)))
    return o
