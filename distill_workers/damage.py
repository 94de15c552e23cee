"""The sensitivity order by measured damage: how much the model's output moves when one
layer alone is converted to (a quickly distilled) DSLA.

The attention-entropy order of ARCHITECTURE.md ranks layers by how local their attention
looks; on SmolLM2 it picks some of the most damaging layers first and loses to its own
reverse (docs/results/ablations.md). Measuring the damage directly costs one short
independent distillation per layer (every layer's inputs come from one teacher forward
per block) plus one KL evaluation per layer on held-out training text, a few minutes on a
CPU for the default model, and the result is cached per model.
"""
from __future__ import annotations

import json

import torch

from distill_workers.layer_data import LayerData
from distill_workers.trainer import DistillConfig, distill_layer, freeze_teacher, spread, training_blocks
from dsla_model.order_cache import read_cached, write_cached

# a short, cheap budget: enough to rank layers, not to serve them
DAMAGE_CONFIG = DistillConfig(tokens_per_layer=7680, train_blocks=5)


@torch.no_grad()
def capture_all_layers(hybrid, blocks: torch.Tensor, layers) -> dict[int, LayerData]:
    """Inputs and outputs of every listed layer's (teacher) attention in one forward per block."""
    got: dict[int, dict] = {i: {"x": [], "y": []} for i in layers}
    pe = {}
    hooks = []
    for i in layers:
        sw = hybrid.attention(i)

        def pre(_m, args, kwargs, i=i):
            got[i]["x"].append((kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]).clone())
            pe["cos"], pe["sin"] = kwargs["position_embeddings"]

        def post(_m, _a, _k, out, i=i):
            got[i]["y"].append(out[0].clone())

        hooks += [sw.register_forward_pre_hook(pre, with_kwargs=True), sw.register_forward_hook(post, with_kwargs=True)]
    saved = hybrid.dsla_layers
    hybrid.set_dsla_layers([])
    try:
        for b in range(blocks.shape[0]):
            hybrid(blocks[b:b + 1])
    finally:
        for h in hooks:
            h.remove()
        hybrid.set_dsla_layers(saved)
    return {i: LayerData(torch.cat(g["x"]), torch.cat(g["y"]), pe["cos"][:1], pe["sin"][:1]) for i, g in got.items()}


def damage_blocks(tokenizer, cfg: DistillConfig, n: int = 2) -> torch.Tensor:
    """Training-split blocks that distillation never trains on (offset from its stride)."""
    from dsla_model.corpus import token_blocks

    blocks = token_blocks(tokenizer, "train", cfg.block_size, cfg.train_blocks * 5 + 5)
    return torch.tensor(blocks[2::5][:n])


def split_text_file(tokenizer, cfg: DistillConfig, text_file: str, n: int = 2):
    """(training blocks, `n` held-out blocks) of `text_file`, tokenized once: training takes the
    blocks `training_blocks` would, the held-out ones are spread over the rest."""
    from dsla_model.evaluation import text_blocks

    every = text_blocks(tokenizer, cfg.block_size, None, text_file)
    picked = spread(every.shape[0], cfg.train_blocks)
    rest = sorted(set(range(every.shape[0])) - set(picked))
    if len(rest) < n:
        raise ValueError(f"{text_file} is too short: measuring damage needs {cfg.train_blocks + n} blocks "
                         f"of {cfg.block_size} tokens, it has {every.shape[0]}")
    return every[picked], every[[rest[i] for i in spread(len(rest), n)]]


def distil_independently(hybrid, data: dict[int, LayerData], cfg: DistillConfig, dsla_config=None,
                         log=None) -> dict[int, object]:
    """One DSLA module per layer, each trained on the teacher's own inputs (no chain)."""
    mods = {}
    for i, d in data.items():
        mods[i], met = distill_layer(hybrid, i, d, cfg, dsla_config)
        if log:
            log(f"layer {i}: rel_mse {met['rel_mse_init']} -> {met['rel_mse']}")
    return mods


def measure_damage(hybrid, mods: dict[int, object], eval_blocks: torch.Tensor) -> dict[int, float]:
    """KL(teacher || hybrid) per token with each layer alone converted to its module."""
    from dsla_model.evaluation import TeacherReference

    ref = TeacherReference(hybrid, eval_blocks)
    saved = hybrid.dsla_layers
    modules = {i: hybrid.attention(i).dsla for i in range(hybrid.num_layers)}
    damage = {}
    try:
        for i, mod in mods.items():
            hybrid.set_dsla_layers([])
            hybrid.install(i, mod)
            hybrid.convert(i)
            damage[i] = ref.score(hybrid)["kl"]
    finally:  # the hybrid leaves as it came: same DSLA modules, same converted layers
        for i, mod in modules.items():
            hybrid.attention(i).dsla = mod
        hybrid.set_dsla_layers(saved)
    return damage


def order_by_damage(damage: dict[int, float]) -> list[int]:
    """Least damaging first: the layers to convert first."""
    return sorted(damage, key=lambda i: (damage[i], i))


def _settings_key(hybrid, cfg: DistillConfig) -> str:
    """A short hash of what else the damage depends on: the DSLA form being distilled (delta
    rank, output bias, ...) and the whole distillation budget (block size, lr, seed, ...)."""
    import hashlib

    settings = {"dsla": hybrid.dsla_config.to_dict(), "distill": cfg.to_dict()}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def damage_order(hybrid, tokenizer, cfg: DistillConfig = DAMAGE_CONFIG, log=None,
                 text_file: str | None = None) -> tuple[list[int], dict[int, float]]:
    """(order, damage per layer) for `hybrid`'s model, measured on the corpus' training split or on
    `text_file`, cached in the user cache by model fingerprint, DSLA config, budget and text. `hybrid` is left
    as it was (its DSLA modules are restored)."""
    import hashlib

    from dsla_model.loading import cache_root

    text = "corpus"
    if text_file is not None:
        with open(text_file, "rb") as f:
            text = hashlib.sha256(f.read()).hexdigest()[:12]
    settings = _settings_key(hybrid, cfg)
    name = f"{hybrid.fingerprint}-damage-{cfg.tokens_per_layer}-{cfg.train_blocks}-{text}-{settings}.json"
    path = cache_root() / "order" / name
    cached = _read_cached(path, hybrid.num_layers)
    if cached is not None:
        return cached
    freeze_teacher(hybrid)
    dev = next(hybrid.parameters()).device
    if text_file is not None:
        train, held_out = split_text_file(tokenizer, cfg, text_file)
    else:
        train, held_out = training_blocks(tokenizer, cfg), damage_blocks(tokenizer, cfg)
    data = capture_all_layers(hybrid, train.to(dev), range(hybrid.num_layers))
    mods = distil_independently(hybrid, data, cfg, log=log)
    damage = measure_damage(hybrid, mods, held_out.to(dev))
    order = order_by_damage(damage)
    write_cached(path, {"order": order, "damage": {str(k): v for k, v in damage.items()}}, "damage order")
    return order, damage


def _read_cached(path, num_layers: int):
    """(order, damage) from a cache file, or None when there is none or it is not a valid one
    (truncated, edited): then the order is measured again."""
    def per_layer(v):
        damage = {int(k): float(x) for k, x in v.items()}
        if sorted(damage) != list(range(num_layers)):
            raise ValueError(f"damage of layers {sorted(damage)}")
        return damage
    return read_cached(path, num_layers, "damage", per_layer, "damage order")
