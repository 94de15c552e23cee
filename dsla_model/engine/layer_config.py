"""A pinned layer configuration: which layers run as DSLA, with which module objects.

A request keeps the `LayerConfig` it was admitted with until it finishes; a hot
swap makes a new one for later requests. Holding the module objects (not layer
flags) is what makes this safe: a swap installs new objects in the model and
the old ones live on for as long as a request refers to them.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(eq=False)
class LayerConfig:
    id: int
    modules: tuple  # per layer: a DSLAAttention, or None for softmax attention
    store_version: object = None
    attn_layers: tuple = field(init=False)
    dsla_layers: tuple = field(init=False)

    def __post_init__(self):
        self.attn_layers = tuple(i for i, m in enumerate(self.modules) if m is None)
        self.dsla_layers = tuple(i for i, m in enumerate(self.modules) if m is not None)

    @classmethod
    def snapshot(cls, hybrid, config_id: int, store_version=None) -> "LayerConfig":
        mods = hybrid.dsla_modules()
        return cls(config_id, tuple(mods.get(i) for i in range(hybrid.num_layers)), store_version)

    def same_modules(self, other: "LayerConfig") -> bool:
        return len(self.modules) == len(other.modules) and all(a is b for a, b in zip(self.modules, other.modules))
