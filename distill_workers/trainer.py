"""Chained layer distillation (plain torch; the Ray actor in worker.py drives it).

For each layer l in the sensitivity order: capture layer l's inputs under the current
hybrid (every earlier layer already DSLA and frozen) and the teacher attention's output
on them, initialise a fresh DSLA layer from data, train only its parameters on the
relative MSE of the attention output, publish it, and convert it before going on.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import random
import time
from dataclasses import dataclass

import torch

from distill_workers.init import init_scales
from distill_workers.layer_data import LayerData, capture_layer

log = logging.getLogger(__name__)

ONE_STATE_ALPHA = 30.0  # softmax([-30, 30]) = (1e-26, 1): only the recency state speaks


@dataclass
class DistillConfig:
    tokens_per_layer: int = 15360  # MSE-phase training tokens per layer (steps x block_size)
    train_blocks: int = 8          # cached blocks per layer (one held out for the metric)
    block_size: int = 512
    lr: float = 1e-2
    train_chunk_size: int = 16     # same math as the serving chunk size, faster on CPU
    one_state: bool = False        # ablation: GLA-like, a single (recency) state
    kl_steps: int = 10             # logits-KL steps after the MSE phase (0 = MSE only)
    kl_blocks: int = 2             # training blocks the KL phase replays (plus the held-out block, to judge it)
    kl_lr: float = 3e-3
    batch_blocks: int = 1          # blocks per optimiser step (MSE and KL phases); >1 pays off on GPUs
    seed: int = 0

    def to_dict(self):
        return dataclasses.asdict(self)


def relative_mse(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """MSE over the target's mean square: comparable across layers of any scale."""
    return (out.float() - target.float()).pow(2).mean() / target.float().pow(2).mean().clamp_min(1e-12)


@torch.no_grad()
def evaluate_module(module, data: LayerData, blocks) -> float:
    losses = []
    for i in blocks:
        out, _, _ = module(data.x[i:i + 1], data.cos, data.sin)
        losses.append(relative_mse(out, data.y[i:i + 1]).item())
    return sum(losses) / max(1, len(losses))


def _autocast(x: torch.Tensor):
    """bf16 autocast on GPU (the fused kernels run there); plain fp32 on CPU."""
    import contextlib

    if x.is_cuda:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _lr_at(step: int, steps: int, lr: float) -> float:
    warm = max(1, steps // 5)  # Adam moves every weight by ~lr at once: ease off the least-squares init
    if step < warm:
        return lr * (step + 1) / warm
    return lr * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))


def distill_layer(hybrid, layer: int, data: LayerData, cfg: DistillConfig, dsla_config=None,
                  progress=None, teacher_lp=None):
    """Train a fresh DSLA module for `layer` on `data`; returns (module, metrics).

    `progress(step, steps, loss, tokens_per_s)` is called after every step; if it returns
    True the training stops early (the caller is shutting down)."""
    torch.manual_seed(cfg.seed + layer)
    module = hybrid.new_dsla_module(layer, dsla_config=dsla_config)
    serve_cfg = module.cfg
    module.cfg = dataclasses.replace(serve_cfg, chunk_size=cfg.train_chunk_size)
    n = data.num_blocks
    held_out = [n - 1] if n > 1 else [0]
    train = list(range(n - 1)) if n > 1 else [0]
    init_blocks = train[:2]
    fit = init_scales(module, data.x[init_blocks], data.y[init_blocks], data.cos, data.sin)
    if cfg.one_state:
        with torch.no_grad():
            module.alpha.copy_(torch.tensor([-ONE_STATE_ALPHA, ONE_STATE_ALPHA], device=module.alpha.device))
        module.alpha.requires_grad_(False)
    rel_init = evaluate_module(module, data, held_out)
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=cfg.lr)
    batch = max(1, min(cfg.batch_blocks, len(train)))
    step_tokens = batch * data.x.shape[1]
    steps = max(1, cfg.tokens_per_layer // step_tokens)
    rng = random.Random(cfg.seed * 1000 + layer)
    order: list[int] = []
    t0, loss_ema = time.time(), None
    for step in range(steps):
        if len(order) < batch:
            order = train[:]  # a fresh epoch: every block is seen once before any repeats
            rng.shuffle(order)
        idx = [order.pop() for _ in range(batch)]
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, steps, cfg.lr)
        with _autocast(data.x):
            out, _, _ = module(data.x[idx], data.cos, data.sin)
        loss = relative_mse(out, data.y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        loss_ema = loss.item() if loss_ema is None else 0.9 * loss_ema + 0.1 * loss.item()
        if progress is not None:
            tps = (step + 1) * step_tokens / max(1e-9, time.time() - t0)
            if progress(step + 1, steps, loss_ema, tps):  # shutting down: the layer will be dropped
                module.cfg = serve_cfg
                module.requires_grad_(False)
                return module, {"stopped": True, "steps": step + 1}
    kl = {}
    if cfg.kl_steps and teacher_lp is not None and data.resid is not None:
        from distill_workers.kl_phase import kl_phase

        kl = kl_phase(hybrid, layer, module, data, teacher_lp, cfg.kl_steps, cfg.kl_lr, cfg.batch_blocks)
    module.cfg = serve_cfg
    module.requires_grad_(False)
    for p in module.parameters():  # installed for the rest of the chain: no gradient buffers kept with it
        p.grad = None
    metrics = {**kl, "rel_mse_init": round(rel_init, 5), "rel_mse": round(evaluate_module(module, data, held_out), 5),
               "train_loss": round(loss_ema, 5), "steps": step + 1, "tokens": (step + 1) * step_tokens,
               "seconds": round(time.time() - t0, 1), "history_weight": round(module.mix_weights()[0].item(), 5),
               "init_fit": {str(k): round(v, 5) for k, v in fit.items()}}
    return module, metrics


def spread(n: int, k: int) -> list[int]:
    """At most `k` distinct indices spread evenly over range(n)."""
    return torch.linspace(0, n - 1, min(k, n)).round().long().unique().tolist()


def training_blocks(tokenizer, cfg: DistillConfig, stride: int = 5, text_file: str | None = None) -> torch.Tensor:
    """`train_blocks` blocks spread over the training split (every `stride`-th block), or
    over the whole of `text_file` (machines without the corpus, other domains)."""
    if text_file is not None:
        from dsla_model.evaluation import text_blocks

        every = text_blocks(tokenizer, cfg.block_size, None, text_file)
        if every.shape[0] < 2:
            raise ValueError(f"{text_file} holds {every.shape[0]} block(s) of {cfg.block_size} tokens; distillation "
                             "needs at least 2 (the last one is held out to judge each layer)")
        return every[spread(every.shape[0], cfg.train_blocks)]
    from dsla_model.corpus import token_blocks

    blocks = token_blocks(tokenizer, "train", cfg.block_size, cfg.train_blocks * stride)
    picked = blocks[::stride][:cfg.train_blocks]
    if len(picked) < 2:
        raise ValueError(f"the training split holds {len(picked)} block(s) of {cfg.block_size} tokens; "
                         "distillation needs at least 2 (the last one is held out to judge each layer)")
    return torch.tensor(picked)


def freeze_teacher(hybrid):
    """No teacher weight ever needs a gradient: skipping them is most of the backward's cost."""
    for p in hybrid.model.parameters():
        p.requires_grad_(False)


class ChainedDistiller:
    """Distils `order[:num_layers]` into `store`, resuming after what is already published."""

    def __init__(self, hybrid, tokenizer, model_id: str, store, order, cfg: DistillConfig,
                 dsla_config=None, num_layers: int | None = None, blocks: torch.Tensor | None = None):
        self.hybrid, self.tok, self.store, self.cfg = hybrid, tokenizer, store, cfg
        self.blocks = blocks  # training token blocks; None = from the corpus' training split
        self.dsla_config = dsla_config or hybrid.dsla_config
        self.order = list(order)
        self.num_layers = len(self.order) if num_layers is None else min(num_layers, len(self.order))
        # one module built before the store is created: settings it cannot take (a negative rank)
        # fail here, not after a manifest naming them made the store refuse every later run
        hybrid.new_dsla_module(self.order[0], None, self.dsla_config)
        self.store_id = store.init(model_id, hybrid.fingerprint, self.order, self.dsla_config).get("store_id")
        store.remove_stale_temporaries()
        self.status = {"state": "idle", "layer": None, "step": 0, "steps": 0, "loss": None,
                       "published": store.published_layers(), "eta_s": None}
        self._stop = False
        self._bar = None
        self._unreadable: set[int] = set()  # published, but failing their checks: distilled again
        self._ready: set[int] = set()  # layers whose stored weights are installed in the hybrid

    def todo(self) -> list[int]:
        done = set(self.store.published_layers()) - self._unreadable
        return [l for l in self.order[:self.num_layers] if l not in done]

    def _apply_published(self):
        """Convert the published layers with their stored weights, one at a time: a layer that no
        longer loads (sha256, fingerprint) goes back on the to-do list, so one damaged file is
        republished instead of stopping the chain for good."""
        from dsla_model.layer_store import LayerStoreError

        self._unreadable.clear()
        self._ready.clear()
        for layer in self.store.published_layers():
            try:
                self.store.apply(self.hybrid, [layer])
                self._ready.add(layer)
            except (LayerStoreError, OSError) as e:
                log.warning("published layer %d does not load (%s): distilling it again", layer, e)
                self._unreadable.add(layer)

    def _chain_before(self, layer: int):
        """Convert exactly the ready layers before `layer` in the order: a layer is trained on the
        inputs the hybrid gives it when the layers before it are DSLA, never the ones after it (a
        damaged layer distilled again sits before layers that are already published)."""
        pos = self.order.index(layer)
        later = [x for x in self.order[pos + 1:] if x in self._ready]
        if later:
            log.warning("layer %d is distilled again; layers %s after it were distilled on its previous "
                        "version", layer, later)
        self.hybrid.set_dsla_layers([x for x in self.order[:pos] if x in self._ready])

    def stop(self):
        self._stop = True

    def resume(self):
        """Undo stop() before running again (the worker's start after a stop)."""
        self._stop = False

    def _progress(self, step, steps, loss, tps):
        s = self.status
        s.update(step=step, steps=steps, loss=loss, tokens_per_s=round(tps, 1))
        step_tokens = getattr(self, "_step_tokens", self.cfg.block_size * self.cfg.batch_blocks)
        per_layer = steps * step_tokens / max(tps, 1e-9)
        s["eta_s"] = round((steps - step) * step_tokens / max(tps, 1e-9)
                           + per_layer * max(0, len(self.todo()) - 1))
        if self._bar is not None:
            self._bar.n = step
            self._bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tps:.0f}")
            self._bar.refresh()
        return self._stop

    def run(self, show_progress: bool = False) -> list[int]:
        """Distil every remaining layer; returns the layers published by this call."""
        with self.store.writer():
            return self._run(show_progress)

    def _run(self, show_progress: bool) -> list[int]:
        freeze_teacher(self.hybrid)
        # the chain continues from the store: earlier layers are DSLA with their stored weights
        self._apply_published()
        for p in self.hybrid.dsla_parameters():
            p.requires_grad_(False)  # earlier layers are frozen: no gradient work for them
        blocks = self.blocks if self.blocks is not None else training_blocks(self.tok, self.cfg)
        blocks = blocks.to(next(self.hybrid.model.parameters()).device)
        teacher_lp, kl_idx = None, []
        n = blocks.shape[0]
        # what an MSE step trains on (distill_layer clips the batch to the n - 1 training blocks)
        self._step_tokens = self.cfg.block_size * max(1, min(self.cfg.batch_blocks, n - 1))
        # no KL phase without a training block of its own: with none it would train on the held-out block
        if self.cfg.kl_steps and self.cfg.kl_blocks > 0 and n > 1:
            from distill_workers.kl_phase import teacher_logprobs

            # the KL phase trains on MSE training blocks and is judged on the MSE held-out block
            # (the last): neither phase ever trains on that one (distill_layer holds it out too)
            kl_idx = list(range(min(self.cfg.kl_blocks, n - 1))) + [n - 1]
            teacher_lp = teacher_logprobs(self.hybrid, blocks[kl_idx])
        published = []
        for layer in self.todo():
            if self._stop:
                break
            self.status.update(state="capturing", layer=layer, step=0, loss=None)
            self._chain_before(layer)
            data = capture_layer(self.hybrid, layer, blocks, batch=max(2, self.cfg.batch_blocks),
                                 resid_blocks=kl_idx)
            self.status["state"] = "training"
            self._bar = None
            if show_progress:
                from tqdm import tqdm

                self._bar = tqdm(total=max(1, self.cfg.tokens_per_layer // self._step_tokens),
                                 desc=f"layer {layer:2d}", leave=True)
            module, metrics = distill_layer(self.hybrid, layer, data, self.cfg, self.dsla_config, self._progress,
                                            teacher_lp)
            if self._bar is not None:
                self._bar.close()
            if self._stop:
                break  # an interrupted layer is never published
            state = module.state_dict()
            if not (math.isfinite(metrics["rel_mse"]) and all(bool(v.isfinite().all()) for v in state.values())):
                # a diverged layer must not reach the store: replicas would serve it
                raise ValueError(f"layer {layer} diverged (non-finite weights or loss: relative MSE "
                                 f"{metrics['rel_mse']}); not published. Try a lower learning rate.")
            metrics["config"] = {"tokens_per_layer": self.cfg.tokens_per_layer, "block_size": self.cfg.block_size,
                                 "train_blocks": self.cfg.train_blocks, "one_state": self.cfg.one_state,
                                 "kl_steps": self.cfg.kl_steps, "batch_blocks": self.cfg.batch_blocks,
                                 "lr": self.cfg.lr, "device": str(blocks.device)}
            self.store.publish(layer, state, metrics, self.store_id)
            self._unreadable.discard(layer)
            self.hybrid.install(layer, module)
            self.hybrid.convert(layer)
            self._ready.add(layer)
            published.append(layer)
            self.status["published"] = self.store.published_layers()
        self.hybrid.set_dsla_layers(sorted(self._ready))  # the whole chain, as the store holds it
        self.status["state"] = "stopped" if self._stop else "done"
        return published
