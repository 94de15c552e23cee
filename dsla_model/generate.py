"""The reference generation loop (one sequence at a time) over a HybridModel.

With a cache it prefills once and decodes token by token; without one it
recomputes the whole forward at every step. The engine is the fast path; this
loop is what it is checked against.
"""
from __future__ import annotations

import torch


# Temperatures below this sample greedily (vLLM's rule): logits / 1e-44 overflow to inf and
# the softmax to NaN, and anything this cold is argmax anyway.
GREEDY_BELOW = 1e-5


def sample_next(logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> int:
    """logits [V] -> token id; temperature 0 (or below GREEDY_BELOW) is greedy."""
    if temperature < GREEDY_BELOW:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.no_grad()
def generate_ids(hybrid, prompt_ids: list[int], max_tokens: int, temperature: float = 0.0,
                 use_cache: bool = True, seed: int = 0, eos_ids=(), prefill_pieces: int = 1) -> list[int]:
    """Generate up to `max_tokens` ids after `prompt_ids`; stops after an id in `eos_ids`.

    `prefill_pieces` > 1 feeds the prompt to the cache in that many pieces.
    """
    if not prompt_ids:
        raise ValueError("empty prompt")
    device = next(hybrid.parameters()).device
    gen = torch.Generator(device="cpu").manual_seed(seed)
    ids = list(prompt_ids)
    out: list[int] = []
    cache = hybrid.new_cache() if use_cache else None
    pending = ids
    if use_cache and prefill_pieces > 1:
        bounds = torch.linspace(0, len(ids), prefill_pieces + 1).long().tolist()
        for a, b in zip(bounds[:-2], bounds[1:-1]):
            if b > a:
                hybrid(torch.tensor([ids[a:b]], device=device), cache=cache)
        pending = ids[bounds[-2]:]
    for _ in range(max_tokens):
        if use_cache:
            logits = hybrid(torch.tensor([pending], device=device), cache=cache)[0, -1]
        else:
            logits = hybrid(torch.tensor([ids], device=device))[0, -1]
        nxt = sample_next(logits.cpu(), temperature, gen)
        out.append(nxt)
        ids.append(nxt)
        pending = [nxt]
        if nxt in eos_ids:
            break
    return out


def generate_batch(hybrid, tokenizer, prompts: list[list[int]], max_tokens: int, temperature: float = 0.0,
                   seed: int = 0, **engine_kw) -> list[list[int]]:
    """All prompts through the engine as one continuous batch. Prompt i samples with seed
    `seed + i` and stops after the tokenizer's EOS, as `generate_ids` does."""
    from dsla_model.engine import Engine, EngineConfig, SamplingParams

    engine_kw.setdefault("max_running", max(1, min(64, len(prompts))))
    engine = Engine(hybrid, tokenizer, EngineConfig(**engine_kw))
    params = [SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed + i)
              for i in range(len(prompts))]
    return engine.generate(prompts, params)
