"""Sensitivity order: which attention layers to convert first.

A layer whose last query attends sharply (low entropy) looks at few tokens and
is the easiest for a fixed-size state to imitate; broad (high-entropy) layers
are converted last.
"""
from __future__ import annotations

import torch


@torch.no_grad()
def attention_entropy(model, prompts: list[list[int]]) -> list[float]:
    """Mean over prompts and heads of the entropy (nats) of each layer's last-query attention row.

    `model` is an HF causal LM (or a HybridModel with no DSLA layers). Uses eager
    attention for the duration, since fused kernels do not return weights.
    """
    hf = getattr(model, "model", model) if hasattr(model, "dsla_layers") else model
    if hasattr(model, "dsla_layers") and model.dsla_layers:
        raise ValueError("compute the order on the all-attention model")
    previous = hf.config._attn_implementation
    hf.set_attn_implementation("eager")
    device = next(hf.parameters()).device
    totals = None
    try:
        for ids in prompts:
            out = hf(input_ids=torch.tensor([ids], device=device), output_attentions=True, use_cache=False)
            rows = [a[0, :, -1, :].float() for a in out.attentions]  # [H, T] per layer
            ent = torch.stack([-(r * r.clamp_min(1e-12).log()).sum(-1).mean() for r in rows])
            totals = ent if totals is None else totals + ent
    finally:
        hf.set_attn_implementation(previous)
    return (totals / len(prompts)).tolist()


def order_from_entropy(entropy: list[float]) -> list[int]:
    """Lowest entropy first; ties broken by layer index so the order is stable."""
    return sorted(range(len(entropy)), key=lambda i: (round(entropy[i], 6), i))


def sensitivity_order(model, tokenizer, num_prompts: int = 32, prompt_len: int = 256, seed: int = 0):
    from dsla_model.corpus import calibration_prompts

    if num_prompts < 1:
        raise ValueError("num_prompts must be >= 1")
    prompts = calibration_prompts(tokenizer, num_prompts, prompt_len, seed)
    if not prompts:
        raise ValueError(f"the corpus has no training document long enough for a {prompt_len}-token "
                         "calibration prompt: give the order another way (distill --order)")
    entropy = attention_entropy(model, prompts)
    return order_from_entropy(entropy), entropy
