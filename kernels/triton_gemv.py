"""Skinny GEMM for decode steps (M <= 16 rows): y = x @ w.T in Triton, and the dispatch
that uses it or cuBLAS, whichever this card measured faster for the shape.

Why: a decode step of a 7B model reads ~13 GB of weights at 1..16 rows of x. cuBLAS's
skinny kernels reach ~3.5 TB/s on an H200 and add a split-K reduce kernel for the
narrow projections. Here each program owns BN rows of w over the whole K: no split,
no reduce launch, sums in a fixed order (deterministic). BN is small enough that the
grid holds a few programs per SM, and the K loop is software-pipelined (num_stages)
so that several weight tiles are in flight per program. x is padded to 16 rows for
the tensor-core dot; its tiles are tiny and come from L2.
Prologues fused into the x load cost more than the launch they save: a silu(gate) * up
prologue made down_proj 2-3x slower, a per-head scale o_proj ~10% slower (H200); DSLA's head
scales are applied by its decode kernel instead.
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
# (BN, BK, num_warps, num_stages): the tuner times these against cuBLAS per shape, inside a CUDA
# graph (`_time_resident`). Candidates from the in-graph chain benchmark on an H200
# (bench/results/gemv_chain.run2-h200.md): deep pipelines for the 4096-row projections, wide
# tiles for gate/up.
CONFIGS = ((32, 128, 4, 6), (64, 128, 4, 4), (128, 128, 8, 3), (32, 128, 4, 8), (16, 128, 4, 8), (16, 256, 4, 6))


@triton.jit
def _gemv(X, W, W2, Y, M, N, N2, K, s_xm, s_wn, s_w2n, s_ym, HAS_W2: tl.constexpr, EVEN_K: tl.constexpr,
          IEEE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """Row block nb of [w; w2] against all of x: y[:, rows] = x @ w[rows].T, summed over K in order."""
    nb = tl.program_id(0)
    rn = nb * BN + tl.arange(0, BN)
    n_ok = rn < N
    ycol = rn
    wp = W + rn[:, None] * s_wn
    if HAS_W2:
        nb1 = tl.cdiv(N, BN)
        if nb >= nb1:  # this block's rows come from w2; its outputs follow w's N columns
            rn = (nb - nb1) * BN + tl.arange(0, BN)
            n_ok = rn < N2
            ycol = N + rn
            wp = W2 + rn[:, None] * s_w2n
    rm = tl.arange(0, BM)
    rk = tl.arange(0, BK)
    m_ok = rm < M
    wp += rk[None, :]
    xp = X + rm[:, None] * s_xm + rk[None, :]
    acc = tl.zeros([BN, BM], dtype=tl.float32)
    for k in range(0, K, BK):
        if EVEN_K:
            wm = n_ok[:, None]
            xm = m_ok[:, None]
        else:
            k_ok = (k + rk) < K
            wm = n_ok[:, None] & k_ok[None, :]
            xm = m_ok[:, None] & k_ok[None, :]
        w = tl.load(wp, mask=wm, other=0.0)
        x = tl.load(xp, mask=xm, other=0.0)
        if IEEE:
            acc += tl.dot(w, tl.trans(x), input_precision="ieee")
        else:
            acc += tl.dot(w, tl.trans(x))
        wp += BK
        xp += BK
    tl.store(Y + rm[None, :] * s_ym + ycol[:, None], acc.to(Y.dtype.element_ty), mask=n_ok[:, None] & m_ok[None, :])


def gemv_triton(x, w, w2=None, config=CONFIGS[0]):
    """x [M,K] (M <= 16, unit stride along K) -> x @ [w; w2].T [M, N + N2]; w, w2 [*, K] contiguous."""
    M = x.shape[0]
    N, K = w.shape
    N2 = w2.shape[0] if w2 is not None else 0
    if M > MAX_M or x.stride(1) != 1 or not w.is_contiguous() or (w2 is not None and not w2.is_contiguous()):
        raise ValueError("gemv_triton needs M <= 16, x with unit stride along K and contiguous weights")
    if x.shape[1] != K or (w2 is not None and w2.shape[1] != K):
        raise ValueError(f"shapes do not match: x {tuple(x.shape)}, w {tuple(w.shape)}")
    BN, BK, warps, stages = config
    y = triton_alloc.empty(M, N + N2, dtype=x.dtype, device=x.device)
    nb = triton.cdiv(N, BN) + triton.cdiv(N2, BN)
    args = (x, w, w2 if w2 is not None else w, y)
    shape = (M, N, N2, K, x.stride(0), w.stride(0), w2.stride(0) if w2 is not None else 0, y.stride(0))
    flags = dict(HAS_W2=w2 is not None, EVEN_K=K % BK == 0,
                 IEEE=x.dtype == torch.float32, BM=MAX_M, BN=BN, BK=BK, num_warps=warps, num_stages=stages)
    _gemv[(nb,)](*args, *shape, **flags)
    return y


def gemv_reference(x, w, w2=None):
    """The torch form x @ [w; w2].T (cuBLAS on CUDA): also the dispatch's fallback."""
    y = F.linear(x, w)
    return torch.cat([y, F.linear(x, w2)], 1) if w2 is not None else y


# ---- dispatch ---------------------------------------------------------------------------
_choice: dict = {}  # (device, M class, w shape, N2, dtype) -> a CONFIGS entry, or None for cuBLAS
_MODE = os.environ.get("DSLA_GEMV", "auto")  # auto | cublas | triton (the last two for comparisons)


def _time_resident(launch, weights) -> float:
    """ms per launch of `launch(w)` over copies of the weights (at least two, and together three
    times L2) back to back in one CUDA graph: each launch then starts cold with the previous
    one's bytes still in flight, as it does between a decode step's kernels. (Timed alone, with
    L2 flushed by a write before each run, the winners differ: on an H200 that picked configs
    10% slower for the o and down projections inside a chain, bench/gemv_chain.py.)"""
    l2 = torch.cuda.get_device_properties(weights[0].device).L2_cache_size
    nbytes = sum(w.numel() * w.element_size() for w in weights if w is not None)
    copies = [weights] + [[None if w is None else w.clone() for w in weights]
                          for _ in range(max(2, -(-3 * l2 // max(nbytes, 1))) - 1)]
    for c in copies:
        launch(*c)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for c in copies:
            launch(*c)
    graph.replay()
    ts = []
    for _ in range(5):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        graph.replay()
        e1.record()
        e1.synchronize()
        ts.append(e0.elapsed_time(e1) / len(copies))
    del graph, copies
    return sorted(ts)[len(ts) // 2]


def _tune(x, w, w2):
    """Time cuBLAS and each Triton config on these inputs."""
    best, best_t = None, _time_resident(lambda a, b: gemv_reference(x, a, b), [w, w2])
    for cfg in CONFIGS:
        try:
            t = _time_resident(lambda a, b: gemv_triton(x, a, b, cfg), [w, w2])
        except Exception:  # noqa: BLE001 - a config the compiler rejects (shared memory) is skipped
            continue
        if t < best_t:
            best, best_t = cfg, t
    return best


def linear(x, w, w2=None):
    """x @ [w; w2].T for a decode step: y [M,N], or (y [M,N], y2 [M,N2]) with w2. Triton for M <= 16 on CUDA
    where it measured faster than cuBLAS for this shape (measured on first use, outside graph
    capture; while capturing an unmeasured shape takes cuBLAS), cuBLAS otherwise."""
    M = x.shape[0]
    cfg = None
    if x.is_cuda and M <= MAX_M and _MODE != "cublas" and x.stride(1) == 1 and w.is_contiguous():
        key = (x.device.index, triton.next_power_of_2(M), w.shape, None if w2 is None else w2.shape[0], x.dtype)
        if key not in _choice:
            if torch.cuda.is_current_stream_capturing():
                key = None
            else:
                _choice[key] = CONFIGS[1] if _MODE == "triton" else _tune(x, w, w2)
        cfg = _choice.get(key)
    y = gemv_triton(x, w, w2, cfg) if cfg else gemv_reference(x, w, w2)
    return (y[:, :w.shape[0]], y[:, w.shape[0]:]) if w2 is not None else y


def config_name(cfg) -> str:
    return "BN%d BK%d w%d s%d" % cfg


def choices() -> dict:
    """What the dispatch picked so far, for reports: 'N x K (+N2) M<=m' -> config or 'cublas'."""
    out = {}
    for (_, m, ws, n2, dt), cfg in _choice.items():
        name = f"{ws[0]}x{ws[1]}" + (f"+{n2}" if n2 else "") + f" M<={m} {str(dt)[6:]}"
        out[name] = "cublas" if cfg is None else "triton " + config_name(cfg)
    return out
