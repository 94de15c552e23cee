"""Model-level subcommands: generate, order, corpus."""
from __future__ import annotations

import json
import sys

from deploy.cli import CLIError


def _parse_layers(text: str) -> list[int]:
    try:
        return sorted({int(x) for x in text.split(",") if x.strip() != ""})
    except ValueError:
        raise CLIError(f"--dsla-layers takes comma-separated layer indices, got {text!r}") from None


def add_model_args(p):
    p.add_argument("--model", default="default", help="'default', an HF model directory or a hub id")


def load_hybrid(model_spec: str, device: str = "cpu", dsla_config=None):
    from dsla_model.hybrid import HybridModel
    from dsla_model.loading import ModelNotFoundError, load_model

    try:
        model, tok, model_id = load_model(model_spec, device=device)
        return (HybridModel(model) if dsla_config is None else HybridModel(model, dsla_config)), tok, model_id
    except (ModelNotFoundError, ValueError) as e:  # ValueError: an unsupported architecture or tokenizer
        raise CLIError(str(e).splitlines()[0] if str(e) else repr(e)) from None


def resolve_dsla_layers(hybrid, tok, args) -> list[int]:
    """The layers to convert from --dsla-layers or --conversion (never both)."""
    from dsla_model.order_cache import cached_order, layers_for_conversion

    if args.dsla_layers is not None and args.conversion is not None:
        raise CLIError("give either --dsla-layers or --conversion, not both")
    if args.dsla_layers is not None:
        layers = _parse_layers(args.dsla_layers)
        bad = [i for i in layers if not 0 <= i < hybrid.num_layers]
        if bad:
            raise CLIError(f"layers {bad} out of range 0..{hybrid.num_layers - 1}")
        return layers
    if args.conversion is not None:
        if not 0.0 <= args.conversion <= 1.0:
            raise CLIError(f"--conversion must be in [0, 1], got {args.conversion}")
        order = _store_order(args, hybrid)
        if not order:
            from dsla_model.corpus import CorpusMissingError

            try:  # measured on the corpus (once per model, then cached)
                order = cached_order(hybrid, tok)[0]
            except (CorpusMissingError, OSError) as e:
                raise CLIError(f"--conversion needs the layers' sensitivity order: {e}") from None
        return layers_for_conversion(order, args.conversion)
    return []


def _store_order(args, hybrid):
    from dsla_model.layer_store import LayerStore, LayerStoreError, shipped_store

    # the shipped store holds a model's distilled layers whatever name the model was given by
    # (apply_layers picks it the same way)
    layers_dir = getattr(args, "layers_dir", None) or shipped_store(hybrid.fingerprint)
    if not layers_dir:
        return None
    try:
        return LayerStore(layers_dir).read_manifest().get("order")
    except LayerStoreError as e:
        raise CLIError(str(e)) from None


def apply_layers(hybrid, layers: list[int], layers_dir: str | None):
    """Convert `layers`. An explicit --layers-dir must hold every one of them. Without it, a
    model the shipped store was distilled for takes the layers that store holds, and the rest
    start from their (untrained) initialisation, with a note on stderr."""
    from dsla_model.layer_store import LayerStore, LayerStoreError, shipped_store

    implicit = layers_dir is None
    layers_dir = layers_dir or shipped_store(hybrid.fingerprint)
    if not layers_dir:
        for i in layers:
            hybrid.convert(i)
        return
    try:
        store = LayerStore(layers_dir)
        stored = [i for i in layers if i in set(store.published_layers())] if implicit else layers
        store.apply(hybrid, stored)
        fresh = [i for i in layers if i not in stored]
        if fresh:
            cfg = store.dsla_config()
            for i in fresh:
                hybrid.install(i, hybrid.new_dsla_module(i, None, cfg))
                hybrid.convert(i)
            print(f"note: layers {fresh} are not in the shipped store {layers_dir}; "
                  "they run with untrained DSLA weights", file=sys.stderr)
    except (LayerStoreError, OSError) as e:
        raise CLIError(str(e)) from None


def cmd_generate(args) -> int:
    from dsla_model.generate import generate_ids, generate_batch

    from dsla_model.engine import SamplingParams
    from dsla_model.loading import eos_token_ids, max_positions

    if any(not p for p in args.prompt):
        raise CLIError("--prompt must not be empty")
    for p in args.prompt:
        try:  # bytes a terminal of another encoding passed reach Python as lone surrogates
            p.encode("utf-8")
        except UnicodeEncodeError:
            raise CLIError("--prompt is not valid UTF-8 (check the terminal's encoding)") from None
    try:  # the checks the engine makes, for the --no-cache path too
        for i in range(len(args.prompt)):
            SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed + i).validate()
    except ValueError as e:
        raise CLIError(f"{e} (from --max-tokens / --temperature / --seed)") from None
    hybrid, tok, _ = load_hybrid(args.model)
    layers = resolve_dsla_layers(hybrid, tok, args)
    apply_layers(hybrid, layers, args.layers_dir)
    eos = set(eos_token_ids(tok, hybrid.model))
    all_ids = [tok(prompt)["input_ids"] for prompt in args.prompt]  # with BOS where the tokenizer adds one
    limit = max_positions(hybrid.config)
    if args.no_cache and limit and max(map(len, all_ids)) + args.max_tokens > limit:
        raise CLIError(f"a prompt plus --max-tokens {args.max_tokens} exceeds the model's {limit} positions")
    if args.no_cache:
        # the reference: one prompt at a time, full forward at every step
        outs = (generate_ids(hybrid, ids, args.max_tokens, args.temperature, use_cache=False,
                             seed=args.seed + i, eos_ids=eos) for i, ids in enumerate(all_ids))
    else:
        # all prompts as one continuous batch through the engine
        try:
            # sized for these prompts: the engine's default length stops at 8192 tokens, short of
            # what many models (and --no-cache) take
            need = max(map(len, all_ids)) + args.max_tokens
            outs = generate_batch(hybrid, tok, all_ids, args.max_tokens, args.temperature, args.seed,
                                  max_model_len=min(need, limit) if limit else need)
        except ValueError as e:
            raise CLIError(str(e)) from None
    for prompt, out in zip(args.prompt, outs):
        text = tok.decode(out, skip_special_tokens=True)
        if args.json:
            print(json.dumps({"prompt": prompt, "text": text, "token_ids": out, "dsla_layers": layers}))
        else:
            print(prompt + text)
        sys.stdout.flush()
    return 0


def cmd_order(args) -> int:
    from dsla_model.corpus import CorpusMissingError

    from distill_workers.runner import DEFAULT_DSLA
    from dsla_model.dsla_attention import DSLAConfig

    if args.num_prompts < 1:
        raise CLIError("--num-prompts must be >= 1")
    # the DSLA settings distill starts from: the damage order (and its cache entry) is then the one
    # `distill` computes and uses
    hybrid, tok, _ = load_hybrid(args.model, dsla_config=DSLAConfig(**DEFAULT_DSLA))
    try:
        if args.method == "damage":
            from distill_workers.damage import damage_order

            order, score = damage_order(hybrid, tok)
            label = "damage (KL alone)"
        else:
            from dsla_model.sensitivity import sensitivity_order

            order, score = sensitivity_order(hybrid, tok, args.num_prompts)
            label = "entropy"
    except (CorpusMissingError, OSError) as e:
        raise CLIError(str(e)) from None
    if args.json:
        key = "damage" if args.method == "damage" else "entropy"
        print(json.dumps({"method": args.method, "order": order, key: score}))
    else:
        for rank, layer in enumerate(order):
            print(f"{rank:3d}  layer {layer:3d}  {label} {score[layer]:.4f}")
    return 0


def cmd_corpus(args) -> int:
    from dsla_model.corpus import CorpusMissingError, stats

    tok = None
    if args.tokens:
        _, tok, _ = load_hybrid(args.model)
    try:
        s = stats(tok)
    except CorpusMissingError as e:
        raise CLIError(str(e)) from None
    print(json.dumps(s, indent=2))
    return 0


def add_parsers(sub):
    p = sub.add_parser("generate", help="generate text with the hybrid model")
    p.add_argument("--prompt", action="append", required=True, help="may be repeated")
    add_model_args(p)
    p.add_argument("--dsla-layers", default=None, help="comma-separated layers to convert, e.g. 0,14,29")
    p.add_argument("--conversion", type=float, default=None,
                   help="convert this fraction of layers, in the layer store's order (without a store for this "
                        "model: the attention-entropy order, from 32 calibration prompts of the corpus, cached "
                        "per model)")
    p.add_argument("--layers-dir", default=None, help="a layer store with distilled DSLA layers")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-cache", action="store_true", help="recompute the full forward at each step (reference)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_generate)

    p = sub.add_parser("order", help="sensitivity order of the attention layers (the order layers convert in)")
    add_model_args(p)
    p.add_argument("--method", choices=("damage", "entropy"), default="damage",
                   help="damage: measured KL when each layer alone is converted (what `distill` uses; minutes "
                        "on a CPU, cached per model); entropy: the attention-entropy proxy (seconds)")
    p.add_argument("--num-prompts", type=int, default=32, help="calibration prompts of the entropy method")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_order)

    p = sub.add_parser("corpus", help="the text corpus")
    add_model_args(p)
    p.add_argument("--stats", action="store_true", help="print its size (the default)")
    p.add_argument("--tokens", action="store_true", help="also count tokens (loads the model's tokenizer)")
    p.set_defaults(handler=cmd_corpus)
