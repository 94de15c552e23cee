"""Decode-step GEMV chains in one CUDA graph: each kernel's time where it really runs (between
other kernels, not alone with L2 cleared), for choosing GEMV configs. GPU machine.

    python bench/gemv_chain.py [--out DIR]   # -> DIR/gemv_chain.{json,md}

A Llama-2-7B layer's four projections (q/k/v, o, gate/up, down) at M = 4 rows, chained as a
decode step chains them (each reads the previous one's output), for 8 layers with their own
weights (3.2 GB: nothing stays in the 50 MB L2), captured as one graph. Per variant: time per
replay against the floor (weight bytes / copy bandwidth, same run), and each shape's median
kernel time inside the replays (torch profiler). Variants: cuBLAS; the Triton kernel with
the configs the isolated benchmark chose (engine_gemv.md); every config alike for all shapes;
the dispatch (`gemv_dispatch.linear`), which tunes each shape on first use; and whole
layers' dataflow (residual, RMSNorm, SiLU*up between the projections) done by separate
kernels as the engine did, or by the GEMVs' epilogues (triton_gemv.Epilogue).
Runs 1-3 (gemv_chain.run1/2/3-h200.*) also launched the GEMVs as programmatic
dependents (PDL), with and without an early trigger and an L2 prefetch: the plain wait form won
1-3% here but cost ~1% in the engine's step (engine_notes.md), so it was dropped.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.engine import copy_bandwidth, kernel_events  # noqa: E402
from kernels import gemv_dispatch as gd  # noqa: E402
from kernels.gemv_epilogue import Epilogue, norm_parts  # noqa: E402
from kernels.triton_gemv import gemv_triton  # noqa: E402

LAYERS, M = 8, 4
# (name, rows, K; the input is the previous output's first K columns), and the configs that won
# these shapes at M = 4 alone (bench/results/engine_gemv.md)
SHAPES = (("qkv", 12288, 4096), ("o", 4096, 4096), ("gate_up", 22016, 4096), ("down", 4096, 11008))
ISOLATED_BEST = ((64, 128, 4, 4), (32, 256, 4, 4), (64, 128, 4, 4), (32, 256, 4, 4))
# run 2 (gemv_chain.run2-h200.md) also had BN64 BK256 w8 s3, BN16 BK512 w4 s4 and the TMA-load
# form (five configs), run 3 BN16 with 6-8 stages, the split run (gemv_chain.split-h200.md) split-K
# over 2-4 programs: none was fastest for any shape, TMA at best tied
UNIFORM = ((32, 256, 4, 4), (32, 128, 4, 6), (64, 128, 4, 4), (128, 128, 8, 3), (32, 128, 4, 8),
           (32, 64, 4, 12), (128, 128, 8, 4), (64, 128, 4, 6))


def variants():
    yield "cublas", None, None
    yield "triton isolated-best", "ptr", ISOLATED_BEST
    for c in UNIFORM:
        yield "triton " + gd.config_name(c), "ptr", (c,) * 4
    yield "tuned (the dispatch's choice)", "tuned", None
    yield "layers, norm and SiLU kernels (tuned)", "layers", None
    yield "layers, fused epilogues (tuned)", "fused", None


def layers(x, weights, norms):
    """Decode layers without their mixer (o reads q's columns): residual adds, RMSNorms and
    SiLU*up as separate kernels, the engine's form before the epilogues."""
    from kernels.triton_paged_attention import add_rms_norm, silu_mul

    x, h = add_rms_norm(x, None, norms[0][0], 1e-5)
    for (wqkv, wo, wgu, wd), (g1, g2) in zip(weights, norms):
        a = gd.linear(gd.linear(h, wqkv)[:, :wo.shape[1]], wo)
        x, h = add_rms_norm(x, a, g2, 1e-5)
        x, h = add_rms_norm(x, gd.linear(silu_mul(gd.linear(h, wgu)), wd), g1, 1e-5)
    return x


def layers_fused(x, weights, norms):
    """The same layers with the norms and SiLU*up in the GEMVs' epilogues."""
    hg, sq = norm_parts(x, norms[0][0])
    for (wqkv, wo, wgu, wd), (g1, g2) in zip(weights, norms):
        qkv = gd.linear(hg, wqkv, epi=Epilogue(rstd_sq=sq, eps=1e-5))
        x, hg, sq = gd.linear(qkv[:, :wo.shape[1]], wo, epi=Epilogue(residual=x, norm_weight=g2))
        m = gd.linear(hg, wgu, epi=Epilogue(rstd_sq=sq, eps=1e-5, gated=True))
        x, hg, sq = gd.linear(m, wd, epi=Epilogue(residual=x, norm_weight=g1))
    return x


def chain(x, weights, kind, cfgs, norms=None):
    if kind == "layers":
        return layers(x, weights, norms)
    if kind == "fused":
        return layers_fused(x, weights, norms)
    for layer in weights:
        for (_, _, k), w, cfg in zip(SHAPES, layer, cfgs or (None,) * 4):
            x = x[:, :k]
            if kind is None:
                x = F.linear(x, w)
            elif kind == "tuned":
                x = gd.linear(x, w)
            else:
                x = gemv_triton(x, w, config=cfg)
    return x


def kernel_times(graph, out, reps=3):
    """Each shape's median kernel time (us) over `reps` profiled replays, from the trace's
    GEMV kernels in launch order (LAYERS x SHAPES of them; cuBLAS may launch more)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            graph.replay()
        torch.cuda.synchronize()
    evs = [e for e in kernel_events(prof, out) if e["name"].startswith("_gemv")]
    n = LAYERS * len(SHAPES)
    if len(evs) != reps * n:  # e.g. cuBLAS's split-K reduce kernels: no clean per-shape mapping
        return None
    return [statistics.median(e["dur"] for i, e in enumerate(evs) if i % len(SHAPES) == j) for j in range(len(SHAPES))]


def time_graph(fn, out, reps=30):
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = fn()
    for _ in range(3):
        g.replay()
    ts = []
    for _ in range(reps):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        g.replay()
        e1.record()
        e1.synchronize()
        ts.append(e0.elapsed_time(e1))
    per = kernel_times(g, out)
    g.replay()
    torch.cuda.synchronize()
    return statistics.median(ts), per, y.clone()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    torch.manual_seed(0)
    bw = copy_bandwidth()
    weights = [[torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * k ** -0.5 for _, n, k in SHAPES]
               for _ in range(LAYERS)]
    norms = [tuple(torch.rand(4096, device="cuda", dtype=torch.bfloat16) + 0.5 for _ in range(2))
             for _ in range(LAYERS)]
    nbytes = sum(w.numel() * 2 for layer in weights for w in layer)
    x = torch.randn(M, 4096, device="cuda", dtype=torch.bfloat16)
    floor_ms = nbytes / bw * 1e3
    shape_bytes = [n * k * 2 for _, n, k in SHAPES]
    rows, refs = [], {}
    for name, kind, cfgs in variants():
        try:
            ms, per, y = time_graph(lambda: chain(x, weights, kind, cfgs, norms), args.out)
        except Exception as e:  # noqa: BLE001 - a config the compiler or the card rejects
            print("variant failed", name, repr(e)[:300], flush=True)
            continue
        # against the family's first variant (cuBLAS's chain; the layers with separate kernels):
        # a fast wrong variant must not look best
        ref = refs.setdefault(kind in ("layers", "fused"), y.float())
        err = ((y.float() - ref).norm() / ref.norm()).item()
        if not err < 2e-2:
            raise SystemExit(f"{name}: relative error {err:.3g} against its reference chain")
        rows.append({"variant": name, "ms": ms, "TBps": nbytes / ms / 1e9, "x_floor": ms / floor_ms,
                     "shape_us": per, "shape_TBps": per and [b / t / 1e6 for b, t in zip(shape_bytes, per)],
                     "rel_err_vs_ref": err})
        print(rows[-1], flush=True)
    card = torch.cuda.get_device_name()
    res = {"card": card, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "command": "python bench/gemv_chain.py", "copy_Bps": bw, "weight_bytes": nbytes, "floor_ms": floor_ms,
           "layers": LAYERS, "M": M, "shapes": SHAPES, "rows": rows}
    md = [f"# GEMV chain in one CUDA graph, {card}, {res['date']}\n",
          f"`{res['command']}`: {LAYERS} layers x (q/k/v, o, gate/up, down) of Llama-2-7B at M = {M}, "
          f"{nbytes / 1e9:.2f} GB of weights; floor {floor_ms:.3f} ms at the copy bandwidth "
          f"{bw / 1e12:.2f} TB/s (same run). Median of 30 graph replays.",
          "Per shape: median GEMV kernel time inside the replays, us (TB/s of its weight bytes). Error: "
          "against cuBLAS's chain; for the `layers` rows, against the layers with separate kernels.\n",
          "| variant | ms | TB/s | x floor | " + " | ".join(f"{n} {r}x{k}" for n, r, k in SHAPES)
          + " | rel. error vs reference |", "| --- " * (5 + len(SHAPES)) + "|"]
    for r in rows:
        cells = ([f"{t:.1f} ({b:.2f})" for t, b in zip(r["shape_us"], r["shape_TBps"])] if r["shape_us"]
                 else ["-"] * len(SHAPES))
        md.append(f"| {r['variant']} | {r['ms']:.3f} | {r['TBps']:.2f} | {r['x_floor']:.3f} | " + " | ".join(cells)
                  + f" | {r['rel_err_vs_ref']:.1e} |")
    best = [min((r for r in rows if r["shape_us"]), key=lambda r: r["shape_us"][j])["variant"]
            for j in range(len(SHAPES))]
    md.append("\nFastest per shape inside the chain: " + ", ".join(f"{n}: {b}" for (n, _, _), b in zip(SHAPES, best)))
    res["best_per_shape"] = dict(zip([s[0] for s in SHAPES], best))
    res["dispatch_choices"] = gd.choices()
    md.append("\nThe dispatch's picks: " + "; ".join(f"{k}: {v}" for k, v in res["dispatch_choices"].items()))
    json.dump(res, open(os.path.join(args.out, "gemv_chain.json"), "w"), indent=1)
    open(os.path.join(args.out, "gemv_chain.md"), "w").write("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
