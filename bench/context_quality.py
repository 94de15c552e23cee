"""How the shipped store's quality holds up along a long context: perplexity per window of
positions, for the teacher and each conversion level.

The distilled layers were trained on 512-token blocks (docs/results/README.md) and `dsla-serve
eval` scores perplexity on 512-token blocks (its passkey test probes 1-2K contexts for retrieval
only), so neither shows how language modelling holds up further into a context. Here each
text's first --tokens tokens go through the model in one forward pass (the chunked form, equal to
decoding them one by one), and the next-token log-likelihood is averaged per --window positions.

    .venv/bin/python bench/context_quality.py [--tokens 2048] [--window 512] [--conversions 0,0.25,0.5,0.75]

Writes bench/results/<--name, default context_quality>.{json,md}. A CPU measurement: quality, not speed.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.license_texts import load_texts  # noqa: E402



@torch.no_grad()
def window_nll(hybrid, ids, window):
    """Mean next-token negative log-likelihood of each window of positions 1..len(ids)-1."""
    logits = hybrid(torch.tensor([ids]))[0].float()
    nll = -torch.log_softmax(logits[:-1], -1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
    return [nll[a:a + window].mean().item() for a in range(0, len(nll), window)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--conversions", default="0,0.25,0.5,0.75")
    ap.add_argument("--store", default=None, help="layer store (default: the shipped one, layers/)")
    ap.add_argument("--name", default="context_quality", help="results file stem")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args()
    if args.tokens < 2 or args.window < 1:
        sys.exit("--tokens must be >= 2 and --window >= 1")
    from dsla_model.hybrid import HybridModel
    from dsla_model.layer_store import SHIPPED_STORE, LayerStore
    from dsla_model.loading import load_model

    torch.manual_seed(0)
    model, tok, model_id = load_model("default")
    texts = load_texts(tok, args.tokens)
    store = LayerStore(args.store or SHIPPED_STORE)
    published = store.published_layers(store.read_manifest())
    hybrid = HybridModel(model)
    res = {"command": "python " + " ".join(sys.argv), "machine": f"{platform.machine()} CPU ({os.cpu_count()} cores)",
           "gpu": None,  # a quality measurement on the CPU
           "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "model": model_id,
           "torch": torch.__version__, "tokens": args.tokens, "window": args.window,
           "store": str(store.path), "texts": [p for p, _ in texts], "rows": []}
    for conv in (float(c) for c in args.conversions.split(",")):
        n = round(conv * hybrid.num_layers)
        if n > len(published):
            sys.exit(f"conversion {conv} needs {n} layers; the store has {len(published)}")
        store.apply(hybrid, published[:n])
        hybrid.set_dsla_layers(published[:n])
        per_text = [window_nll(hybrid, ids, args.window) for _, ids in texts]
        nll = [sum(w) / len(w) for w in zip(*per_text)]
        res["rows"].append({"conversion": conv, "dsla_layers": sorted(published[:n]),
                            "ppl_per_window": [math.exp(x) for x in nll],
                            "ppl_per_window_per_text": [[math.exp(x) for x in t] for t in per_text]})
        print(json.dumps({k: res["rows"][-1][k] for k in ("conversion", "ppl_per_window")}), flush=True)
    os.makedirs(args.out, exist_ok=True)
    json.dump(res, open(os.path.join(args.out, args.name + ".json"), "w"), indent=1)
    write_md(res, os.path.join(args.out, args.name + ".md"))


def write_md(res, path):
    W, n = res["window"], len(res["rows"][0]["ppl_per_window"])
    spans = [f"{1 + i * W}-{min((i + 1) * W, res['tokens'] - 1)}" for i in range(n)]
    teacher = next((r for r in res["rows"] if r["conversion"] == 0), None)
    L = ["# Quality along the context: perplexity per window of positions\n",
         f"{res['machine']}; {res['date']}; torch {res['torch']}; command `{res['command']}`.  ",
         f"{res['model']} with the first layers of the store {res['store']} (its distillation order), one forward "
         "pass over "
         f"the first {res['tokens']} tokens of each of {', '.join(os.path.basename(t) for t in res['texts'])}; "
         "perplexity of the next token, averaged over both texts in log space, per window of positions "
         "(in parentheses: the ratio to the teacher's in the same window).\n",
         "| conversion | DSLA layers | " + " | ".join(f"positions {s}" for s in spans) + " |",
         "| --- | --- | " + " | ".join("---" for _ in spans) + " |"]
    for r in res["rows"]:
        cells = [f"{p:.1f}" + (f" ({p / t:.2f}x)" if teacher and r is not teacher else "")
                 for p, t in zip(r["ppl_per_window"], (teacher or r)["ppl_per_window"])]
        L.append(f"| {r['conversion']:.2f} | {len(r['dsla_layers'])} | " + " | ".join(cells) + " |")
    open(path, "w").write("\n".join(L) + "\n")


if __name__ == "__main__":
    main()
