"""One entry point per DSLA operation.

On CUDA tensors the fused Triton kernels run when they are available; elsewhere
(and when DSLA_KERNELS=reference) the torch reference forms run. Callers never
choose a backend themselves.
"""
from __future__ import annotations

import os

import torch

from kernels import reference


def _use_triton(t: torch.Tensor) -> bool:
    if not t.is_cuda or os.environ.get("DSLA_KERNELS", "auto") == "reference":
        return False
    try:
        import kernels.triton_dsla  # noqa: F401
    except ImportError:
        return False
    return True


def dsla_prefill(q, k, v, g1, g2, w, s1=None, s2=None, scale=None, chunk_size=32):
    """Whole-sequence (or sequence-piece) form; differentiable. See reference.py for layouts.

    `chunk_size` only steers the reference form: the fused kernel fixes its own chunking."""
    if _use_triton(q):
        from kernels.triton_dsla import dsla_chunk_fused

        return dsla_chunk_fused(q, k, v, g1, g2, w, s1, s2, scale)
    return reference.dsla_chunk(q, k, v, g1, g2, w, s1, s2, scale, chunk_size)


def dsla_prefill_varlen(q, k, v, g1, g2, w, cu_seqlens, s1=None, s2=None, scale=None, chunk_size=32):
    """Ragged batch packed as [1, total_T, H, D] with offsets cu_seqlens [N+1] (as in
    flash-linear-attention); states are [N, Hkv, Dk, Dv]. Returns (o [1,total_T,Hq,Dv], s1, s2).
    Differentiable."""
    if _use_triton(q):
        from kernels.triton_dsla import dsla_chunk_fused

        return dsla_chunk_fused(q, k, v, g1, g2, w, s1, s2, scale, cu_seqlens=cu_seqlens)
    bounds = cu_seqlens.tolist()
    reference.check_cu_seqlens(bounds, q.shape[1])
    reference.check_states(len(bounds) - 1, k.shape[2], k.shape[3], v.shape[3], s1, s2)
    outs, f1, f2 = [], [], []
    for n in range(len(bounds) - 1):
        a, b = bounds[n], bounds[n + 1]
        sl = lambda x: x[:, a:b]  # noqa: E731
        st = lambda s: None if s is None else s[n:n + 1]  # noqa: E731
        o, x1, x2 = reference.dsla_chunk(sl(q), sl(k), sl(v), sl(g1), sl(g2), w, st(s1), st(s2), scale, chunk_size)
        outs.append(o)
        f1.append(x1)
        f2.append(x2)
    if not outs:
        z = torch.zeros(0, k.shape[2], k.shape[3], v.shape[3], dtype=torch.float32, device=q.device)
        return q.new_zeros(1, 0, q.shape[2], v.shape[3]), z, z.clone()
    return torch.cat(outs, 1), torch.cat(f1), torch.cat(f2)


def dsla_decode(q, k, v, g1, g2, w, s1, s2, scale=None):
    """One token per sequence with per-batch states; returns (o [B,1,Hq,Dv], s1, s2) (new states)."""
    reference.check_states(q.shape[0], k.shape[2], k.shape[3], v.shape[3], s1, s2)
    if _use_triton(q) and q.shape[1] == 1:
        from kernels.triton_dsla import dsla_decode_fused

        B = q.shape[0]
        fresh = lambda s: (torch.zeros(B, k.shape[2], k.shape[3], v.shape[3], dtype=torch.float32,  # noqa: E731
                                       device=q.device) if s is None else s.float().clone().contiguous())
        n1, n2 = fresh(s1), fresh(s2)
        slots = torch.arange(B, device=q.device)
        o = dsla_decode_fused(q[:, 0], k[:, 0], v[:, 0], g1[:, 0], g2[:, 0], w, n1, n2, slots, scale)
        return o[:, None], n1, n2
    return reference.dsla_step(q, k, v, g1, g2, w, s1, s2, scale)


def dsla_decode_slots(q, k, v, g1, g2, w, s1_pool, s2_pool, slots, scale=None):
    """One token per sequence over slot pools, updated in place; returns o [B,Hq,Dv]."""
    if _use_triton(q):
        from kernels.triton_dsla import dsla_decode_fused

        return dsla_decode_fused(q, k, v, g1, g2, w, s1_pool, s2_pool, slots, scale)
    return reference.dsla_step_slots(q, k, v, g1, g2, w, s1_pool, s2_pool, slots, scale)


def dsla_decode_step(qkv, t, up1, up2, cos, sin, w, head_scale, s1_pool, s2_pool, slots,
                     num_heads, num_kv_heads, gate_norm, gate_floor, scale=None):
    """A plain-gates layer's decode step from its q/k/v and gate-down projections to its o
    projection's input (RoPE, log decays, the step over slot pools updated in place, head
    scales); returns o [B,Hq,Dv]. See reference.dsla_decode_step for layouts."""
    args = (qkv, t, up1, up2, cos, sin, w, head_scale, s1_pool, s2_pool, slots, num_heads, num_kv_heads,
            gate_norm, gate_floor, scale)
    if _use_triton(qkv):
        from kernels.triton_decode_step import dsla_decode_step_fused

        return dsla_decode_step_fused(*args)
    return reference.dsla_decode_step(*args)
