"""Ablations on a CPU budget: layer order, one state vs two, gate rank.

Chained distillation of every variant (three orders x 15 layers, plus configs) costs hours
on a 2-core machine, so the ablations distil layers *independently*: each layer on the
teacher's own inputs, all captured by one teacher forward. The order ablation then
compares orders on the same set of layers, so only the choice of layers differs; config
ablations distil the same layers (the first 25% of the sensitivity order) with each config
and the same token budget. Absolute numbers are worse than the chained store's (errors
compound unseen); the comparisons are what this measures.

    python -m distill_workers.ablation --out docs/results/ablations --tokens-per-layer 7680
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from distill_workers.damage import (capture_all_layers, damage_blocks, distil_independently, measure_damage,
                                   order_by_damage)
from distill_workers.runner import DEFAULT_DSLA, layer_order
from distill_workers.trainer import DistillConfig, freeze_teacher, training_blocks


def compare_orders(orders: dict, results: dict, score, save, log):
    """The same independently distilled layers under each order: only the choice of layers differs."""
    from dsla_model.order_cache import layers_for_conversion

    for kind, order in orders.items():
        for ratio in (0.25, 0.5):
            layers = layers_for_conversion(order, ratio)
            results["order"].append({"order": kind, "conversion": ratio, "dsla_layers": layers, **score(layers)})
            save()
            log(results["order"][-1])


def main(argv=None) -> int:
    from dsla_model.dsla_attention import DSLAConfig
    from dsla_model.evaluation import TeacherReference, text_blocks
    from dsla_model.hybrid import HybridModel
    from dsla_model.loading import load_model
    from dsla_model.order_cache import cached_order, layers_for_conversion

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="docs/results/ablations")
    ap.add_argument("--tokens-per-layer", type=int, default=7680)
    ap.add_argument("--train-blocks", type=int, default=5)
    ap.add_argument("--eval-blocks", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--gate-ranks", default="4,64")
    ap.add_argument("--store", default=None, help="also publish the independently distilled layers here")
    ap.add_argument("--skip-config", action="store_true", help="orders only (no one-state / gate-rank variants)")
    ap.add_argument("--order-file", default=None,
                    help="compare this order (JSON with 'order', e.g. layers/manifest.json) and its reverse "
                         "instead of measuring per-layer damage again")
    args = ap.parse_args(argv)
    try:
        gate_ranks = [int(x) for x in args.gate_ranks.split(",") if x]
    except ValueError:
        ap.error(f"--gate-ranks takes integers separated by commas, got {args.gate_ranks!r}")
    from dsla_model.layer_store import LayerStore, LayerStoreError

    torch.set_num_threads(args.threads)
    try:
        hf, tok, model_id = load_model("default")
        hybrid = HybridModel(hf, DSLAConfig(**DEFAULT_DSLA))
        n = hybrid.num_layers
        # what the arguments name is checked before hours of distillation, not after
        given = layer_order(args.order_file, list(range(n))) if args.order_file else None
        freeze_teacher(hybrid)
        sens = cached_order(hybrid, tok)[0]
        store = LayerStore(args.store) if args.store else None
        if store is not None:
            store.init(model_id, hybrid.fingerprint, sens, DSLAConfig(**DEFAULT_DSLA))
    except (ValueError, OSError, LayerStoreError) as e:
        print(f"ablation: error: {e}", file=sys.stderr)
        return 2
    cfg = DistillConfig(tokens_per_layer=args.tokens_per_layer, train_blocks=args.train_blocks)
    data = capture_all_layers(hybrid, training_blocks(tok, cfg), range(n))
    ref = TeacherReference(hybrid, text_blocks(tok, 512, args.eval_blocks))
    log = lambda *a: print(time.strftime("%H:%M:%S"), *a, file=sys.stderr, flush=True)

    def distil(layers, dsla: DSLAConfig, one_state=False) -> dict[int, object]:
        c = DistillConfig(**{**cfg.to_dict(), "one_state": one_state})
        return distil_independently(hybrid, {i: data[i] for i in layers}, c, dsla, log=log)

    def score(mods, layers) -> dict:
        hybrid.set_dsla_layers([])
        for i in layers:
            hybrid.install(i, mods[i])
            hybrid.convert(i)
        m = ref.score(hybrid)
        hybrid.set_dsla_layers([])
        return {"ppl": round(m["ppl"], 4), "ppl_ratio": round(m["ppl"] / ref.metrics["ppl"], 4),
                "top1_agreement": round(m["top1_agreement"], 4), "kl": round(m["kl"], 5)}

    def score_independent(layers):
        return score(all_mods, layers)

    results = {"meta": {"model": model_id, "tokens_per_layer": cfg.tokens_per_layer, "train_blocks": cfg.train_blocks,
                        "eval_blocks": args.eval_blocks, "teacher_ppl": round(ref.metrics["ppl"], 4),
                        "mode": "independent per-layer distillation on teacher inputs"}, "order": [], "config": []}
    out_json = f"{args.out}.json"

    def save():
        with open(out_json, "w") as f:
            json.dump(results, f, indent=1)

    base = DSLAConfig(**DEFAULT_DSLA)
    # 1) every layer distilled once on teacher inputs, kept in a store for reuse
    all_mods = distil(range(n), base)
    if store is not None:
        for i, mod in all_mods.items():
            store.publish(i, mod.state_dict(), {"mode": "independent"})
    if given is not None:
        orders = {"given (sensitivity)": given, "reverse given": list(reversed(given)), "entropy": sens,
                  "random": layer_order("random", sens, seed=0)}
        results["order_file"] = args.order_file
        compare_orders(orders, results, score_independent, save, log)
        print(json.dumps(results, indent=1))
        return 0
    # 2) measured damage: KL when a layer alone is converted, on held-out *training* text
    #    (never the evaluation blocks), lowest first = a data-driven conversion order
    damage = {i: round(v, 5) for i, v in measure_damage(hybrid, all_mods, damage_blocks(tok, cfg)).items()}
    hybrid.set_dsla_layers([])
    damage_order = order_by_damage(damage)
    results["damage"] = {"kl_alone": damage, "order": damage_order}
    save()
    # 3) orders: the same layers, orders differ only in which layers they pick
    orders = {"entropy": sens, "measured damage (sensitivity)": damage_order,
              "reverse measured damage": list(reversed(damage_order)),
              "reverse entropy": layer_order("reverse", sens), "random": layer_order("random", sens, seed=0)}
    compare_orders(orders, results, score_independent, save, log)
    if args.skip_config:
        print(json.dumps(results, indent=1))
        return 0
    # 4) configs on the first 25% of the entropy order, same budget
    quarter = layers_for_conversion(sens, 0.25)
    results["config"].append({"variant": f"DSLA (2 states), gate rank {base.gate_rank}", **score(all_mods, quarter)})
    save()
    results["config"].append({"variant": "one state (GLA-like)", **score(distil(quarter, base, one_state=True), quarter)})
    save()
    for r in gate_ranks:
        d = DSLAConfig(**{**DEFAULT_DSLA, "gate_rank": r})
        results["config"].append({"variant": f"DSLA, gate rank {r}", **score(distil(quarter, d), quarter)})
        save()
    save()
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
