"""Engine configuration (one dataclass, validated once at engine start)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from dsla_model.loading import max_positions
from kernels.reference import STATE_DTYPES

MAX_DEFAULT_MODEL_LEN = 8192
CPU_DEFAULT_CACHE_BYTES = 512 * 2**20
# state_dtype names -> the (history, recency) pools' dtypes: "float32" and "bfloat16" for both,
# "bfloat16-recency" for an fp32 history and a bf16 recency state
STATE_FORMATS = {str(d).removeprefix("torch."): (d, d) for d in STATE_DTYPES}
STATE_FORMATS["bfloat16-recency"] = (torch.float32, torch.bfloat16)
GPU_CACHE_FRACTION = 0.85  # of the memory free after the model loaded; the rest is activations / graphs


def check_state_dtype(name) -> str:
    """`name` if it is a state format (STATE_FORMATS), else a ValueError naming them."""
    if not isinstance(name, str) or name not in STATE_FORMATS:
        raise ValueError(f"state_dtype must be one of {sorted(STATE_FORMATS)}, got {name!r}")
    return name


@dataclass
class EngineConfig:
    max_running: int = 16
    max_batched_tokens: int = 2048
    max_model_len: int | None = None  # None: the model's max positions, capped at 8192
    cache_memory_bytes: int | None = None  # None: 512 MiB on CPU, a fraction of free memory on CUDA
    use_cuda_graphs: bool = True
    block_size: int = 16  # tokens per KV block (reduced if the state size is not a multiple)
    # How the DSLA state pools store each state between steps (the update always runs in fp32).
    # "bfloat16" halves the bytes a DSLA layer's decode step moves, but rounding every token
    # cancels history decays closer to 1 than bf16's step and drops small updates: outputs drift
    # from the model's over long decodes (bench/results/state_dtype_quality.md), and each prefill
    # piece adds a rounding, so a request's result depends on how its prompt was chunked.
    # "bfloat16-recency" rounds only the recency state, whose decays bf16 resolves: 3/4 of the
    # bytes, and a drift smaller than bf16 weights' own.
    state_dtype: str = "float32"

    def validate(self):
        if self.max_running < 1:
            raise ValueError(f"max_running must be >= 1, got {self.max_running}")
        if self.max_batched_tokens < self.max_running:
            raise ValueError("max_batched_tokens must be >= max_running (every running sequence "
                             f"decodes one token per step): {self.max_batched_tokens} < {self.max_running}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")
        if self.cache_memory_bytes is not None and self.cache_memory_bytes <= 0:
            raise ValueError(f"cache_memory_bytes must be > 0, got {self.cache_memory_bytes}")
        check_state_dtype(self.state_dtype)
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")


def _sliding_window(mc) -> int | None:
    """The attention window of a model whose layers use one (Mistral: all of them; Qwen2: the
    layers its layer_types mark), else None."""
    window = getattr(mc, "sliding_window", None)
    layer_types = getattr(mc, "layer_types", None)
    if not getattr(mc, "use_sliding_window", True):  # Qwen2's switch (its window field is set regardless)
        return None
    if window and (layer_types is None or "sliding_attention" in layer_types):
        return int(window)
    return None


def served_max_len(config: EngineConfig, mc) -> int:
    """The longest sequence the engine serves for model config `mc` (the ingress validates
    requests against the same number). The runner's attention sees every earlier token, which
    equals the model's windowed attention only while a sequence fits its window: longer
    sequences would get other tokens."""
    window = _sliding_window(mc)
    if config.max_model_len is not None:
        if window is not None and config.max_model_len > window:
            raise ValueError(f"max_model_len {config.max_model_len} exceeds the model's sliding window "
                             f"({window} tokens), which the engine does not implement")
        return config.max_model_len
    limit = max_positions(mc) or MAX_DEFAULT_MODEL_LEN
    return min(limit, MAX_DEFAULT_MODEL_LEN, window or MAX_DEFAULT_MODEL_LEN)
