"""What the kernel benchmarks share (bench/kernels.py, bench/kernels_decode.py): the shapes,
CUDA-event timing (eager and from a CUDA graph), the copy-bandwidth ceiling, gate draws."""
from __future__ import annotations

import torch
import torch.nn.functional as F

H, D = 32, 128
DEV = "cuda"
GiB = 1 << 30


def bench_ms(fn, rep=100):
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=rep, return_mode="median")


def graph_ms(calls):
    """Per-call time of `calls` (closures on distinct buffers) replayed from one CUDA graph."""
    for c in calls:
        c()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for c in calls:
            c()
    torch.cuda.current_stream().wait_stream(s)
    with torch.cuda.graph(g):
        for c in calls:
            c()
    return bench_ms(g.replay) / len(calls)


def copy_bandwidth():
    n = 2 * GiB
    a = torch.empty(n, dtype=torch.uint8, device=DEV).random_()
    b = torch.empty_like(a)
    ms = bench_ms(lambda: b.copy_(a))
    del a, b
    return 2 * n / ms / 1e9  # TB/s: read + write


def gates(shape, gen=None):
    # history gate near "remember", recency gate near "forget fast" (the model's init)
    g1 = F.logsigmoid(torch.randn(shape, device=DEV) + 3) / 16
    g2 = F.logsigmoid(torch.randn(shape, device=DEV) - 2)
    return g1, g2
