"""How long a running stream waits while the engine prefills a long prompt, per chunk size (CPU).

Chunked prefill shares each step between the running streams' decodes and a piece of at most
`max_batched_tokens` prompt tokens, so the piece size bounds the gap between a stream's tokens
while another request's prompt is prefilled. For each size: one greedy stream decodes, a long
prompt arrives, and we time the prompt's first token (TTFT) and the stream's longest gap.
Writes engine_stall.json / .md under --out, naming the machine (a CPU measurement: "gpu": null).

    python bench/engine_stall.py [--chunks 2048,1024,512,256] [--prompt-tokens 4000] [--dsla-layers 0,7]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MAX_RUNNING = 16


def _model(name: str):
    """(hybrid, tokenizer or None, prompt token source): the default model, or a tiny random Llama."""
    from dsla_model.hybrid import HybridModel

    if name == "default":
        from dsla_model.loading import load_model

        model, tok, _ = load_model("default")
        text = open("/usr/share/common-licenses/GPL-3", encoding="utf-8").read()  # Debian's base-files
        return HybridModel(model), tok, tok(text, add_special_tokens=False)["input_ids"]
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=256, max_position_embeddings=4096)
    ids = torch.randint(0, 256, (8192,), generator=torch.Generator().manual_seed(1)).tolist()
    return HybridModel(LlamaForCausalLM(cfg).eval()), None, ids


def measure(hyb, tok, source, chunk: int, prompt_tokens: int) -> dict:
    """One stream decoding, then a long prompt: its TTFT and the stream's gaps until then."""
    from dsla_model.engine import Engine, EngineConfig, SamplingParams

    eng = Engine(hyb, tok, EngineConfig(max_running=MAX_RUNNING, max_batched_tokens=chunk,
                                        cache_memory_bytes=512 << 20))
    short, long_ids = source[:8], source[:prompt_tokens]
    eng.generate([short], SamplingParams(max_tokens=2, temperature=0))  # warm-up
    stream = eng.add_request(short, SamplingParams(max_tokens=prompt_tokens, temperature=0, ignore_eos=True))
    while not any(e.request_id == stream for e in eng.step()):  # the stream is decoding
        pass
    t0 = last = time.perf_counter()
    prompt = eng.add_request(long_ids, SamplingParams(max_tokens=1, temperature=0, ignore_eos=True))
    gaps, ttft, steps = [], None, 0
    while ttft is None:
        events = eng.step()
        steps += 1
        now = time.perf_counter()
        if any(e.request_id == stream for e in events):
            gaps.append(now - last)
            last = now
        if any(e.request_id == prompt for e in events):
            ttft = now - t0
    eng.abort(stream)
    return dict(max_batched_tokens=chunk, prompt_tokens=len(long_ids), ttft_s=ttft, longest_gap_s=max(gaps),
                stream_tokens_meanwhile=len(gaps), steps=steps)


def run(args) -> dict:
    hyb, tok, source = _model(args.model)
    if args.dsla_layers:
        hyb.set_dsla_layers(args.dsla_layers)
    res = {"model": "SmolLM2-135M-Instruct (fp32)" if args.model == "default" else "tiny random Llama",
           "gpu": None, "device": f"CPU only, no GPU ({os.cpu_count()} cores, {platform.machine()})",
           "threads": torch.get_num_threads(), "dsla_layers": args.dsla_layers,
           "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "command": "python " + " ".join(sys.argv), "rows": []}
    for chunk in args.chunks:
        res["rows"].append(measure(hyb, tok, source, chunk, args.prompt_tokens))
        print(res["rows"][-1], flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "engine_stall.json"), "w") as f:
        json.dump(res, f, indent=1)
    L = ["# A running stream's wait while a long prompt is prefilled (CPU)\n",
         f"{res['date']}; `{res['command']}`; {res['model']}, {res['device']}, torch threads {res['threads']}; "
         f"DSLA layers {res['dsla_layers'] or 'none'}. One greedy stream decodes; a {args.prompt_tokens}-token "
         "prompt arrives; TTFT is the prompt's first token, the gap the longest wait between two of the "
         "stream's tokens meanwhile.\n",
         "| max_batched_tokens | TTFT (s) | stream's longest gap (s) | stream tokens meanwhile | steps |",
         "| --- | --- | --- | --- | --- |"]
    L += [f"| {r['max_batched_tokens']} | {r['ttft_s']:.2f} | {r['longest_gap_s']:.2f} | "
          f"{r['stream_tokens_meanwhile']} | {r['steps']} |" for r in res["rows"]]
    with open(os.path.join(args.out, "engine_stall.md"), "w") as f:
        f.write("\n".join(L) + "\n")
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    ap.add_argument("--model", choices=("default", "tiny"), default="default")
    ap.add_argument("--chunks", type=ints, default=[2048, 1024, 512, 256], help="max_batched_tokens values")
    ap.add_argument("--prompt-tokens", type=int, default=4000)
    ap.add_argument("--dsla-layers", type=ints, default=[])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args()
    from dsla_model.engine import EngineConfig

    for chunk in args.chunks:  # before the model is loaded
        try:
            EngineConfig(max_running=MAX_RUNNING, max_batched_tokens=chunk).validate()
        except ValueError as e:
            ap.error(str(e))
    if args.prompt_tokens < 1:
        ap.error("--prompt-tokens must be >= 1")
    run(args)


if __name__ == "__main__":
    main()
