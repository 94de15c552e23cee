"""The sensitivity order, computed once per model and kept in the user cache."""
from __future__ import annotations

import json
import os

from dsla_model.loading import cache_root
from dsla_model.sensitivity import sensitivity_order


def _read(path, num_layers: int):
    """The cached (order, entropy), or None when the file is missing, torn or not an order of the layers."""
    try:
        d = json.loads(path.read_text())
        order, entropy = d["order"], d["entropy"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if sorted(order) != list(range(num_layers)) or len(entropy) != num_layers:
        return None
    return order, entropy


def cached_order(hybrid, tokenizer, num_prompts: int = 32) -> tuple[list[int], list[float]]:
    path = cache_root() / "order" / f"{hybrid.fingerprint}-{num_prompts}.json"
    cached = _read(path, hybrid.num_layers)
    if cached is not None:
        return cached
    order, entropy = sensitivity_order(hybrid, tokenizer, num_prompts)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(json.dumps({"order": order, "entropy": entropy}))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return order, entropy


def layers_for_conversion(order: list[int], ratio: float) -> list[int]:
    """The first round(ratio x layers) layers of the order, sorted."""
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"conversion ratio must be in [0, 1], got {ratio}")
    return sorted(order[: round(ratio * len(order))])
