"""Skinny GEMM for decode steps (M <= 16 rows): y = x @ w.T in Triton, and the dispatch
that uses it or cuBLAS, whichever this card measured faster for the shape.

Why: a decode step of a 7B model reads ~13 GB of weights at 1..16 rows of x. cuBLAS's
skinny kernels reach ~3.5 TB/s on an H200 and add a split-K reduce kernel for the
narrow projections. Here each program owns BN rows of w over the whole K: no split,
no reduce launch, sums in a fixed order (deterministic). BN is small enough that the
grid holds a few programs per SM, and the K loop is software-pipelined (num_stages)
so that several weight tiles are in flight per program. x is padded to 16 rows for
the tensor-core dot; its tiles are tiny and come from L2.
The stream-K form (`_gemv_streamk`) instead gives every program the same share of the
(row block, K block) units, for shapes whose row blocks do not fill the SMs evenly; the
row blocks it cuts are summed by their last contributor, in a fixed order (still
deterministic, still one launch). Its scratch is allocated on a shape's first call, which
the dispatch makes before any graph capture. It is not a dispatch candidate yet (see
STREAMK_CONFIGS): it has run only in Triton's CPU interpreter so far.

A prologue fused into the x load (each program recomputes its x tile, which is cheap):
`scale`: x[:, k] * scale[k // group] (a DSLA layer's head scales before o_proj), rounded to
the model dtype once, as the separate multiply rounds it. (A silu(gate) * up prologue for
down_proj was tried and dropped: the exp/divide over the 16-row padded tile made that GEMM
2-3x slower on an H200, far more than the separate silu_mul launch it saves.)
`w2` appends a second weight matrix: y = x @ [w; w2].T in one launch (a DSLA layer's
q/k/v and gate-down projections share their input).
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels import triton_alloc

MAX_M = 16
# (BN, BK, num_warps, num_stages): the tuner times these against cuBLAS per shape. These three
# won some 7B shape on an H200 (bench/results/engine_gemv.md); BN 16, BN 64 with BK 256 and
# BK 512 never did.
CONFIGS = ((32, 256, 4, 4), (32, 128, 4, 6), (64, 128, 4, 4))
# The stream-K form: (BN, BK, num_warps, num_stages, programs per SM). Not yet run on a GPU
# (written in a session without device time): bench/engine.py --gemv and the @gpu tests
# measure and check them; they join CONFIGS, and so the dispatch, once a GPU run shows them
# right and faster on some shape.
STREAMK_CONFIGS = ((64, 128, 4, 4, 1), (64, 128, 4, 4, 2), (32, 256, 4, 4, 2), (64, 256, 8, 3, 1))


@triton.jit
def _rows(W, W2, nb, N, N2, s_wn, s_w2n, HAS_W2: tl.constexpr, BN: tl.constexpr):
    """Row block nb of [w; w2]: row pointers, which rows exist, and their output columns."""
    rn = nb * BN + tl.arange(0, BN)
    n_ok = rn < N
    ycol = rn
    wrow = W + rn[:, None] * s_wn
    if HAS_W2:
        nb1 = tl.cdiv(N, BN)
        if nb >= nb1:  # this block's rows come from w2; its outputs follow w's N columns
            rn = (nb - nb1) * BN + tl.arange(0, BN)
            n_ok = rn < N2
            ycol = N + rn
            wrow = W2 + rn[:, None] * s_w2n
    return wrow, n_ok, ycol


@triton.jit
def _dot_k(X, wrow, S, n_ok, M, K, k_lo, k_hi, s_xm, S_GROUP, SCALED: tl.constexpr, EVEN_K: tl.constexpr,
           IEEE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """sum over k in [k_lo, k_hi) of w[rows, k] x[:, k]^T as a [BN, BM] fp32 tile. (The loop
    is the one the plain kernel was measured with: pointers advanced by BK.)"""
    rm = tl.arange(0, BM)
    rk = tl.arange(0, BK)
    m_ok = rm < M
    wp = wrow + (k_lo + rk)[None, :]
    xp = X + rm[:, None] * s_xm + (k_lo + rk)[None, :]
    acc = tl.zeros([BN, BM], dtype=tl.float32)
    for k in range(k_lo, k_hi, BK):
        if EVEN_K:
            wm = n_ok[:, None]
            xm = m_ok[:, None]
        else:
            k_ok = (k + rk) < K
            wm = n_ok[:, None] & k_ok[None, :]
            xm = m_ok[:, None] & k_ok[None, :]
        w = tl.load(wp, mask=wm, other=0.0)
        x = tl.load(xp, mask=xm, other=0.0)
        if SCALED:
            s = tl.load(S + (k + rk) // S_GROUP, mask=(k + rk) < K, other=0.0)
            x = (x.to(tl.float32) * s.to(tl.float32)[None, :]).to(w.dtype)
        if IEEE:
            acc += tl.dot(w, tl.trans(x), input_precision="ieee")
        else:
            acc += tl.dot(w, tl.trans(x))
        wp += BK
        xp += BK
    return acc


@triton.jit
def _gemv(X, W, W2, S, Y, M, N, N2, K, s_xm, s_wn, s_w2n, s_ym, S_GROUP,
          SCALED: tl.constexpr, HAS_W2: tl.constexpr, EVEN_K: tl.constexpr, IEEE: tl.constexpr,
          BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    wrow, n_ok, ycol = _rows(W, W2, tl.program_id(0), N, N2, s_wn, s_w2n, HAS_W2, BN)
    acc = _dot_k(X, wrow, S, n_ok, M, K, 0, K, s_xm, S_GROUP, SCALED, EVEN_K, IEEE, BM, BN, BK)
    rm = tl.arange(0, BM)
    tl.store(Y + rm[None, :] * s_ym + ycol[:, None], acc.to(Y.dtype.element_ty), mask=n_ok[:, None] & (rm < M)[None, :])


@triton.jit
def _gemv_streamk(X, W, W2, S, Y, WS, CNT, M, N, N2, K, s_xm, s_wn, s_w2n, s_ym, S_GROUP, KB, U, MAXS,
                  SCALED: tl.constexpr, HAS_W2: tl.constexpr, EVEN_K: tl.constexpr, IEEE: tl.constexpr,
                  BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """Stream-K: the U = (row blocks) x (K blocks) work units split evenly over P programs, so
    every SM streams the same number of weight bytes whatever N is (the plain grid puts, e.g.,
    192 row blocks of q/k/v on 132 SMs: 60 SMs get two, 72 get one and then idle; that this
    is what holds those shapes at ~2.8 TB/s is the hypothesis the stream-K run will test).
    A row block cut between programs has its contributors write fp32 partials to WS; the last
    to arrive (a per-block counter) sums them in contributor order, so the result does not
    depend on who is last, and resets the counter for the next launch."""
    pid = tl.program_id(0)
    P = tl.num_programs(0)
    rm = tl.arange(0, BM)
    m_ok = rm < M
    part = tl.arange(0, BN)[:, None] * BM + rm[None, :]
    u = pid * U // P
    end = (pid + 1) * U // P
    while u < end:
        nb = u // KB
        kb0 = u - nb * KB
        kb1 = tl.minimum(KB, kb0 + end - u)
        wrow, n_ok, ycol = _rows(W, W2, nb, N, N2, s_wn, s_w2n, HAS_W2, BN)
        acc = _dot_k(X, wrow, S, n_ok, M, K, kb0 * BK, kb1 * BK, s_xm, S_GROUP, SCALED, EVEN_K, IEEE, BM, BN, BK)
        ym = n_ok[:, None] & m_ok[None, :]
        yp = Y + rm[None, :] * s_ym + ycol[:, None]
        if kb1 - kb0 == KB:
            tl.store(yp, acc.to(Y.dtype.element_ty), mask=ym)
        else:
            # program p owns units [p U / P, (p + 1) U / P): the owner of unit v is ((v + 1) P - 1) // U
            first = ((nb * KB + 1) * P - 1) // U
            n_contrib = ((nb * KB + KB) * P - 1) // U - first + 1
            base = WS + nb * MAXS * (BN * BM)
            tl.store(base + (pid - first) * (BN * BM) + part, acc)
            # A scalar atomic runs on one thread, whose release covers its own stores only: the
            # barrier first orders every thread's slice of the partial before it (Triton 3.6, the
            # GPU machine's, does not always insert one; 3.9 does).
            tl.debug_barrier()
            # acq_rel: the partial is visible before the count; the last contributor sees everyone's
            if tl.atomic_add(CNT + nb, 1, sem="acq_rel") == n_contrib - 1:
                tot = tl.zeros([BN, BM], dtype=tl.float32)
                for c in range(0, n_contrib):
                    tot += tl.load(base + c * (BN * BM) + part, cache_modifier=".cg")
                tl.store(yp, tot.to(Y.dtype.element_ty), mask=ym)
                tl.atomic_xchg(CNT + nb, 0)
        u += kb1 - kb0


def gemv_triton(x, w, w2=None, scale=None, group=1, config=CONFIGS[0]):
    """x [M,K] (M <= 16, unit stride along K) -> x' @ [w; w2].T [M, N + N2], where x' is x, or
    x[:, k] * scale[k // group] when scale is given. w, w2 [*, K] contiguous. A config of
    five (BN, BK, warps, stages, programs per SM) runs the stream-K form."""
    M = x.shape[0]
    N, K = w.shape
    N2 = w2.shape[0] if w2 is not None else 0
    if M > MAX_M or x.stride(1) != 1 or not w.is_contiguous() or (w2 is not None and not w2.is_contiguous()):
        raise ValueError("gemv_triton needs M <= 16, x with unit stride along K and contiguous weights")
    if x.shape[1] != K or (w2 is not None and w2.shape[1] != K):
        raise ValueError(f"shapes do not match: x {tuple(x.shape)}, w {tuple(w.shape)}")
    BN, BK, warps, stages = config[:4]
    y = triton_alloc.empty(M, N + N2, dtype=x.dtype, device=x.device)
    nb = triton.cdiv(N, BN) + triton.cdiv(N2, BN)
    args = (x, w, w2 if w2 is not None else w, scale if scale is not None else w, y)
    shape = (M, N, N2, K, x.stride(0), w.stride(0), w2.stride(0) if w2 is not None else 0, y.stride(0), int(group))
    flags = dict(SCALED=scale is not None, HAS_W2=w2 is not None, EVEN_K=K % BK == 0,
                 IEEE=x.dtype == torch.float32, BM=MAX_M, BN=BN, BK=BK, num_warps=warps, num_stages=stages)
    if len(config) == 4:
        _gemv[(nb,)](*args, *shape, **flags)
        return y
    kb = triton.cdiv(K, BK)
    units = nb * kb
    if units == 0:  # no rows, or K = 0 (an empty sum)
        return y.zero_()
    programs = min(units, config[4] * _num_sms(x.device))  # >= 1 unit each: no empty contributor
    maxs = -(-kb // (units // programs)) + 1
    ws, cnt = _scratch(x.device, nb * maxs * BN * MAX_M, nb)
    _gemv_streamk[(programs,)](*args, ws, cnt, *shape, kb, units, maxs, **flags)
    return y


# device -> (fp32 partials, int32 counters); counters are left at zero by every launch. One
# scratch per device: stream-K launches must not overlap (one stream, as the engine's decode is).
_scratch_bufs: dict = {}
_retired: list = []  # outgrown scratch stays allocated: a captured CUDA graph may still point at it


def _scratch(device, n_partial, n_counters):
    ws, cnt = _scratch_bufs.get(device, (None, None))
    if ws is None or ws.numel() < n_partial or cnt.numel() < n_counters:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("stream-K GEMV: run the shape once before graph capture (its scratch is allocated then)")
        if ws is not None:
            _retired.append((ws, cnt))
        n_partial = max(n_partial, 0 if ws is None else ws.numel())
        n_counters = max(n_counters, 0 if cnt is None else cnt.numel())
        ws = torch.empty(n_partial, dtype=torch.float32, device=device)
        cnt = torch.zeros(n_counters, dtype=torch.int32, device=device)
        _scratch_bufs[device] = (ws, cnt)
    return ws, cnt


def _num_sms(device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 3  # the CPU interpreter: a few programs, so row blocks are cut between them


def gemv_reference(x, w, w2=None, scale=None, group=1):
    """The torch form: the scaled x rounded to x's dtype once, then x @ [w; w2].T (cuBLAS on CUDA)."""
    if scale is not None:
        M, K = x.shape
        x = (x.view(M, K // group, group).float() * scale.float()[:, None]).to(x.dtype).view(M, K)
    y = F.linear(x, w)
    return torch.cat([y, F.linear(x, w2)], 1) if w2 is not None else y


# ---- dispatch ---------------------------------------------------------------------------
_choice: dict = {}  # (device, M class, w shape, N2, dtype, scaled, group) -> a CONFIGS entry, or None for cuBLAS
_MODE = os.environ.get("DSLA_GEMV", "auto")  # auto | cublas | triton (the last two for comparisons)


def _cublas(x, w, w2, scale, group):
    """The fallback path: the scale as one multiply in x's dtype (the same rounding as the
    reference's fp32 product rounded once), then cuBLAS."""
    if scale is not None:
        x = (x.view(x.shape[0], -1, group) * scale[:, None]).view(x.shape)
    y = F.linear(x, w)
    return torch.cat([y, F.linear(x, w2)], 1) if w2 is not None else y


def _time(fn) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=3, rep=15, return_mode="median")  # clears L2 between runs, as a real step would


def _tune(x, w, w2, scale, group):
    """Time cuBLAS (with the scale done by torch) and each Triton config on these inputs."""
    best, best_t = None, _time(lambda: _cublas(x, w, w2, scale, group))
    for cfg in CONFIGS:
        try:
            t = _time(lambda: gemv_triton(x, w, w2, scale, group, cfg))
        except Exception:  # noqa: BLE001 - a config the compiler rejects (shared memory) is skipped
            continue
        if t < best_t:
            best, best_t = cfg, t
    return best


def linear(x, w, w2=None, scale=None, group=1):
    """x' @ [w; w2].T for a decode step (x' = x, or x scaled per group of K when scale is given). Returns y [M,N], or (y [M,N], y2 [M,N2]) with w2. Triton for M <= 16 on CUDA
    where it measured faster than cuBLAS for this shape (measured on first use, outside graph
    capture; while capturing an unmeasured shape takes cuBLAS), cuBLAS otherwise."""
    M = x.shape[0]
    cfg = None
    if x.is_cuda and M <= MAX_M and _MODE != "cublas" and x.stride(1) == 1 and w.is_contiguous():
        key = (x.device.index, triton.next_power_of_2(M), w.shape, None if w2 is None else w2.shape[0],
               x.dtype, scale is not None, group)
        if key not in _choice:
            if torch.cuda.is_current_stream_capturing():
                key = None
            else:
                _choice[key] = CONFIGS[1] if _MODE == "triton" else _tune(x, w, w2, scale, group)
        cfg = _choice.get(key)
    y = gemv_triton(x, w, w2, scale, group, cfg) if cfg else _cublas(x, w, w2, scale, group)
    return (y[:, :w.shape[0]], y[:, w.shape[0]:]) if w2 is not None else y


def config_name(cfg) -> str:
    return "BN%d BK%d w%d s%d" % cfg[:4] + (" streamK x%d/SM" % cfg[4] if len(cfg) == 5 else "")


def choices() -> dict:
    """What the dispatch picked so far, for reports: 'N x K (+N2) M<=m' -> config or 'cublas'."""
    out = {}
    for (_, m, ws, n2, dt, scaled, _g), cfg in _choice.items():
        name = f"{ws[0]}x{ws[1]}" + (f"+{n2}" if n2 else "") + f" M<={m} {str(dt)[6:]}" + (" scaled" if scaled else "")
        out[name] = "cublas" if cfg is None else "triton " + config_name(cfg)
    return out
