"""Distillation subcommands: `distill` (fill a layer store) and `eval` (quality vs the teacher)."""
from __future__ import annotations

import json
import math
import os
import sys
import time

from deploy.cli import CLIError


def _positive(name, value):
    if value is not None and value < 1:
        raise CLIError(f"{name} must be >= 1, got {value}")


def _check_device(device: str):
    import torch

    if device != "cpu" and not device.startswith("cuda"):
        raise CLIError(f"--device must be cpu or cuda[:N], got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CLIError(f"--device {device}: no CUDA device is available on this machine")


def cmd_distill(args) -> int:
    from dsla_model.corpus import CorpusMissingError
    from dsla_model.layer_store import LayerStoreError
    from dsla_model.loading import ModelNotFoundError

    _positive("--layers", args.layers)
    _positive("--tokens-per-layer", args.tokens_per_layer)
    if args.train_blocks is not None and args.train_blocks < 2:
        raise CLIError(f"--train-blocks must be >= 2 (the last block is held out to judge each layer), "
                       f"got {args.train_blocks}")
    _positive("--batch-blocks", args.batch_blocks)
    if args.block_len is not None and args.block_len < 16:
        raise CLIError(f"--block-len must be >= 16 tokens, got {args.block_len}")
    _check_device(args.device)
    _positive("--kl-blocks", args.kl_blocks)
    _positive("--threads", args.threads)
    _positive("--gate-rank", args.gate_rank)
    if args.delta_rank is not None and args.delta_rank < 0:
        raise CLIError(f"--delta-rank must be >= 0, got {args.delta_rank}")
    if args.kl_steps is not None and args.kl_steps < 0:
        raise CLIError(f"--kl-steps must be >= 0, got {args.kl_steps}")
    if not args.store:
        raise CLIError("--store must name a directory")
    if os.path.exists(args.store) and not os.path.isdir(args.store):
        raise CLIError(f"--store {args.store}: not a directory")
    if args.text_file and not os.path.isfile(args.text_file):
        raise CLIError(f"--text-file {args.text_file}: no such file")
    if args.lr is not None and not (math.isfinite(args.lr) and args.lr > 0):
        raise CLIError(f"--lr must be a finite number > 0, got {args.lr}")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    kwargs = dict(model=args.model, store=args.store, layers=args.layers, tokens_per_layer=args.tokens_per_layer,
                  train_blocks=args.train_blocks, order=args.order, seed=args.seed, gate_rank=args.gate_rank,
                  delta_rank=args.delta_rank, output_bias=None if not args.no_output_bias else False,
                  one_state=args.one_state, kl_steps=args.kl_steps, kl_blocks=args.kl_blocks,
                  batch_blocks=args.batch_blocks, lr=args.lr, text_file=args.text_file, device=args.device,
                  block_size=args.block_len)
    try:
        if args.ray:
            return _distill_ray(args, kwargs)
        from distill_workers.runner import build_distiller
        from dsla_model.layer_store import LayerStore

        resumed = LayerStore(args.store).exists()
        distiller = build_distiller(**kwargs)
        todo = distiller.todo()
        print(f"distilling {len(todo)} layer(s) {todo} into {args.store}"
              + (" (an existing store: its order is kept, --order only orders a new one)" if resumed else ""),
              file=sys.stderr)
        published = distiller.run(show_progress=not args.quiet)
    except (LayerStoreError, ModelNotFoundError, CorpusMissingError, ValueError, OSError) as e:
        raise CLIError(str(e)) from None
    print(json.dumps({"store": args.store, "published_now": published,
                      "published": distiller.store.published_layers()}))
    return 0


def _distill_ray(args, kwargs) -> int:
    import ray

    from distill_workers.worker import DistillWorker

    ray.init(ignore_reinit_error=True, log_to_driver=False)
    worker = DistillWorker.remote(threads=args.threads, **kwargs)
    last = None
    while True:
        try:
            done = ray.get(worker.wait.remote(5.0))
            st = ray.get(worker.status.remote())
        except ray.exceptions.RayActorError as e:  # its constructor failed: a bad model, store, option
            cause = getattr(e, "cause", None) or e
            raise CLIError(f"distill worker failed: {str(cause).strip().splitlines()[-1]}") from None
        line = (f"layer {st['layer']} {st['state']} step {st['step']}/{st['steps']} "
                f"loss {st['loss'] if st['loss'] is None else round(st['loss'], 4)} eta {st['eta_s']}s")
        if line != last:
            print(line, file=sys.stderr)
            last = line
        if st.get("error"):
            raise CLIError(f"distill worker failed:\n{st['error']}")
        if done:
            break
    print(json.dumps({"store": args.store, "published": st["published"]}))
    return 0


def _parse_conversions(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise CLIError(f"--conversion takes comma-separated ratios in [0, 1], got {text!r}") from None
    if not values or any(not 0.0 <= v <= 1.0 for v in values):
        raise CLIError(f"--conversion takes comma-separated ratios in [0, 1], got {text!r}")
    return values


def cmd_eval(args) -> int:
    from deploy.commands_model import load_hybrid
    from dsla_model.corpus import CorpusMissingError
    from dsla_model.evaluation import PASSKEY_CONTEXTS, evaluate_conversions, text_blocks
    from dsla_model.layer_store import LayerStore, LayerStoreError, shipped_store
    from dsla_model.loading import max_positions

    conversions = _parse_conversions(args.conversion)
    _positive("--blocks", args.blocks)
    _positive("--threads", args.threads)
    if args.passkey:
        _positive("--passkey-trials", args.passkey_trials)
    _check_device(args.device)
    if args.out_dir and os.path.exists(args.out_dir) and not os.path.isdir(args.out_dir):
        raise CLIError(f"--out-dir {args.out_dir}: not a directory")
    if args.text_file and not os.path.isfile(args.text_file):
        raise CLIError(f"--text-file {args.text_file}: no such file")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    hybrid, tok, model_id = load_hybrid(args.model, device=args.device)
    store_path = args.store or shipped_store(hybrid.fingerprint)
    if store_path is None:
        raise CLIError("no --store given and no shipped layer store for this model")
    store = LayerStore(store_path)
    try:
        manifest = store.read_manifest()
        order = manifest["order"]
        need = {c: set(sorted(order[:round(c * len(order))])) for c in conversions}
        missing = {c: sorted(n - set(store.published_layers())) for c, n in need.items()}
        missing = {c: m for c, m in missing.items() if m}
        if missing:
            raise CLIError(f"store {store_path} lacks layers for conversion(s) "
                           + "; ".join(f"{c}: {m}" for c, m in missing.items()))
        # nothing past the model's positions: its scores there would be of a model out of range
        positions = max_positions(hybrid.config) or 1 << 30
        if positions < 512:
            raise CLIError(f"the model has {positions} positions; eval scores 512-token blocks")
        contexts = tuple(c for c in PASSKEY_CONTEXTS if c <= positions)
        blocks = text_blocks(tok, 512, args.blocks, args.text_file)
        log = (lambda r: print(json.dumps(r), file=sys.stderr)) if not args.json else None
        results = evaluate_conversions(hybrid, tok, conversions, order, store.apply, blocks, passkey=args.passkey,
                                       passkey_trials=args.passkey_trials, passkey_contexts=contexts, log=log)
    except CorpusMissingError as e:
        raise CLIError(f"{e} (or evaluate on a file of your own: --text-file)") from None
    except (LayerStoreError, ValueError, OSError) as e:
        raise CLIError(str(e)) from None
    meta = {"model": model_id, "store": str(store_path), "store_version": manifest["version"],
            "text": args.text_file or "corpus validation split", "blocks": int(blocks.shape[0]),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    print(json.dumps(results, indent=None if args.json else 1))  # first: a report that fails loses nothing
    sys.stdout.flush()
    if args.out_dir:
        from dsla_model.eval_report import write_report

        try:
            paths = write_report(results, meta, args.out_dir, args.name)
        except OSError as e:
            raise CLIError(f"--out-dir {args.out_dir}: {e}") from None
        print(f"wrote {', '.join(paths)}", file=sys.stderr)
    return 0


def add_parsers(sub):
    p = sub.add_parser("distill", help="distil DSLA layers into a layer store (chained, in sensitivity order)")
    p.add_argument("--model", default="default", help="'default', an HF model directory or a hub id")
    p.add_argument("--store", required=True, help="layer store directory (created if missing; resumed if not)")
    p.add_argument("--layers", type=int, default=None, help="distil the first N layers of the order (default: all)")
    p.add_argument("--tokens-per-layer", type=int, default=None, help="training tokens per layer")
    p.add_argument("--train-blocks", type=int, default=None, help="cached training blocks per layer")
    p.add_argument("--block-len", type=int, default=None,
                   help="tokens per training block (default 512): the longest context a DSLA state is trained "
                        "over (bench/context_quality.py shows quality past it)")
    p.add_argument("--kl-steps", type=int, default=None, help="logits-KL steps per layer after the MSE phase")
    p.add_argument("--kl-blocks", type=int, default=None, help="training blocks cached for the logits-KL phase: with the MSE held-out block, the last "
                        "quarter of them judge it and the rest are replayed")
    p.add_argument("--batch-blocks", type=int, default=None, help="training blocks per optimiser step")
    p.add_argument("--lr", type=float, default=None, help="MSE-phase learning rate")
    p.add_argument("--text-file", default=None,
                   help="train on blocks spread over this file instead of the corpus' training split")
    p.add_argument("--order", default="sensitivity",
                   help="sensitivity (measured per-layer conversion damage, least first; computed once per "
                        "model and cached) | reverse | random | entropy (attention-entropy proxy) | a JSON file "
                        "with an 'order' list (e.g. layers/manifest.json)")
    p.add_argument("--gate-rank", type=int, default=None)
    p.add_argument("--delta-rank", type=int, default=None)
    p.add_argument("--no-output-bias", action="store_true")
    p.add_argument("--one-state", action="store_true", help="ablation: a single (GLA-like) state")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--device", default="cpu", help="cpu or cuda (bf16 autocast and the fused kernels on cuda)")
    p.add_argument("--ray", action="store_true", help="run in a DistillWorker Ray actor")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=cmd_distill)

    p = sub.add_parser("eval", help="perplexity ratio, agreement, KL (and passkey) against the teacher")
    p.add_argument("--model", default="default", help="'default', an HF model directory or a hub id")
    p.add_argument("--store", default=None, help="layer store (default: the one shipped for the default model)")
    p.add_argument("--conversion", default="0,0.25,0.5,0.75", help="comma-separated conversion ratios")
    p.add_argument("--text-file", default=None,
                   help="evaluate on 512-token blocks of this file (not the file the layers were distilled on: "
                        "those blocks would score as held-out text)")
    p.add_argument("--blocks", type=int, default=8, help="number of 512-token blocks")
    p.add_argument("--passkey", action="store_true", help="also passkey retrieval at 512/1024/2048 tokens")
    p.add_argument("--passkey-trials", type=int, default=4)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--out-dir", default="",
                   help="also write a PNG and markdown report here (this repo's: docs/results); default: none, "
                        "so a run never overwrites a committed report")
    p.add_argument("--name", default="eval", help="file name stem of the report")
    p.add_argument("--json", action="store_true", help="one-line JSON output")
    p.set_defaults(handler=cmd_eval)
