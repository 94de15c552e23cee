"""Rebuild eval.{md,json,png} and ablations.md from the raw JSON results (run from the repo root).

    python docs/results/make_tables.py RUN.json [RUN.json ...]
Each RUN.json is the JSON list printed by `dsla-serve eval --json`; rows are merged by conversion.
"""
import json
import sys

from dsla_model.eval_report import write_report

rows = {}
for path in sys.argv[1:]:
    for r in json.load(open(path)):
        rows[r["conversion"]] = r
results = [rows[c] for c in sorted(rows)]
meta = {"title": "Shipped layer store (layers/), SmolLM2-135M-Instruct", "model": "SmolLM2-135M-Instruct",
        "text": "corpus validation split, 8 blocks x 512 tokens", "passkey": "3 keys per context (512, 1024, 2048)"}
print(write_report(results, meta, "docs/results", "eval"))

ab = json.load(open("docs/results/ablations.json"))
lines = ["# Ablations (independent per-layer distillation, see README.md)", "",
         f"Teacher ppl {ab['meta']['teacher_ppl']} on {ab['meta']['eval_blocks']} validation blocks x 512 tokens; "
         f"{ab['meta']['tokens_per_layer']} MSE tokens per layer, {ab['meta']['train_blocks']} cached blocks.", "",
         "## Conversion order", "", "| order | conversion | DSLA layers | ppl ratio | top-1 agreement | KL |",
         "| --- | --- | --- | --- | --- | --- |"]
for r in ab["order"]:  # the first run called the entropy proxy "sensitivity"; it no longer is
    lines.append(f"| {r['order'].replace(' (sensitivity)', ' proxy')} | {r['conversion']:.2f} | {r['dsla_layers']} | {r['ppl_ratio']:.3f} | "
                 f"{r['top1_agreement']:.3f} | {r['kl']:.3f} |")
lines += ["", "## Layer config (the first 25% of the entropy order, same budget)", "",
          "| variant | ppl ratio | top-1 agreement | KL |", "| --- | --- | --- | --- |"]
for r in ab["config"]:
    lines.append(f"| {r['variant']} | {r['ppl_ratio']:.3f} | {r['top1_agreement']:.3f} | {r['kl']:.3f} |")
d = ab["damage"]
lines += ["", "## Measured damage (KL per token when the layer alone is converted)", "",
          "| layer | " + " | ".join(str(i) for i in range(len(d["kl_alone"]))) + " |",
          "| --- | " + " | ".join("---" for _ in d["kl_alone"]) + " |",
          "| KL | " + " | ".join(f"{d['kl_alone'][str(i)]:.3f}" for i in range(len(d["kl_alone"]))) + " |", "",
          f"Order (least damage first): {d['order']}"]
orders = json.load(open("docs/results/ablations_orders.json"))
lines += ["", "## The shipped order against its reverse (same independent layers, `ablations_orders.json`)", "",
          f"Order compared: `{orders['order_file']}` (the measured-damage order the shipped store was distilled in).", "",
          "| order | conversion | DSLA layers | ppl ratio | top-1 agreement | KL |", "| --- | --- | --- | --- | --- | --- |"]
for r in orders["order"]:
    lines.append(f"| {r['order']} | {r['conversion']:.2f} | {r['dsla_layers']} | {r['ppl_ratio']:.3f} | "
                 f"{r['top1_agreement']:.3f} | {r['kl']:.3f} |")
open("docs/results/ablations.md", "w").write("\n".join(lines) + "\n")
