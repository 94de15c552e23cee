"""The hybrid cache for HF-style forward loops and `generate`.

Attention layers keep growing KV as in `DynamicCache`; DSLA layers keep two
fixed-size fp32 states per sequence that are replaced, never concatenated.
The cache pins the layer configuration (which layers are DSLA, and which DSLA
module objects) at creation, so a sequence finishes under the configuration it
started with even if the model is swapped meanwhile. The sequence length is
counted per layer and read as the maximum, so it is right whichever layers
(layer 0 included) are DSLA.
"""
from __future__ import annotations

import torch
from transformers import DynamicCache


class HybridCache(DynamicCache):
    def __init__(self, config, dsla_modules: dict):
        # Plain layers even for a sliding-window model: a sliding layer keeps only the window's
        # last tokens, which the mask sizes below (the whole sequence) would not match. The
        # model's sliding mask still limits what each query sees.
        super().__init__()
        self.dsla_modules = dict(dsla_modules)  # layer -> DSLAAttention, pinned
        self._states: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._counts = [0] * config.num_hidden_layers

    @property
    def dsla_layers(self) -> frozenset:
        return frozenset(self.dsla_modules)

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if layer_idx in self.dsla_modules:
            raise RuntimeError(f"layer {layer_idx} is DSLA in this cache; it holds no KV")
        self._counts[layer_idx] += key_states.shape[-2]
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def dsla_state(self, layer_idx):
        return self._states.get(layer_idx, (None, None))

    def set_dsla_state(self, layer_idx, s1, s2, num_tokens):
        self._states[layer_idx] = (s1, s2)
        self._counts[layer_idx] += num_tokens

    # Beam search and batch expansion rearrange the batch rows of the KV; a DSLA state row
    # belongs to the same sequence as its KV row, so it must move with it.
    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self._map_states(lambda s: s.index_select(0, beam_idx.to(s.device)))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self._map_states(lambda s: s[indices.to(s.device) if torch.is_tensor(indices) else indices])

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self._map_states(lambda s: s.repeat_interleave(repeats, dim=0))

    def _map_states(self, fn):
        self._states = {i: (fn(s1), fn(s2)) for i, (s1, s2) in self._states.items()}

    def crop(self, n: int) -> None:
        """Cut the cache back as assisted decoding does after rejected draft tokens: n < 0 drops
        -n tokens, n >= 0 keeps the first n (older transformers). A DSLA state has folded every
        token in and cannot give one back, so a cache with DSLA layers refuses rather than go on
        out of step."""
        seq = self.get_seq_length()
        keep = n if n >= 0 else seq + n
        if keep >= seq:
            return
        if self.dsla_modules:
            raise ValueError("a cache with DSLA layers cannot be cut back to fewer tokens (assisted / "
                             "speculative decoding): their states hold every token seen")
        super().crop(keep - seq)  # a negative count, which every transformers version takes
        self._counts = [min(c, keep) for c in self._counts]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return max(self._counts)

    def get_mask_sizes(self, query, layer_idx: int = 0, *args):
        # transformers passes either the query length or the cache positions, by version
        q = query if isinstance(query, int) else int(query.shape[0])
        return self.get_seq_length() + q, 0

    def state_bytes(self) -> int:
        """Bytes held for this sequence batch: KV of attention layers plus DSLA states."""
        total = sum(s.numel() * s.element_size() for pair in self._states.values() for s in pair)
        for i, layer in enumerate(self.layers):
            if i not in self.dsla_modules and getattr(layer, "keys", None) is not None:
                total += layer.keys.numel() * layer.keys.element_size() * 2
        return total
