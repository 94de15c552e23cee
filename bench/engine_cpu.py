"""The engine against HF `generate` on the CPU (default model): 16 requests as one continuous
batch vs one after another. Run through `python bench/engine.py --cpu-throughput`."""
from __future__ import annotations

import datetime
import json
import os
import platform
import sys
import time

import torch


def cpu_throughput(out_dir, n=16, max_tokens=32):
    """Default model on the CPU: 16 concurrent requests through the engine vs HF `generate`
    on them one after another (greedy, same DSLA layers). Writes engine.cpu.{json,md}."""
    from dsla_model.engine import Engine, EngineConfig, SamplingParams
    from dsla_model.hybrid import HybridModel
    from dsla_model.loading import load_model

    model, tok, _ = load_model("default")
    hyb = HybridModel(model)
    texts = ["The GNU General Public License", "def quicksort(xs):", "Once upon a time, in a", "The capital of",
             "import torch\n", "Linear attention", "Q: Why is the sky blue?\nA:", "Dear colleagues,",
             "The weather", "In 1905,", "Rust and C++", "Fruits: apple,", "Hello! How are", "To be or not",
             "SELECT * FROM", "The mitochondria is"][:n]
    prompts = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    # a CPU measurement by design: say so where a reader looks for the card
    res = {"model": "SmolLM2-135M-Instruct (fp32)", "gpu": None,
           "device": f"CPU only, no GPU ({os.cpu_count()} cores, {platform.machine()})",
           "threads": torch.get_num_threads(), "requests": n,
           "max_tokens": max_tokens, "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "command": "python " + " ".join(sys.argv), "runs": []}
    for layers in ([], [0, 7, 14, 29]):
        hyb.set_dsla_layers(layers)
        eng = Engine(hyb, tok, EngineConfig(max_running=n, cache_memory_bytes=256 << 20))
        sp = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
        eng.generate(prompts[:2], SamplingParams(max_tokens=2, temperature=0))  # warm-up
        t0 = time.perf_counter()
        outs = eng.generate(prompts, sp)
        t_eng = time.perf_counter() - t0
        t0 = time.perf_counter()
        hf_tokens = 0
        for p in prompts:
            ids = torch.tensor([p])
            g = hyb.generate(ids, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False,
                             pad_token_id=tok.eos_token_id)
            hf_tokens += g.shape[1] - len(p)
        t_hf = time.perf_counter() - t0
        toks = sum(len(o) for o in outs)
        res["runs"].append({"dsla_layers": layers, "engine_s": t_eng, "engine_tokens_per_s": toks / t_eng,
                            "hf_generate_s": t_hf, "hf_tokens_per_s": hf_tokens / t_hf,
                            "speedup": (toks / t_eng) / (hf_tokens / t_hf)})
        print(res["runs"][-1], flush=True)
    hyb.set_dsla_layers([])
    json.dump(res, open(os.path.join(out_dir, "engine.cpu.json"), "w"), indent=1)
    L = ["# Engine vs HF generate on the CPU (default model)\n",
         f"{res['date']}; `{res['command']}`; {n} requests x {max_tokens} greedy tokens; torch threads "
         f"{res['threads']} on a shared 2-core development machine. Engine: all requests as one continuous "
         "batch. HF: `generate` on each request in turn.\n",
         "| DSLA layers | engine s | engine tok/s | HF generate s | HF tok/s | speedup |", "| --- | --- | --- | --- | --- | --- |"]
    for r in res["runs"]:
        L.append(f"| {r['dsla_layers'] or 'none'} | {r['engine_s']:.1f} | {r['engine_tokens_per_s']:.1f} | "
                 f"{r['hf_generate_s']:.1f} | {r['hf_tokens_per_s']:.1f} | {r['speedup']:.1f}x |")
    open(os.path.join(out_dir, "engine.cpu.md"), "w").write("\n".join(L) + "\n")
