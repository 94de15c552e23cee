"""Decode rows of the kernel benchmark (bench/kernels.py): the DSLA state step over slot pools,
the engine's whole DSLA layer step per launch shape, and the peers (2x fla fused_recurrent_gla,
SDPA attention over a KV cache), all timed from CUDA graphs over rotating buffers."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from bench.kernel_timing import DEV, GiB, H, D, bench_ms, gates, graph_ms
from kernels.triton_dsla import dsla_decode_fused


def decode_rows(B, bw, fla, rows, eager=False):
    Hkv = H
    state_bytes = 2 * B * Hkv * D * D * 4  # both states, fp32
    io_bytes = B * H * D * 2 * 3 + B * H * D * 4 * 2 + B * H * D * 2  # q k v (bf16), g1 g2 (fp32), o
    bytes_ = 2 * state_bytes + io_bytes  # states read and written
    copies = max(1, math.ceil(400e6 / state_bytes))  # rotate past L2 (50-60 MB)
    w = torch.softmax(torch.randn(2, device=DEV), 0)
    sets = []
    for _ in range(copies):
        q = torch.randn(B, H, D, device=DEV, dtype=torch.bfloat16)
        k = (torch.randn(B, Hkv, D, device=DEV) / D ** 0.5).bfloat16()
        v = torch.randn(B, Hkv, D, device=DEV, dtype=torch.bfloat16)
        g1, g2 = gates((B, Hkv, D))
        p1 = torch.randn(B + 8, Hkv, D, D, device=DEV)
        p2 = torch.randn_like(p1)
        slots = torch.randperm(B + 8, device=DEV)[:B]
        sets.append((q, k, v, g1, g2, p1, p2, slots))
    ms = graph_ms([lambda s=s: dsla_decode_fused(*s[:5], w, *s[5:]) for s in sets])
    rows.append(dict(op="decode", impl="dsla fused (both states, in place)", B=B, ms=ms, bytes=bytes_,
                     TBps=bytes_ / ms / 1e9, floor_ms=bytes_ / bw / 1e9, pct_of_copy=100 * bytes_ / ms / 1e9 / bw,
                     graph_copies=copies))
    print(rows[-1], flush=True)
    # bf16 state pools (EngineConfig.state_dtype): half the state bytes, same math in fp32
    b16 = [(*s[:5], s[5].bfloat16(), s[6].bfloat16(), s[7]) for s in sets]
    bytes16 = state_bytes + io_bytes
    ms = graph_ms([lambda s=s: dsla_decode_fused(*s[:5], w, *s[5:]) for s in b16])
    rows.append(dict(op="decode", impl="dsla fused, bf16 state pools", B=B, ms=ms, bytes=bytes16,
                     TBps=bytes16 / ms / 1e9, floor_ms=bytes16 / bw / 1e9, pct_of_copy=100 * bytes16 / ms / 1e9 / bw,
                     graph_copies=copies))
    print(rows[-1], flush=True)
    del b16
    if eager:  # one launch at a time from Python, no graph: what an uncaptured engine sees
        s0 = sets[0]
        ms = bench_ms(lambda: dsla_decode_fused(*s0[:5], w, *s0[5:]))
        rows.append(dict(op="decode", impl="dsla fused, eager (no graph)", B=B, ms=ms, bytes=bytes_,
                         TBps=bytes_ / ms / 1e9, floor_ms=bytes_ / bw / 1e9, pct_of_copy=100 * bytes_ / ms / 1e9 / bw))
        print(rows[-1], flush=True)
    if fla is not None:
        fsets = [(q[:, None], k[:, None], v[:, None], g1[:, None], g2[:, None], p1[:B].contiguous(),
                  p2[:B].contiguous()) for (q, k, v, g1, g2, p1, p2, _) in sets]

        def two_fla(s):
            q, k, v, g1, g2, s1, s2 = s
            fla.fused_recurrent_gla(q, k, v, gk=g1, initial_state=s1, output_final_state=True)
            fla.fused_recurrent_gla(q, k, v, gk=g2, initial_state=s2, output_final_state=True)

        try:
            ms = graph_ms([lambda s=s: two_fla(s) for s in fsets])
            how = "graph"
        except Exception as e:  # noqa: BLE001
            print("fla decode not capturable:", e)
            ms = bench_ms(lambda: two_fla(fsets[0]))
            how = "eager"
        rows.append(dict(op="decode", impl=f"2x fla fused_recurrent_gla ({how})", B=B, ms=ms, bytes=bytes_,
                         TBps=bytes_ / ms / 1e9, floor_ms=bytes_ / bw / 1e9,
                         pct_of_copy=100 * bytes_ / ms / 1e9 / bw, timing=how))
        print(rows[-1], flush=True)
        if eager:
            ms = bench_ms(lambda: two_fla(fsets[0]))
            rows.append(dict(op="decode", impl="2x fla fused_recurrent_gla (eager)", B=B, ms=ms, bytes=bytes_,
                             TBps=bytes_ / ms / 1e9, floor_ms=bytes_ / bw / 1e9,
                             pct_of_copy=100 * bytes_ / ms / 1e9 / bw, timing="eager"))
            print(rows[-1], flush=True)
    del sets
    layer_step_rows(B, bw, rows)
    for ctx in (4096, 16384):
        kv_bytes = 2 * B * H * ctx * D * 2
        if kv_bytes > 24 * GiB:
            continue
        copies = max(1, math.ceil(400e6 / kv_bytes))
        asets = [(torch.randn(B, H, 1, D, device=DEV, dtype=torch.bfloat16),
                  torch.randn(B, H, ctx, D, device=DEV, dtype=torch.bfloat16),
                  torch.randn(B, H, ctx, D, device=DEV, dtype=torch.bfloat16)) for _ in range(copies)]
        ms = graph_ms([lambda s=s: F.scaled_dot_product_attention(*s) for s in asets])
        rows.append(dict(op="decode", impl=f"SDPA attention, KV cache ctx={ctx}", B=B, ms=ms, bytes=kv_bytes,
                         TBps=kv_bytes / ms / 1e9, floor_ms=kv_bytes / bw / 1e9,
                         pct_of_copy=100 * kv_bytes / ms / 1e9 / bw))
        print(rows[-1], flush=True)
        del asets
    torch.cuda.empty_cache()


def layer_step_rows(B, bw, rows, launches=((32, 4), (16, 4), (16, 2), (32, 8), (64, 8)), R=16):
    """The engine's plain-gates DSLA layer step (kernels/triton_decode_step.py) from the q/k/v and
    gate-down GEMV outputs to the o projection's input, per (block_v, num_warps); the first
    launch is the one the engine uses."""
    from kernels.triton_decode_step import dsla_decode_step_fused

    state_bytes = 2 * B * H * D * D * 4
    bytes_ = 2 * state_bytes + B * (3 * H * D + 2 * R + H * D) * 2 + 2 * H * D * (R + 1) * 2
    copies = max(1, math.ceil(400e6 / state_bytes))
    w = torch.softmax(torch.randn(2, device=DEV), 0)
    up = [((torch.randn(H * D, R, device=DEV) * 0.3).bfloat16(), torch.randn(H * D, device=DEV).bfloat16())
          for _ in range(2)]
    hs = (torch.rand(H, device=DEV) + 0.5).bfloat16()
    sets = []
    for _ in range(copies):
        pos = torch.randint(0, 16384, (B, 1), device=DEV).float()
        ang = pos * torch.logspace(0, -4, D // 2, device=DEV)[None]
        cos, sin = torch.cat([ang.cos()] * 2, 1).bfloat16(), torch.cat([ang.sin()] * 2, 1).bfloat16()
        p1 = torch.randn(B + 8, H, D, D, device=DEV)
        sets.append((torch.randn(B, 3 * H * D, device=DEV).bfloat16(), torch.randn(B, 2 * R, device=DEV).bfloat16(),
                     cos, sin, p1, torch.randn_like(p1), torch.randperm(B + 8, device=DEV)[:B]))
    for bv, nw in launches:
        def step(s, bv=bv, nw=nw):
            qkv, t, cos, sin, p1, p2, slots = s
            return dsla_decode_step_fused(qkv, t, up[0], up[1], cos, sin, w, hs, p1, p2, slots, H, H, 16.0, -50.0,
                                          block_v=bv, num_warps=nw)
        try:
            ms = graph_ms([lambda s=s: step(s) for s in sets])
        except Exception as e:  # noqa: BLE001 - a launch shape the compiler rejects
            print("layer step failed", bv, nw, repr(e)[:200], flush=True)
            continue
        rows.append(dict(op="decode", impl=f"dsla layer step, BV {bv} warps {nw}", B=B, ms=ms, bytes=bytes_,
                         TBps=bytes_ / ms / 1e9, floor_ms=bytes_ / bw / 1e9, pct_of_copy=100 * bytes_ / ms / 1e9 / bw,
                         graph_copies=copies))
        print(rows[-1], flush=True)
    del sets
    torch.cuda.empty_cache()
