"""Decode benchmark of the engine on the real default model (GPU): SmolLM2-135M in bf16 with the
shipped store's trained DSLA layers, all-attention against the serving cap (50% converted).

The 7B-shaped benchmark (bench/engine.py) has random weights; this one serves the model the
project ships, with the layers distilled for it, through the same engine path a GPU replica runs
(CUDA graphs, GEMVs, paged attention, the fused DSLA step; bfloat16-recency states as in
serve_config_gpu.yaml). Per case: time per decode step and tokens/s, beside the bandwidth floor
((bytes a step reads and writes) / measured copy bandwidth); and how many 8000-token sequences fit a
4 GB cache at each conversion, with the tokens/s at that occupancy.

    python bench/engine_default.py [--out bench/results/engine_default]   # GPU machine
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.engine import STEPS, WARM, WINDOWS, copy_bandwidth, engine_step_time, step_bytes  # noqa: E402

CONVERSIONS = (0.0, 0.5)  # 0.5: PolicySettings.max_ratio, the most a replica converts
CASES = [(1, 2048), (16, 2048), (64, 2048), (16, 8000)]  # 8000 + the decoded tokens stay in its 8192 positions
OCCUPANCY_CONTEXT, OCCUPANCY_BUDGET = 8000, 4 << 30


def read_bytes(hyb, dsla_layers) -> int:
    """Weights a decode step reads: the teacher's (a tied embedding is read whole as the lm_head)
    and the DSLA modules of the converted layers."""
    total = 0
    for name, p in hyb.model.named_parameters():
        if ".self_attn.dsla." in name:
            if int(name.split(".layers.")[1].split(".")[0]) not in dsla_layers:
                continue
        elif name.endswith("embed_tokens.weight") and not hyb.config.tie_word_embeddings:
            continue  # a step reads B rows of an untied embedding
        total += p.numel() * p.element_size()
    return total


def run(out):
    from dsla_model.engine import Engine, EngineConfig
    from dsla_model.hybrid import HybridModel
    from dsla_model.layer_store import LayerStore, shipped_store
    from dsla_model.loading import load_model
    from dsla_model.order_cache import layers_for_conversion

    model, tok, model_id = load_model("default", dtype=torch.bfloat16, device="cuda")
    hyb = HybridModel(model)
    store = LayerStore(shipped_store(hyb.fingerprint))
    order = store.read_manifest()["order"]
    store.apply(hyb, layers_for_conversion(order, max(CONVERSIONS)))  # modules for every layer measured
    bw = copy_bandwidth()
    res = {"card": torch.cuda.get_device_name(), "command": "python " + " ".join(sys.argv),
           "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "torch": torch.__version__, "model": model_id, "store_version": store.read_manifest()["version"],
           "state_dtype": "bfloat16-recency", "copy_bandwidth_Bps": bw, "decode": [], "occupancy": []}
    max_len = max(c for _, c in CASES) + WARM + WINDOWS * STEPS + 8
    cfg = dict(max_running=64, max_batched_tokens=4096, max_model_len=max_len, state_dtype="bfloat16-recency")
    eng = Engine(hyb, tok, EngineConfig(cache_memory_bytes=8 << 30, **cfg))
    small = Engine(hyb, tok, EngineConfig(cache_memory_bytes=OCCUPANCY_BUDGET, **cfg))
    state_bytes = (eng.pool.s1.element_size() + eng.pool.s2.element_size()) / 2
    for e in (eng, small):
        e.pool.kv.normal_()
    for conv in CONVERSIONS:
        layers = layers_for_conversion(order, conv)
        for e in (eng, small):
            e.set_conversion(layers)
        weights = read_bytes(hyb, layers)
        for batch, ctx in CASES:
            t = engine_step_time(eng, batch, ctx)
            floor = step_bytes(weights, hyb, len(layers), batch, ctx, state_bytes) / bw
            res["decode"].append({"conversion": conv, "dsla_layers": len(layers), "batch": batch, "context": ctx,
                                  "step_ms": t * 1e3, "tokens_per_s": batch / t, "floor_ms": floor * 1e3,
                                  "x_floor": t / floor})
            print(res["decode"][-1], flush=True)
        seqs = min(small.capacity(OCCUPANCY_CONTEXT + WARM + WINDOWS * STEPS + 2), cfg["max_running"])
        t = engine_step_time(small, seqs, OCCUPANCY_CONTEXT)
        res["occupancy"].append({"conversion": conv, "context": OCCUPANCY_CONTEXT, "cache_bytes": OCCUPANCY_BUDGET,
                                 "seqs": seqs, "step_ms": t * 1e3, "tokens_per_s": seqs / t})
        print(res["occupancy"][-1], flush=True)
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out + ".json", "w") as f:
        json.dump(res, f, indent=1)
    write_md(res, out + ".md")
    return res


def write_md(res, path):
    lines = [f"# Engine decode on the default model — {res['card']}", "",
             f"`{res['command']}`, {res['date']}, torch {res['torch']}; {res['model']} in bf16, shipped store version "
             f"{res['store_version']}, {res['state_dtype']} states; copy bandwidth "
             f"{res['copy_bandwidth_Bps'] / 1e12:.2f} TB/s (read + write). Floor: the bytes a step reads and writes / "
             "that bandwidth.", "",
             "| conversion | batch | context | step (ms) | tokens/s | floor (ms) | x floor |", "|---|---|---|---|---|---|---|"]
    for r in res["decode"]:
        lines.append(f"| {r['conversion']:.0%} ({r['dsla_layers']} layers) | {r['batch']} | {r['context']} | "
                     f"{r['step_ms']:.3f} | {r['tokens_per_s']:.0f} | {r['floor_ms']:.3f} | {r['x_floor']:.2f} |")
    lines += ["", f"Sequences of {OCCUPANCY_CONTEXT} tokens in a {OCCUPANCY_BUDGET >> 30} GiB cache (capped at the "
              "engine's 64 running):", "", "| conversion | sequences | step (ms) | tokens/s |", "|---|---|---|---|"]
    for r in res["occupancy"]:
        lines.append(f"| {r['conversion']:.0%} | {r['seqs']} | {r['step_ms']:.3f} | {r['tokens_per_s']:.0f} |")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/results/engine_default")
    run(ap.parse_args().out)
