"""The decode step's projections: the Triton skinny GEMM (kernels/triton_gemv.py) or cuBLAS,
whichever this card measured faster for the shape and epilogue, measured where the engine
runs them (inside a CUDA graph, weights cold in L2)."""
from __future__ import annotations

import os

import torch
import triton

from kernels.gemv_epilogue import MAX_M, PLAIN, Epilogue, gemv_reference
from kernels.triton_gemv import gemv_triton

# (BN, BK, num_warps, num_stages): the tuner times these against cuBLAS per shape, inside a CUDA
# graph (`_time_resident`). Candidates from the in-graph chain benchmark on an H200
# (bench/results/gemv_chain.run2-h200.md): deep pipelines for the 4096-row projections, wide
# tiles for gate/up.
CONFIGS = ((32, 128, 4, 6), (64, 128, 4, 4), (128, 128, 8, 3), (32, 128, 4, 8), (16, 128, 4, 8), (16, 256, 4, 6))

_choice: dict = {}  # (device, M class, w shape, N2, dtype, epilogue kind) -> config, or None for cuBLAS
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


def _tune(x, w, w2, epi):
    """Time cuBLAS and each Triton config on these inputs, with this epilogue."""
    best, best_t = None, _time_resident(lambda a, b: gemv_reference(x, a, b, epi), [w, w2])
    for cfg in CONFIGS:
        try:
            t = _time_resident(lambda a, b: gemv_triton(x, a, b, cfg, epi), [w, w2])
        except Exception:  # noqa: BLE001 - a config the compiler rejects (shared memory) is skipped
            continue
        if t < best_t:
            best, best_t = cfg, t
    return best


def linear(x, w, w2=None, epi: Epilogue = PLAIN):
    """x @ [w; w2].T for a decode step with `epi` (triton_gemv.Epilogue) applied: y [M,N];
    (y [M,N], y2 [M,N2]) with w2; (y, hg, sq) with a residual epilogue. Triton for M <= 16 on
    CUDA where it measured faster than cuBLAS for this shape (measured on first use, outside
    graph capture; while capturing an unmeasured shape takes cuBLAS), cuBLAS otherwise."""
    M = x.shape[0]
    cfg = None
    if x.is_cuda and M <= MAX_M and _MODE != "cublas" and x.stride(1) == 1 and w.is_contiguous():
        key = (x.device.index, triton.next_power_of_2(M), w.shape, None if w2 is None else w2.shape[0], x.dtype,
               epi.kind)
        if key not in _choice:
            if torch.cuda.is_current_stream_capturing():
                key = None
            else:
                _choice[key] = CONFIGS[1] if _MODE == "triton" else _tune(x, w, w2, epi)
        cfg = _choice.get(key)
    y = gemv_triton(x, w, w2, cfg, epi) if cfg else gemv_reference(x, w, w2, epi)
    return (y[:, :w.shape[0]], y[:, w.shape[0]:]) if w2 is not None else y


def config_name(cfg) -> str:
    return "BN%d BK%d w%d s%d" % cfg


def choices() -> dict:
    """What the dispatch picked so far, for reports: 'N x K (+N2) M<=m [epilogue]' -> config or 'cublas'."""
    out = {}
    for (_, m, ws, n2, dt, kind), cfg in _choice.items():
        epi = "+".join(n for n, on in zip(("rstd", "gated", "residual"), kind) if on)
        name = f"{ws[0]}x{ws[1]}" + (f"+{n2}" if n2 else "") + f" M<={m} {str(dt)[6:]}" + (f" [{epi}]" if epi else "")
        out[name] = "cublas" if cfg is None else "triton " + config_name(cfg)
    return out
