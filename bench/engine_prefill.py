"""Prefill benchmark of the engine (GPU): time to first token of one long prompt, and prefill tokens/s.

bench/engine.py times decode steps over sequences put straight into the cache; this one times what a
request's prompt costs before its first token: the engine's chunked prefill (`max_batched_tokens` per
step) through the general forward (paged KV written and read back per piece for attention layers, the
fused chunked DSLA kernel for converted ones), at each conversion. In the same run: HF transformers'
forward over the whole prompt at once (SDPA flash attention, all layers softmax; `logits_to_keep=1`),
and a compute floor: the step's matmul FLOPs (projections, MLP, lm_head row, causal attention
scores) over the bf16 GEMM throughput measured here on a 8192 x 4096 x 11008 product.

    python bench/engine_prefill.py                  # Llama-2-7B shape, random bf16 weights
    python bench/engine_prefill.py --model default  # SmolLM2-135M with the shipped store's layers
    python bench/engine_prefill.py --cpu-smoke      # tiny model on the CPU: checks the script runs

Writes bench/results/engine_prefill[.default].{json,md}.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import bench.engine as be  # noqa: E402

REPEATS = 3
MAX_RUNNING = 16  # the engines' max_running: a chunk (max_batched_tokens) must be at least this


def gemm_flops_per_s() -> float:
    """Measured bf16 matmul throughput (FLOP/s) on a prefill-sized product; the CPU smoke run uses fp32."""
    dt = torch.bfloat16 if be.DEV == "cuda" else torch.float32
    m, k, n = (8192, 4096, 11008) if be.DEV == "cuda" else (256, 128, 256)
    a = torch.randn(m, k, device=be.DEV, dtype=dt)
    b = torch.randn(k, n, device=be.DEV, dtype=dt)
    for _ in range(3):
        a @ b
    t = min(be.sync_time(lambda: [a @ b for _ in range(10)]) / 10 for _ in range(3))
    return 2 * m * k * n / t


def prefill_flops(mc, n_attention: int, length: int) -> float:
    """Matmul FLOPs of one prompt's prefill: every layer's projections and MLP over `length` tokens,
    the causal score and value products of the softmax layers (length^2 / 2 pairs), one lm_head row.
    (A DSLA layer's own chunk products are left out: they are O(length) and small beside the MLP.)"""
    d, f, L = mc.hidden_size, mc.intermediate_size, mc.num_hidden_layers
    hd = getattr(mc, "head_dim", None) or d // mc.num_attention_heads
    kv = mc.num_key_value_heads * hd
    per_token = L * 2 * (d * (d + 2 * kv) + d * d + 3 * d * f)
    attn = n_attention * 2 * 2 * mc.num_attention_heads * hd * length * length / 2
    return per_token * length + attn + 2 * d * mc.vocab_size


def ttft(eng, length: int, vocab: int) -> float:
    """Seconds from add_request to the first token of one `length`-token prompt, the engine idle before."""
    from dsla_model.engine import SamplingParams

    prompt = torch.randint(0, vocab, (length,)).tolist()

    def one():
        rid = eng.add_request(prompt, SamplingParams(max_tokens=1, temperature=0, ignore_eos=True))
        while rid in eng.requests:
            eng.step()

    one()  # warm-up: kernels, allocator, graphs of this shape
    return statistics.median(be.sync_time(one) for _ in range(REPEATS))


def hf_prefill(model, length: int, vocab: int) -> float | None:
    """Seconds for HF's forward over the whole prompt (all layers softmax), or None when it does not fit."""
    ids = torch.randint(0, vocab, (1, length), device=be.DEV)
    try:
        with torch.no_grad():
            model(input_ids=ids, logits_to_keep=1)
            return statistics.median(be.sync_time(lambda: model(input_ids=ids, logits_to_keep=1))
                                     for _ in range(REPEATS))
    except torch.OutOfMemoryError:
        return None
    finally:
        if be.DEV == "cuda":
            torch.cuda.empty_cache()


def build(which: str):
    """(hybrid with a DSLA module for every layer it may convert, tokenizer or None, model id,
    conversions measured, layers converted at each, prompt lengths)."""
    from dsla_model.hybrid import HybridModel

    if which == "default":
        from dsla_model.layer_store import LayerStore, shipped_store
        from dsla_model.loading import load_model
        from dsla_model.order_cache import layers_for_conversion

        model, tok, model_id = load_model("default", dtype=torch.bfloat16, device="cuda")
        hyb = HybridModel(model)
        store = LayerStore(shipped_store(hyb.fingerprint))
        order = store.read_manifest()["order"]
        convs = (0.0, 0.5)  # 0.5: the serving cap (PolicySettings.max_ratio)
        store.apply(hyb, layers_for_conversion(order, max(convs)))
        return hyb, tok, model_id, {c: layers_for_conversion(order, c) for c in convs}, (2048, 8000)
    lengths = (4096, 16384, 32768) if be.DEV == "cuda" else (64, 160)
    model = be.build_model(max(lengths) + 64)
    hyb = HybridModel(model)
    for layer in range(hyb.num_layers):
        hyb.convert(layer)
    hyb.set_dsla_layers([])
    convs = (0.0, 0.5, 0.75)
    ids = "Llama-2-7B shape, random bf16 weights" if be.DEV == "cuda" else "tiny Llama, random fp32 weights"
    return hyb, None, ids, {c: list(range(round(c * hyb.num_layers))) for c in convs}, lengths


def run(args) -> dict:
    from dsla_model.engine import Engine, EngineConfig

    hyb, tok, model_id, layers_at, lengths = build(args.model)
    mc = hyb.config
    res = {"card": torch.cuda.get_device_name() if be.DEV == "cuda" else "cpu (smoke run)",
           "command": "python " + " ".join(sys.argv), "model": model_id,
           "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "torch": torch.__version__, "complete": False, "rows": [], "hf": []}
    res["gemm_flops_per_s"] = gemm_flops_per_s()
    print(res["card"], f"GEMM {res['gemm_flops_per_s'] / 1e12:.3g} TFLOP/s", flush=True)
    hyb.set_dsla_layers([])
    for n in lengths:
        t = hf_prefill(hyb.model, n, mc.vocab_size)
        res["hf"].append({"length": n, "ms": None if t is None else t * 1e3})
        print("hf", res["hf"][-1], flush=True)
    max_len = max(lengths) + 8
    budget = 40 << 30 if be.DEV == "cuda" else 64 << 20
    for chunk in args.chunks:
        eng = Engine(hyb, tok, EngineConfig(max_running=MAX_RUNNING, max_batched_tokens=chunk,
                                            max_model_len=max_len, cache_memory_bytes=budget,
                                            state_dtype=args.state_dtype))
        for conv, layers in layers_at.items():
            eng.set_conversion(layers)
            for n in lengths:
                t = ttft(eng, n, mc.vocab_size)
                floor = prefill_flops(mc, hyb.num_layers - len(layers), n) / res["gemm_flops_per_s"]
                res["rows"].append({"max_batched_tokens": chunk, "conversion": conv, "dsla_layers": len(layers),
                                    "length": n, "ttft_ms": t * 1e3, "prefill_tokens_per_s": n / t,
                                    "floor_ms": floor * 1e3, "x_floor": t / floor})
                print(res["rows"][-1], flush=True)
                save(res, args)
        del eng
        if be.DEV == "cuda":
            torch.cuda.empty_cache()
    if args.profile and be.DEV == "cuda":
        profile_ttft(hyb, tok, layers_at, max(lengths), args, max_len, budget)
    res["complete"] = True
    save(res, args)
    return res


def profile_ttft(hyb, tok, layers_at, length, args, max_len, budget):
    """Kernel totals of one TTFT of the longest prompt at each conversion (first chunk size):
    engine_prefill[.default]_profile.txt."""
    from torch.profiler import ProfilerActivity, profile

    from dsla_model.engine import Engine, EngineConfig, SamplingParams

    eng = Engine(hyb, tok, EngineConfig(max_running=MAX_RUNNING, max_batched_tokens=args.chunks[0],
                                        max_model_len=max_len, cache_memory_bytes=budget,
                                        state_dtype=args.state_dtype))
    lines = [f"# {torch.cuda.get_device_name()}, `python {' '.join(sys.argv)}`", "kernel | calls | ms"]
    prompt = torch.randint(0, hyb.config.vocab_size, (length,)).tolist()
    for conv, layers in layers_at.items():
        eng.set_conversion(layers)
        ttft(eng, 256, hyb.config.vocab_size)  # warm
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
            rid = eng.add_request(prompt, SamplingParams(max_tokens=1, temperature=0, ignore_eos=True))
            while rid in eng.requests:
                eng.step()
            torch.cuda.synchronize()
        tl_ = be.kernel_timeline(be.kernel_events(prof, args.out))
        lines.append(f"## {conv:.0%} conversion, prompt {length}, max_batched_tokens {args.chunks[0]}: "
                     f"{tl_['kernels']} kernels, span {tl_['span_us'] / 1e3:.1f} ms, busy {tl_['busy_us'] / 1e3:.1f}, "
                     f"idle between kernels {tl_['idle_us'] / 1e3:.1f}")
        lines += [f"| {n} | {v['calls']} | {v['total'] / 1e3:.2f} |"
                  for n, v in list(tl_["per_kernel_us"].items())[:25]]
    open(_stem(args) + "_profile.txt", "w").write("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


def _stem(args) -> str:
    return os.path.join(args.out, "engine_prefill" + (".default" if args.model == "default" else ""))


def save(res, args):
    json.dump(res, open(_stem(args) + ".json", "w"), indent=1)
    hf = {r["length"]: r["ms"] for r in res["hf"]}
    lines = [f"# Engine prefill: time to first token, {res['model']}", "",
             f"- card: {res['card']}; torch {res['torch']}; {res['date']}",
             f"- command: `{res['command']}`",
             f"- state_dtype {args.state_dtype}; GEMM throughput measured in this run: "
             f"{res['gemm_flops_per_s'] / 1e12:.3g} TFLOP/s (the floor is the prefill's matmul FLOPs over it)",
             "- HF: transformers' forward over the whole prompt at once, every layer softmax (SDPA)", "",
             "| max_batched_tokens | conversion | prompt | TTFT (ms) | prefill tok/s | floor (ms) | x floor | HF one-shot (ms) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        h = hf.get(r["length"])
        lines.append(f"| {r['max_batched_tokens']} | {r['conversion']:.0%} ({r['dsla_layers']} DSLA) | {r['length']} | "
                     f"{r['ttft_ms']:.1f} | {r['prefill_tokens_per_s']:.0f} | {r['floor_ms']:.1f} | "
                     f"{r['x_floor']:.2f} | {'-' if h is None else f'{h:.1f}'} |")
    if not res["complete"]:
        lines += ["", "(run stopped early: rows so far)"]
    open(_stem(args) + ".md", "w").write("\n".join(lines) + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=("7b", "default"), default="7b")
    ap.add_argument("--chunks", type=lambda s: [int(x) for x in s.split(",")], default=[2048, 8192],
                    help="max_batched_tokens values (comma-separated)")
    ap.add_argument("--state-dtype", default="bfloat16-recency")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    ap.add_argument("--profile", action="store_true", help="kernel totals of one TTFT per conversion (GPU)")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny model on the CPU: checks the script runs")
    args = ap.parse_args()
    if args.cpu_smoke:
        if args.model != "7b":
            sys.exit("--cpu-smoke runs the tiny model only")
        be.DEV = "cpu"
        args.chunks = [32]
        args.state_dtype = "float32"
        args.out = os.path.join(args.out, "smoke")
    from dsla_model.engine import EngineConfig

    for chunk in args.chunks:  # here, not after the model is built and HF timed (minutes on a GPU)
        try:
            EngineConfig(max_running=MAX_RUNNING, max_batched_tokens=chunk, state_dtype=args.state_dtype).validate()
        except ValueError as e:
            ap.error(str(e))
    if not args.cpu_smoke and not torch.cuda.is_available():
        sys.exit("engine_prefill.py needs a CUDA device (or --cpu-smoke)")
    os.makedirs(args.out, exist_ok=True)
    run(args)


if __name__ == "__main__":
    main()
