"""Decode benchmark of the engine on a Llama-2-7B-shaped model (random bf16 weights).

For 0/25/50/75% of layers converted to DSLA: time per decode step and tokens/s at
batch 1/4/16 and context 4K/16K/32K where they fit; the most 32K-context sequences
that fit an 80 GB budget (weights + cache) and tokens/s at that occupancy. In the
same run: HF transformers' eager forward loop and the bandwidth floor
((weight bytes + cache bytes) / measured copy bandwidth). Sequences enter the
cache "prefilled" with random contents (decode time does not depend on the
values), so the run spends its time on decode steps, not on 32K-token prefills.

    python bench/engine.py [--profile]     # GPU machine: bench/results/engine.{json,md,png}
    python bench/engine.py --plot-only     # the PNG from the JSON (needs matplotlib)
    python bench/engine.py --cpu-throughput  # CPU, default model: engine vs HF generate (engine.cpu.*)
    python bench/engine.py --cpu-smoke     # a tiny model on the CPU: checks this script runs
"""
from __future__ import annotations

import argparse
import datetime
import inspect
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

BUDGET = 80e9  # bytes for weights + cache, whatever the card holds
RESERVE = 3e9  # activations, graph pools, logits, block tables
CONTEXTS = (4096, 16384, 32768)
BATCHES = (1, 4, 16)
CONVERSIONS = (0.0, 0.25, 0.5, 0.75)
STEPS, WARM, WINDOWS = 12, 3, 3


NAME = "engine"  # the results' file stem (--state-dtype bfloat16: engine.bfloat16-states)
DEV = "cuda"  # --cpu-smoke switches everything to a tiny model on the CPU (checks the script, not speed)


def _sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


def sync_time(fn):
    _sync()
    t0 = time.perf_counter()
    fn()
    _sync()
    return time.perf_counter() - t0


def copy_bandwidth(nbytes=2 << 30):
    if DEV != "cuda":
        a = torch.empty(nbytes >> 6, dtype=torch.uint8)
        return 2 * a.numel() / sync_time(lambda: a.clone())
    a = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    ts = []
    for _ in range(10):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        b.copy_(a)
        e1.record()
        torch.cuda.synchronize()
        ts.append(e0.elapsed_time(e1) / 1e3)
    del a, b
    return 2 * nbytes / statistics.median(ts)  # bytes read + written per second


def build_model(max_len):
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000, max_position_embeddings=max_len, rms_norm_eps=1e-5,
                      tie_word_embeddings=False)
    dtype = torch.bfloat16
    if DEV != "cuda":
        cfg = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                          num_key_value_heads=4, vocab_size=512, max_position_embeddings=max_len)
        dtype = torch.float32
    torch.manual_seed(0)
    with torch.device(DEV):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa")
    return model.eval()


def hf_step_time(model, batch, ctx):
    """HF's eager loop with DynamicCache: median seconds per decode step."""
    from transformers import DynamicCache

    kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    ids = torch.randint(0, model.config.vocab_size, (batch, ctx), device=DEV)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1, **{kw: cache})
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        ts = []
        for _ in range(WARM + 8):
            def one():
                nonlocal nxt
                o = model(input_ids=nxt, use_cache=True, logits_to_keep=1, **{kw: cache})
                nxt = o.logits[:, -1].argmax(-1, keepdim=True)
            ts.append(sync_time(one))
    del cache, out
    if DEV == "cuda":
        torch.cuda.empty_cache()
    return statistics.median(ts[WARM:])


def add_prefilled(eng, batch, ctx, gen):
    """Put `batch` sequences of `ctx` tokens straight into the running set."""
    from dsla_model.engine import SamplingParams
    from dsla_model.engine.seq_cache import SeqCache

    for _ in range(batch):
        prompt = torch.randint(0, eng.vocab_size, (ctx,)).tolist()
        rid = eng.add_request(prompt, SamplingParams(max_tokens=gen, temperature=0, ignore_eos=True))
        r = eng.requests[rid]
        eng.scheduler.waiting.remove(r)
        r.cache = SeqCache(eng.pool, r.conf, r.max_len)
        r.num_computed = ctx
        r.tokens.append(0)
        eng.scheduler.running.append(r)


def engine_step_time(eng, batch, ctx):
    """Wall time per step of STEPS consecutive engine steps (median of WINDOWS windows): a serving
    loop's steady state, in which the pipelined engine launches step N+1 before it reads step N."""
    add_prefilled(eng, batch, ctx, WARM + WINDOWS * STEPS + 2)
    for _ in range(WARM):
        eng.step()
    ts = [sync_time(lambda: [eng.step() for _ in range(STEPS)]) / STEPS for _ in range(WINDOWS)]
    for rid in list(eng.requests):
        eng.abort(rid)
    eng.step()
    return statistics.median(ts)


def kernel_events(prof, out):
    """The device kernels a torch profiler saw, in start order (via its chrome trace, written
    to `out` and removed): dicts with name, ts and dur in us."""
    path = os.path.join(out, "profile_trace.json")
    prof.export_chrome_trace(path)
    try:
        evs = [e for e in json.load(open(path))["traceEvents"] if e.get("cat") == "kernel"]
    finally:
        os.remove(path)
    return sorted(evs, key=lambda e: e["ts"])


def kernel_timeline(evs):
    """Busy time, idle gaps and per-kernel totals of kernel events (kernel_events): the gaps
    are what kernel boundaries cost inside a graph replay."""
    if not evs:
        return {"kernels": 0}
    busy, end, per = 0.0, evs[0]["ts"], {}
    for e in evs:
        start, stop = max(e["ts"], end), e["ts"] + e["dur"]
        busy += max(0.0, stop - start)
        end = max(end, stop)
        n = e["name"].split("(")[0][:60]
        c, t = per.get(n, (0, 0.0))
        per[n] = (c + 1, t + e["dur"])
    span = end - evs[0]["ts"]
    return {"kernels": len(evs), "span_us": span, "busy_us": busy, "idle_us": span - busy,
            "per_kernel_us": {n: {"calls": c, "total": t} for n, (c, t) in
                              sorted(per.items(), key=lambda kv: -kv[1][1])}}


def gemv_breakdown(evs, layers, n_dsla):
    """The _gemv kernels of whole decode steps by projection and layer kind: a step launches
    q/k/v, o, gate/up and down per layer (DSLA layers first), then lm_head. None when the
    trace does not have that shape (cuBLAS picked for some projection)."""
    g = [e for e in evs if e["name"].startswith("_gemv")]
    per_step = 4 * layers + 1
    if not g or len(g) % per_step:
        return None
    out = {}
    for i, e in enumerate(g):
        j = i % per_step
        name = "lm_head" if j == 4 * layers else (("dsla " if j // 4 < n_dsla else "attention ")
                                                   + ("qkv", "o", "gate_up", "down")[j % 4])
        c, t = out.get(name, (0, 0.0))
        out[name] = (c + 1, t + e["dur"])
    return {n: {"calls": c, "total": t} for n, (c, t) in out.items()}


def profile_steps(eng, hyb, out, steps=5, name="engine"):
    """Kernel time breakdown of decode steps at batch 4, 16K (graph replays), all-attention and 75%
    converted: per-kernel totals and the idle time between kernels (engine_profile.json/.txt)."""
    from torch.profiler import ProfilerActivity, profile

    res, lines = {}, []
    for conv in (0.0, 0.75):
        eng.set_conversion(list(range(round(conv * hyb.num_layers))))
        add_prefilled(eng, 4, CONTEXTS[1], 3 + steps + 2)
        for _ in range(3):
            eng.step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                eng.step()
            torch.cuda.synchronize()
        for rid in list(eng.requests):
            eng.abort(rid)
        eng.step()
        evs = kernel_events(prof, out)
        tl_ = kernel_timeline(evs)
        tl_["gemv_us"] = gemv_breakdown(evs, hyb.num_layers, round(conv * hyb.num_layers))
        res[str(conv)] = tl_
        lines.append(f"## {conv:.0%} conversion, batch 4, {CONTEXTS[1] // 1024}K, {steps} steps: "
                     f"{tl_['kernels'] / steps:.0f} kernels/step, span {tl_['span_us'] / steps / 1e3:.3f} ms/step, "
                     f"busy {tl_['busy_us'] / steps / 1e3:.3f}, idle between kernels "
                     f"{tl_['idle_us'] / steps / 1e3:.3f}")
        lines += [f"| {n} | {v['calls'] / steps:.0f} | {v['total'] / steps:.1f} |"
                  for n, v in tl_["per_kernel_us"].items()]
        lines += [f"| _gemv: {n} | {v['calls'] / steps:.0f} | {v['total'] / steps:.1f} |"
                  for n, v in (tl_["gemv_us"] or {}).items()]
    meta = {"card": torch.cuda.get_device_name(), "command": "python " + " ".join(sys.argv),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    json.dump(dict(meta, profile=res), open(os.path.join(out, name + "_profile.json"), "w"), indent=1)
    open(os.path.join(out, name + "_profile.txt"), "w").write(
        f"# {meta['card']}, {meta['date']}, `{meta['command']}`\nkernel | calls/step | us/step\n"
        + "\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


def step_bytes(weight_bytes, hyb, n_dsla, batch, ctx, state_bytes=4):
    """What one decode step must move: every weight once, each attention layer's KV once,
    each DSLA state pair read and written once (state_bytes per state element)."""
    kv_per_token_layer = 2 * hyb.num_kv_heads * hyb.head_dim * 2
    pair = 2 * hyb.num_kv_heads * hyb.head_dim ** 2 * state_bytes
    n_attn = hyb.num_layers - n_dsla
    return weight_bytes + batch * (n_attn * ctx * kv_per_token_layer + n_dsla * 2 * pair)


def run(args):
    from dsla_model.engine import Engine, EngineConfig
    from dsla_model.hybrid import HybridModel

    res = {"card": torch.cuda.get_device_name() if DEV == "cuda" else "cpu (smoke run)", "command": "python " + " ".join(sys.argv),
           "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "torch": torch.__version__, "budget_bytes": BUDGET, "state_dtype": args.state_dtype}
    import transformers
    res["transformers"] = transformers.__version__
    try:
        import triton
        res["triton"] = triton.__version__
    except ImportError:
        res["triton"] = None
    res["complete"] = False  # set at the end: a run stopped early (time limit) leaves its rows so far
    bw = copy_bandwidth()
    res["copy_bandwidth_Bps"] = bw
    print(f"{res['card']}: copy bandwidth {bw / 1e12:.2f} TB/s", flush=True)
    max_len = max(CONTEXTS) + 64
    model = build_model(max_len)
    res["hf"] = []
    c0, c1 = CONTEXTS[0], CONTEXTS[1]
    for batch, ctx in [(1, c0), (4, c1), (16, c0)]:
        try:
            t = hf_step_time(model, batch, ctx)
            res["hf"].append({"batch": batch, "context": ctx, "step_ms": t * 1e3, "tokens_per_s": batch / t})
        except torch.OutOfMemoryError:  # as BASELINES.md saw for long contexts: concatenated cache growth
            torch.cuda.empty_cache()
            res["hf"].append({"batch": batch, "context": ctx, "step_ms": None, "error": "out of memory"})
        print("hf", res["hf"][-1], flush=True)
        save(res, args.out)

    hyb = HybridModel(model)
    for layer in range(hyb.num_layers):  # create every DSLA module now, so the budget counts them
        hyb.convert(layer)
    hyb.set_dsla_layers([])
    weight_bytes = sum(p.numel() * p.element_size() for p in hyb.parameters())
    embed = hyb.model.model.embed_tokens.weight
    read_bytes = weight_bytes - embed.numel() * embed.element_size()  # a step reads B rows of the embedding
    res["weight_bytes"] = weight_bytes
    cache_budget = int(BUDGET - weight_bytes - RESERVE)
    eng = Engine(hyb, None, EngineConfig(max_running=64, max_batched_tokens=4096, max_model_len=max_len,
                                         cache_memory_bytes=cache_budget, state_dtype=args.state_dtype))
    state_bytes = (eng.pool.s1.element_size() + eng.pool.s2.element_size()) / 2  # per element of a pair
    eng.pool.kv.normal_()  # finite random KV everywhere (state pairs are zeroed when handed out)
    res["cache_budget_bytes"] = eng.pool.budget_bytes
    res["decode"], res["max_occupancy"] = [], []
    # first pass: the cases of the Targets table (so that a run cut short still has them); then the rest
    first = [(1, c0), (4, c1)]
    rest = [(b, c) for c in CONTEXTS for b in BATCHES if (b, c) not in first]
    passes = [(0.0, first, True), (0.75, first, True)]
    if not args.quick:
        # conversions the first pass did not measure take its cases too
        passes += [(conv, rest if conv in (0.0, 0.75) else first + rest, conv not in (0.0, 0.75))
                   for conv in CONVERSIONS]
    for conv, grid, occupancy in passes:
        n = round(conv * hyb.num_layers)
        t0 = time.perf_counter()
        eng.set_conversion(list(range(n)))
        swap_s = time.perf_counter() - t0
        for batch, ctx in grid:
            if eng.capacity(ctx + WARM + WINDOWS * STEPS + 2) < batch:
                res["decode"].append({"conversion": conv, "batch": batch, "context": ctx, "fits": False})
                continue
            t = engine_step_time(eng, batch, ctx)
            floor = step_bytes(read_bytes, hyb, n, batch, ctx, state_bytes) / bw
            res["decode"].append({"conversion": conv, "dsla_layers": n, "batch": batch, "context": ctx, "fits": True,
                                  "step_ms": t * 1e3, "tokens_per_s": batch / t, "floor_ms": floor * 1e3,
                                  "x_floor": t / floor})
            print(res["decode"][-1], flush=True)
            save(res, args.out)
        ctx = max(CONTEXTS)
        cap = min(eng.capacity(ctx + WARM + WINDOWS * STEPS + 2), 64)
        if cap >= 1 and occupancy:
            t = engine_step_time(eng, cap, ctx)
            floor = step_bytes(read_bytes, hyb, n, cap, ctx, state_bytes) / bw
            res["max_occupancy"].append({"conversion": conv, "dsla_layers": n, "context": ctx, "seqs": cap,
                                         "step_ms": t * 1e3, "tokens_per_s": cap / t, "floor_ms": floor * 1e3,
                                         "swap_ms": swap_s * 1e3})
            print(res["max_occupancy"][-1], flush=True)
            save(res, args.out)
    res["graph_captures"] = eng.graphs.captures if eng.graphs else 0
    if DEV == "cuda":
        from kernels.gemv_dispatch import choices

        res["gemv_choices"] = choices()
    if args.profile and DEV == "cuda":
        profile_steps(eng, hyb, args.out, name=NAME)
    res["complete"] = True
    return res


def save(res, out):
    if "decode" not in res:  # only the HF rows so far
        return json.dump(res, open(os.path.join(out, NAME + ".json"), "w"), indent=1)
    res["targets"] = targets(res)
    json.dump(res, open(os.path.join(out, NAME + ".json"), "w"), indent=1)
    write_md(res, os.path.join(out, NAME + ".md"))


def _find(rows, **kw):
    for r in rows:
        if all(r.get(k) == v for k, v in kw.items()) and r.get("step_ms"):
            return r
    return None


def targets(res):
    out = {}
    r = _find(res["decode"], conversion=0.0, batch=1, context=CONTEXTS[0])
    if r:
        out["b1_4k_all_attention_x_floor"] = {"value": r["x_floor"], "target": "<= 1.5", "met": r["x_floor"] <= 1.5}
    mid = CONTEXTS[1]
    a, c = _find(res["decode"], conversion=0.0, batch=4, context=mid), _find(res["decode"], conversion=0.75, batch=4,
                                                                              context=mid)
    if a and c:
        v = a["step_ms"] / c["step_ms"]
        out["b4_16k_75pct_speedup_per_step"] = {"value": v, "target": ">= 2", "met": v >= 2}
    a, c = _find(res["max_occupancy"], conversion=0.0), _find(res["max_occupancy"], conversion=0.75)
    if a and c:
        v = c["tokens_per_s"] / a["tokens_per_s"]
        out["max_occupancy_32k_75pct_tokens_per_s_ratio"] = {"value": v, "target": ">= 3", "met": v >= 3}
    return out


def write_md(res, path):
    L = [f"# Engine decode benchmark\n", f"Card: **{res['card']}**; {res['date']}; torch {res['torch']}, "
         f"transformers {res['transformers']}, triton {res['triton']}.  ",
         f"Command: `{res['command']}`.  ",
         f"DSLA state pools: **{res.get('state_dtype', 'float32')}** (EngineConfig.state_dtype).  ",
         f"Llama-2-7B shape, random bf16 weights ({res['weight_bytes'] / 1e9:.2f} GB incl. all DSLA modules); "
         f"budget {res['budget_bytes'] / 1e9:.0f} GB = weights + {res['cache_budget_bytes'] / 1e9:.1f} GB cache pool "
         f"+ reserve. Copy bandwidth (read + write) {res['copy_bandwidth_Bps'] / 1e12:.2f} TB/s. "
         f"Each time is wall clock per step over {STEPS} consecutive engine steps, median of {WINDOWS} such "
         "windows (CUDA graphs, sampling included; greedy decode steps are pipelined: the host launches step "
         "N+1 before it reads step N's tokens).\n",
         *([] if res.get("complete", True) else ["**This run stopped early (time limit): cases missing from the "
                                                 "tables below were not measured.**\n"]),
         "## Targets\n", "| target | value | goal | met |", "| --- | --- | --- | --- |"]
    for k, t in res["targets"].items():
        L.append(f"| {k} | {t['value']:.2f} | {t['target']} | {'yes' if t['met'] else 'no'} |")
    L += ["\n## Decode step\n", "| conversion | batch | context | step ms | tokens/s | floor ms | x floor |",
          "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in sorted(res["decode"], key=lambda r: (r["conversion"], r["context"], r["batch"])):
        if r["fits"]:
            L.append(f"| {r['conversion']:.0%} | {r['batch']} | {r['context']} | {r['step_ms']:.2f} | "
                     f"{r['tokens_per_s']:.0f} | {r['floor_ms']:.2f} | {r['x_floor']:.2f} |")
        else:
            L.append(f"| {r['conversion']:.0%} | {r['batch']} | {r['context']} | does not fit | | | |")
    L += ["\n## Most 32K-context sequences in the budget\n",
          "| conversion | sequences | step ms | tokens/s | floor ms | swap ms |", "| --- | --- | --- | --- | --- | --- |"]
    for r in sorted(res["max_occupancy"], key=lambda r: r["conversion"]):
        L.append(f"| {r['conversion']:.0%} | {r['seqs']} | {r['step_ms']:.2f} | {r['tokens_per_s']:.0f} | "
                 f"{r['floor_ms']:.2f} | {r['swap_ms']:.1f} |")
    L += ["\n## HF transformers eager loop (DynamicCache, same model, same run)\n",
          "| batch | context | step ms | tokens/s |", "| --- | --- | --- | --- |"]
    for r in res["hf"]:
        if r.get("step_ms"):
            L.append(f"| {r['batch']} | {r['context']} | {r['step_ms']:.2f} | {r['tokens_per_s']:.1f} |")
        else:
            L.append(f"| {r['batch']} | {r['context']} | {r.get('error')} | |")
    if res.get("gemv_choices"):
        L += ["\n## Skinny-GEMM dispatch (measured per shape at first use, this run)\n", "| shape | kernel |",
              "| --- | --- |"] + [f"| {k} | {v} |" for k, v in sorted(res["gemv_choices"].items())]
    open(path, "w").write("\n".join(L) + "\n")


def plot(res, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for batch, ctx in [(1, 4096), (4, 16384), (16, 4096), (4, 32768), (1, 64), (4, 128)]:
        rows = [r for r in res["decode"] if r["batch"] == batch and r["context"] == ctx and r["fits"]]
        if rows:
            axes[0].plot([r["conversion"] * 100 for r in rows], [r["step_ms"] for r in rows], "o-",
                         label=f"B={batch}, {ctx // 1024}K")
    axes[0].set(xlabel="layers converted (%)", ylabel="ms per decode step", title="Decode step time")
    axes[0].legend()
    occ = res["max_occupancy"]
    axes[1].bar([f"{r['conversion']:.0%}\n{r['seqs']} seqs" for r in occ], [r["tokens_per_s"] for r in occ])
    axes[1].set(ylabel="tokens/s", title=f"Max 32K-context occupancy in {res['budget_bytes'] / 1e9:.0f} GB")
    fig.suptitle(f"DSLA-Serve engine, Llama-2-7B shape, {res['card']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    ap.add_argument("--quick", action="store_true", help="a few configurations only (a smoke run)")
    ap.add_argument("--plot-only", action="store_true")
    ap.add_argument("--profile", action="store_true", help="also write a kernel-time profile (engine_profile.txt)")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny model on the CPU: checks the script runs")
    ap.add_argument("--cpu-throughput", action="store_true",
                    help="default model on the CPU: 16 requests, engine vs HF generate one by one")
    from dsla_model.engine.config import STATE_FORMATS

    ap.add_argument("--state-dtype", default="float32", choices=sorted(STATE_FORMATS),
                    help="the DSLA state pools' dtype (EngineConfig.state_dtype); results go to "
                         "engine.<dtype>-states.* unless float32")
    args = ap.parse_args()
    global NAME
    NAME = "engine" if args.state_dtype == "float32" else f"engine.{args.state_dtype}-states"
    if args.cpu_throughput:
        from bench.engine_cpu import cpu_throughput

        os.makedirs(args.out, exist_ok=True)
        return cpu_throughput(args.out)
    if args.cpu_smoke:
        global DEV, BUDGET, RESERVE, CONTEXTS, BATCHES, STEPS
        DEV, BUDGET, RESERVE, CONTEXTS, BATCHES, STEPS = "cpu", 40e6, 0, (64, 128, 256), (1, 4, 16), 3
    os.makedirs(args.out, exist_ok=True)
    jpath = os.path.join(args.out, NAME + ".json")
    if not args.plot_only:
        res = run(args)
        save(res, args.out)
        print(json.dumps(res["targets"], indent=1))
    res = json.load(open(jpath))
    try:
        plot(res, os.path.join(args.out, NAME + ".png"))
    except ImportError:
        print("matplotlib missing: run with --plot-only where it is installed")


if __name__ == "__main__":
    main()
