"""The sensitivity order, computed once per model and kept in the user cache."""
from __future__ import annotations

import json
import os

from dsla_model.loading import cache_root
from dsla_model.sensitivity import sensitivity_order


def cached_order(hybrid, tokenizer, num_prompts: int = 32) -> tuple[list[int], list[float]]:
    path = cache_root() / "order" / f"{hybrid.fingerprint}-{num_prompts}.json"
    if path.exists():
        d = json.loads(path.read_text())
        return d["order"], d["entropy"]
    order, entropy = sensitivity_order(hybrid, tokenizer, num_prompts)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps({"order": order, "entropy": entropy}))
    os.replace(tmp, path)
    return order, entropy


def layers_for_conversion(order: list[int], ratio: float) -> list[int]:
    """The first round(ratio x layers) layers of the order, sorted."""
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"conversion ratio must be in [0, 1], got {ratio}")
    return sorted(order[: round(ratio * len(order))])
