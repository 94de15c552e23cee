"""A decoder LLM whose attention layers can each run as softmax attention or DSLA.

Every layer's `self_attn` becomes a `SwitchableAttention` holding the teacher
module and (once converted) a DSLA module; both stay resident, so converting or
reverting a layer is a flag flip and a revert restores the original outputs
exactly. Works for Llama-shaped HF decoders (Llama, Qwen2, Mistral).
"""
from __future__ import annotations

import inspect

import torch
from torch import nn

from dsla_model.cache import HybridCache
from dsla_model.dsla_attention import DSLAAttention, DSLAConfig
from dsla_model.loading import attention_dims, model_fingerprint


# The decoders that the engine's runner and the DSLA layer reproduce. Others with q/k/v/o projections
# differ where those do not look (partial or interleaved RoPE, NoPE layers, clipped q/k/v, extra norms,
# parallel residuals, scaled embeddings), and they would serve other tokens or fail deep in a step.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")

# generate() arguments that turn on drafting (assisted / prompt-lookup decoding)
_DRAFTING = ("assistant_model", "prompt_lookup_num_tokens", "assistant_early_exit")


class SwitchableAttention(nn.Module):
    def __init__(self, teacher: nn.Module, layer_idx: int):
        super().__init__()
        self.teacher = teacher
        self.dsla: DSLAAttention | None = None
        self.use_dsla = False
        self.layer_idx = layer_idx
        params = inspect.signature(teacher.forward).parameters
        # transformers renamed past_key_values to cache in 5.x
        self._cache_kw = "cache" if "cache" in params else "past_key_values"

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None,
                cache=None, past_key_values=None, **kwargs):
        cache = cache if cache is not None else past_key_values
        if isinstance(cache, HybridCache):
            dsla = cache.dsla_modules.get(self.layer_idx)
        elif cache is not None and self.use_dsla:
            raise TypeError("a model with DSLA layers needs a HybridCache (HybridModel.new_cache())")
        else:
            dsla = self.dsla if self.use_dsla else None
        if dsla is None:
            kwargs[self._cache_kw] = cache
            return self.teacher(hidden_states, position_embeddings=position_embeddings,
                                attention_mask=attention_mask, **kwargs)
        cos, sin = position_embeddings
        s1, s2 = cache.dsla_state(self.layer_idx) if cache is not None else (None, None)
        out, s1, s2 = dsla(hidden_states, cos, sin, s1, s2)
        if cache is not None:
            cache.set_dsla_state(self.layer_idx, s1, s2, hidden_states.shape[1])
        return out, None


class HybridModel(nn.Module):
    def __init__(self, model: nn.Module, dsla_config: DSLAConfig = DSLAConfig()):
        super().__init__()
        layers = getattr(getattr(model, "model", None), "layers", None)
        attn = lambda layer: getattr(getattr(layer, "self_attn", None), "teacher", getattr(layer, "self_attn", None))  # noqa: E731
        if layers is None or not all(hasattr(attn(layer), "q_proj") for layer in layers):
            raise ValueError(f"{type(model).__name__} is not supported: DSLA needs a Llama-shaped decoder "
                             "(model.model.layers[i].self_attn with q/k/v/o projections: Llama, Qwen2, Mistral)")
        # what DSLA's projection does not reproduce: q/k norms (Qwen3, OLMo2), a query scale other than
        # 1/sqrt(head_dim) or logit softcapping (Gemma2); converting such a layer would silently drop them
        cfg = model.config
        hd = attention_dims(cfg)[1]
        t = attn(layers[0])
        if (hasattr(t, "q_norm") or hasattr(t, "k_norm") or abs(getattr(t, "scaling", hd ** -0.5) - hd ** -0.5) > 1e-6
                or getattr(cfg, "attn_logit_softcapping", None) is not None):
            raise ValueError(f"{type(model).__name__} is not supported: its attention has q/k norms, a query scale "
                             "other than 1/sqrt(head_dim) or logit softcapping, which DSLA layers do not reproduce "
                             "(supported: Llama, Qwen2, Mistral)")
        kind = getattr(cfg, "model_type", None)
        if kind not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"{type(model).__name__} (model_type {kind!r}) is not supported: the engine and DSLA "
                             f"layers reproduce only these decoders: {', '.join(SUPPORTED_MODEL_TYPES)}")
        self.fingerprint = model_fingerprint(model)  # of the untouched teacher
        self.model = model
        self.dsla_config = dsla_config
        # transformers renamed past_key_values to cache in 5.x; look it up once, not per forward
        self._cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        c = model.config
        self.num_layers = c.num_hidden_layers
        self.num_heads = c.num_attention_heads
        self.num_kv_heads, self.head_dim = attention_dims(c)
        for i, layer in enumerate(self.decoder_layers):
            if not isinstance(layer.self_attn, SwitchableAttention):
                layer.self_attn = SwitchableAttention(layer.self_attn, i)

    @property
    def config(self):
        return self.model.config

    @property
    def decoder_layers(self):
        return self.model.model.layers

    def attention(self, layer: int) -> SwitchableAttention:
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer {layer} out of range 0..{self.num_layers - 1}")
        return self.decoder_layers[layer].self_attn

    @property
    def dsla_layers(self) -> list[int]:
        return [i for i in range(self.num_layers) if self.attention(i).use_dsla]

    def dsla_modules(self) -> dict[int, DSLAAttention]:
        return {i: self.attention(i).dsla for i in self.dsla_layers}

    def new_dsla_module(self, layer: int, dsla_weights: dict | None = None,
                        dsla_config: DSLAConfig | None = None) -> DSLAAttention:
        """A fresh DSLA module for `layer`, not yet installed."""
        sw = self.attention(layer)
        w = sw.teacher.q_proj.weight
        module = DSLAAttention(sw.teacher, self.num_heads, self.num_kv_heads, self.head_dim,
                               self.config.hidden_size, dsla_config or self.dsla_config)
        module.to(device=w.device, dtype=w.dtype)
        if dsla_weights is not None:
            # shapes first: load_state_dict reports a mismatch (another gate or delta rank) as a RuntimeError
            own = module.state_dict()
            wrong = {k: (tuple(v.shape), tuple(own[k].shape)) for k, v in dsla_weights.items()
                     if k in own and tuple(v.shape) != tuple(own[k].shape)}
            if wrong:
                raise ValueError(f"layer {layer}: DSLA weights do not fit this config (shape given, expected: {wrong})")
            missing, unexpected = module.load_state_dict(dsla_weights, strict=False)
            if missing or unexpected:
                raise ValueError(f"layer {layer}: DSLA weights do not fit (missing {missing}, unexpected {unexpected})")
        return module

    def install(self, layer: int, module: DSLAAttention):
        """Make `module` the layer's DSLA form. A new object each time: caches pinned
        to the old one keep computing with it."""
        self.attention(layer).dsla = module

    def convert(self, layer: int, dsla_weights: dict | None = None):
        sw = self.attention(layer)
        if dsla_weights is not None or sw.dsla is None:
            self.install(layer, self.new_dsla_module(layer, dsla_weights))
        sw.use_dsla = True

    def revert(self, layer: int):
        self.attention(layer).use_dsla = False

    def set_dsla_layers(self, layers):
        wanted = set(layers)
        for i in range(self.num_layers):
            self.convert(i) if i in wanted else self.revert(i)

    def dsla_parameters(self, layers=None):
        layers = self.dsla_layers if layers is None else layers
        return [p for i in layers for p in self.attention(i).dsla.parameters()]

    def new_cache(self) -> HybridCache:
        return HybridCache(self.config, self.dsla_modules())

    def forward(self, input_ids, cache: HybridCache | None = None, attention_mask=None, **kwargs):
        """Logits [B,T,V]; with a cache, continues the sequence it holds."""
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=cache is not None,
                         **{self._cache_kw: cache}, **kwargs)
        return out.logits

    @torch.no_grad()
    def generate(self, input_ids, **kwargs):
        """HF `generate` with a hybrid cache pinned to the current configuration. While layers are
        DSLA it refuses a padded batch (they do not read the attention mask, so the padding would
        flow into their states; the engine, `generate.generate_batch`, needs no padding) and
        assisted decoding (it cuts draft tokens back off the cache, which a state cannot undo)."""
        if self.dsla_layers and any(kwargs.get(k) is not None for k in _DRAFTING):
            raise ValueError("assisted / speculative decoding is not supported with DSLA layers: it cuts rejected "
                             "draft tokens back off the cache, and a DSLA state cannot give tokens back")
        mask = kwargs.get("attention_mask")
        if self.dsla_layers and mask is not None and bool((mask == 0).any()):
            raise ValueError("padded batches are not supported with DSLA layers (their states would take in the "
                             "padding): generate one prompt at a time or use generate.generate_batch")
        kwargs.setdefault(self._cache_kw, self.new_cache())
        return self.model.generate(input_ids=input_ids, **kwargs)
