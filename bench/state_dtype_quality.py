"""What bf16 DSLA state pools cost in quality (EngineConfig.state_dtype="bfloat16").

The default model with the shipped distilled layers at a given conversion, teacher-forced over
long texts token by token through the cache (the decode path, where a bf16 pool rounds every
state once per token), four ways: model weights fp32 or bf16, states kept fp32 or rounded to
bf16 after every step (what a bf16 pool stores; the update itself runs in fp32 in both). Scored
per decoded token: perplexity, and KL / top-1 agreement against the fp32-weights, fp32-states
run. The bf16-weights run is the yardstick: GPU replicas serve in bf16 already.

    .venv/bin/python bench/state_dtype_quality.py [--conversion 0.75] [--tokens 2048]

Writes bench/results/state_dtype_quality.{json,md}.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.license_texts import load_texts  # noqa: E402
from dsla_model.engine.config import STATE_FORMATS  # noqa: E402

WEIGHTS = ("float32", "bfloat16")
STATES = tuple(STATE_FORMATS)  # float32 first: the others are scored against it


def rounding_cache(hybrid, states):
    """A HybridCache that stores each DSLA state as the engine's pools of format `states`
    (EngineConfig.state_dtype) do: rounded to that pool's dtype after every step."""
    d1, d2 = STATE_FORMATS[states]
    cache = hybrid.new_cache()
    put = cache.set_dsla_state
    cache.set_dsla_state = lambda i, s1, s2, n: put(i, s1.to(d1).float(), s2.to(d2).float(), n)
    return cache


@torch.no_grad()
def teacher_forced_logprobs(hybrid, ids, prefill, state_dtype):
    """log-probs [len(ids) - prefill, V] of each next token, the prompt's first `prefill` tokens
    in one piece and every later token decoded alone."""
    cache = rounding_cache(hybrid, state_dtype)
    logits = hybrid(torch.tensor([ids[:prefill]]), cache=cache)[0, -1:]
    out = [torch.log_softmax(logits.float(), -1)]
    for t in ids[prefill:-1]:
        logits = hybrid(torch.tensor([[t]]), cache=cache)[0, -1:]
        out.append(torch.log_softmax(logits.float(), -1))
    return torch.cat(out)


def score(lp, ref, targets):
    return {"ppl": math.exp(-lp.gather(-1, targets[:, None]).mean().item()),
            "kl_vs_fp32": (ref.exp() * (ref - lp)).sum(-1).mean().item(),
            "top1_agreement_vs_fp32": (lp.argmax(-1) == ref.argmax(-1)).float().mean().item()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--conversion", type=float, default=0.75)
    ap.add_argument("--tokens", type=int, default=2048, help="tokens per text (prefill + decode)")
    ap.add_argument("--prefill", type=int, default=64)
    ap.add_argument("--weights", default=",".join(WEIGHTS))
    ap.add_argument("--states", default=",".join(STATES))
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args()
    from dsla_model.hybrid import HybridModel
    from dsla_model.layer_store import SHIPPED_STORE, LayerStore
    from dsla_model.loading import load_model

    torch.manual_seed(0)
    model, tok, model_id = load_model("default")
    texts = load_texts(tok, args.tokens)
    store = LayerStore(SHIPPED_STORE)
    order = store.read_manifest()["order"]
    n = round(args.conversion * len(order))
    # a CPU measurement (quality, not speed): it names the machine, and no GPU because none was used
    res = {"command": "python " + " ".join(sys.argv), "machine": f"{platform.machine()} CPU ({os.cpu_count()} cores)",
           "gpu": None,
           "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "model": model_id,
           "torch": torch.__version__, "dsla_layers": sorted(order[:n]), "conversion": n / len(order),
           "tokens_per_text": args.tokens, "prefill": args.prefill, "texts": [p for p, _ in texts], "runs": []}
    lps = {}
    weights, states = args.weights.split(","), args.states.split(",")
    if weights[0] != "float32" or states[0] != "float32":
        sys.exit("the first of --weights and of --states must be float32: the others are scored against it")
    for wdt in weights:
        if wdt != "float32":
            model, _, _ = load_model("default", dtype=getattr(torch, wdt))
        hybrid = HybridModel(model)
        store.apply(hybrid, order[:n])
        for sdt in states:
            t0 = time.time()
            lps[wdt, sdt] = [teacher_forced_logprobs(hybrid, ids, args.prefill, sdt) for _, ids in texts]
            print(f"weights {wdt}, states {sdt}: {time.time() - t0:.0f} s", flush=True)
    ref = lps["float32", "float32"]
    for (wdt, sdt), runs in lps.items():
        per_text = [score(lp, r, torch.tensor(ids[args.prefill:])) for lp, r, (_, ids) in zip(runs, ref, texts)]
        row = {"weights": wdt, "states": sdt, **{k: sum(p[k] for p in per_text) / len(per_text) for k in per_text[0]},
               "per_text": per_text}
        res["runs"].append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "per_text"}), flush=True)
    os.makedirs(args.out, exist_ok=True)
    json.dump(res, open(os.path.join(args.out, "state_dtype_quality.json"), "w"), indent=1)
    write_md(res, os.path.join(args.out, "state_dtype_quality.md"))


def write_md(res, path):
    L = ["# bf16 DSLA state pools: quality\n",
         f"{res['machine']}; {res['date']}; torch {res['torch']}; command `{res['command']}`.  ",
         f"{res['model']} with the shipped distilled layers {res['dsla_layers']} ({res['conversion']:.0%} of its "
         f"layers DSLA). Teacher-forced over the first {res['tokens_per_text']} tokens of each of "
         f"{', '.join(os.path.basename(t) for t in res['texts'])}: {res['prefill']} prefilled, every later token "
         "decoded alone through the cache. 'states bfloat16' rounds each DSLA state to bf16 after every step, "
         "as a bf16 pool stores it; KL and top-1 agreement are per decoded token against the fp32 / fp32 run.\n",
         "| weights | states | perplexity | KL vs fp32/fp32 (nats) | top-1 agreement vs fp32/fp32 |",
         "| --- | --- | --- | --- | --- |"]
    for r in res["runs"]:
        L.append(f"| {r['weights']} | {r['states']} | {r['ppl']:.3f} | {r['kl_vs_fp32']:.2e} | "
                 f"{r['top1_agreement_vs_fp32']:.4f} |")
    open(path, "w").write("\n".join(L) + "\n")


if __name__ == "__main__":
    main()
