"""The sensitivity order, computed once per model and kept in the user cache."""
from __future__ import annotations

import json
import logging

from dsla_model.loading import cache_root, write_cached
from dsla_model.sensitivity import sensitivity_order

log = logging.getLogger(__name__)


def read_cached(path, num_layers: int, key: str, parse, what: str):
    """(order, parse(d[key])) from an order cache file, or None when there is none or it is not a
    valid one (torn by a crash, edited): the caller measures again. `parse` raises ValueError,
    KeyError or TypeError on values it cannot take; they must cover every layer."""
    try:
        d = json.loads(path.read_text())
        order, values = d["order"], parse(d[key])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        log.warning("ignoring the %s cache %s: %s", what, path, e)
        return None
    if (not isinstance(order, list) or any(type(x) is not int for x in order)  # [true, 0, 2] sorts like [0, 1, 2]
            or sorted(order) != list(range(num_layers)) or len(values) != num_layers):
        log.warning("ignoring the %s cache %s: not an order of %d layers", what, path, num_layers)
        return None
    return order, values


def _entropies(v) -> list[float]:
    return [float(x) for x in v]


def cached_order(hybrid, tokenizer, num_prompts: int = 32) -> tuple[list[int], list[float]]:
    path = cache_root() / "order" / f"{hybrid.fingerprint}-{num_prompts}.json"
    cached = read_cached(path, hybrid.num_layers, "entropy", _entropies, "sensitivity order")
    if cached is not None:
        return cached
    order, entropy = sensitivity_order(hybrid, tokenizer, num_prompts)
    write_cached(path, {"order": order, "entropy": entropy}, "sensitivity order")
    return order, entropy


def layers_for_conversion(order: list[int], ratio: float) -> list[int]:
    """The first round(ratio x layers) layers of the order, sorted."""
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"conversion ratio must be in [0, 1], got {ratio}")
    return sorted(order[: round(ratio * len(order))])
