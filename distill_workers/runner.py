"""Build a ready-to-run `ChainedDistiller` from plain arguments (CLI, Ray actor, tests)."""
from __future__ import annotations

import json
import os
import random

from dsla_model.dsla_attention import DSLAConfig
from dsla_model.loading import max_positions
from distill_workers.trainer import ChainedDistiller, DistillConfig

ORDERS = ("sensitivity", "reverse", "random", "entropy")
# What distillation uses unless told otherwise (measured on SmolLM2, see docs/results):
# low-rank q/k/v/o corrections and an output bias fit the teacher far better than gates alone.
DEFAULT_DSLA = {"gate_rank": 16, "delta_rank": 8, "output_bias": True}


def layer_order(kind: str, sensitivity: list[int], seed: int = 0) -> list[int]:
    """`kind` is an order name, or a JSON file holding {"order": [...]} or
    {"damage": {"order": [...]}} (the measured-damage order written by distill_workers.ablation)."""
    if os.path.isfile(kind):
        with open(kind) as f:
            order = _order_in(json.load(f))
        # ints only: sorting a mix of types raises TypeError, which callers do not report as bad input
        if not all(type(x) is int for x in order) or sorted(order) != sorted(sensitivity):
            raise ValueError(f"{kind} holds no permutation of the model's {len(sensitivity)} layers")
        return list(order)
    if kind == "sensitivity":
        return list(sensitivity)
    if kind == "reverse":
        return list(reversed(sensitivity))
    if kind == "random":
        order = list(sensitivity)
        random.Random(seed).shuffle(order)
        return order
    raise ValueError(f"unknown order {kind!r}: one of {', '.join(ORDERS)}")


def _order_in(d) -> list:
    """The order list of a JSON document of either documented shape; [] for anything else."""
    if not isinstance(d, dict):
        return []
    # an ablation report's "order" holds result rows; its order list is under "damage"
    if isinstance(d.get("order"), list) and d["order"] and isinstance(d["order"][0], int):
        return d["order"]
    damage = d.get("damage")
    order = damage.get("order") if isinstance(damage, dict) else None
    return order if isinstance(order, list) else []


def build_distiller(model: str = "default", store: str = "", layers: int | None = None,
                    tokens_per_layer: int | None = None, train_blocks: int | None = None,
                    block_size: int | None = None, order: str = "sensitivity", seed: int = 0,
                    gate_rank: int | None = None, delta_rank: int | None = None,
                    output_bias: bool | None = None, one_state: bool = False, lr: float | None = None,
                    kl_steps: int | None = None, kl_blocks: int | None = None, batch_blocks: int | None = None,
                    text_file: str | None = None, device: str = "cpu", loaded=None) -> ChainedDistiller:
    """`loaded` = (model, tokenizer, model_id) skips loading (tests, repeated runs)."""
    from dsla_model.hybrid import HybridModel
    from dsla_model.layer_store import LayerStore, LayerStoreError
    from dsla_model.loading import load_model
    from dsla_model.order_cache import cached_order

    hf, tok, model_id = loaded if loaded is not None else load_model(model, device=device)
    dsla = dict(DEFAULT_DSLA)
    for key, value in (("gate_rank", gate_rank), ("delta_rank", delta_rank), ("output_bias", output_bias)):
        if value is not None:
            dsla[key] = value
    dsla_config = DSLAConfig(**dsla)
    hybrid = HybridModel(hf, dsla_config)
    st = LayerStore(store)
    if st.exists():
        manifest = st.read_manifest()
        if not st.holds_model(manifest, hybrid.fingerprint):  # before its order is read as this model's layers
            raise LayerStoreError(f"store {st.path} holds layers of model {manifest['model_id']!r}, not of {model_id!r}")
        layer_seq = manifest["order"]  # a resumed run keeps the order it started with
    elif os.path.isfile(order):  # an explicit order needs no calibration pass (nor the corpus)
        layer_seq = layer_order(order, list(range(hybrid.num_layers)))
    elif order == "random":  # a function of the seed alone: no calibration, the same for every setting
        layer_seq = layer_order("random", list(range(hybrid.num_layers)), seed)
    elif order == "entropy":  # ARCHITECTURE.md's attention-entropy proxy, kept for comparison
        layer_seq = cached_order(hybrid, tok)[0]
    elif order in ORDERS:
        from distill_workers.damage import damage_order

        # sensitivity = measured conversion damage (distill_workers/damage.py), cached per model
        layer_seq = layer_order(order, damage_order(hybrid, tok, text_file=text_file)[0], seed)
    else:
        raise ValueError(f"unknown order {order!r}: one of {', '.join(ORDERS)} or a JSON file")
    cfg = DistillConfig(seed=seed, one_state=one_state)
    positions = max_positions(hybrid.config)
    if block_size is not None and positions and block_size > positions:
        raise ValueError(f"training blocks of {block_size} tokens exceed the model's {positions} positions")
    for key, value in (("tokens_per_layer", tokens_per_layer), ("train_blocks", train_blocks),
                       ("block_size", block_size), ("lr", lr), ("kl_steps", kl_steps), ("kl_blocks", kl_blocks),
                       ("batch_blocks", batch_blocks)):
        if value is not None:
            setattr(cfg, key, value)
    if cfg.train_blocks < 2:
        raise ValueError(f"train_blocks must be >= 2 (the last block is held out to judge each layer), "
                         f"got {cfg.train_blocks}")
    blocks = None
    if text_file is not None:
        from distill_workers.trainer import training_blocks

        blocks = training_blocks(tok, cfg, text_file=text_file)
    return ChainedDistiller(hybrid, tok, model_id, st, layer_seq, cfg, dsla_config, layers, blocks=blocks)
