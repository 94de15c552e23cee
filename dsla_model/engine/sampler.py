"""Turns a step's last-token logits into next tokens, one request at a time.

Each request owns a CPU `torch.Generator` seeded from its `seed`, so what it
samples depends only on its own logits and seed, never on which other requests
share the batch. With top_k = 0 and top_p = 1 a row is sampled exactly as the
reference loop's `sample_next` samples it.
"""
from __future__ import annotations

import torch


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """logits [V] fp32 -> logits with the tokens outside top-k / the top-p nucleus at -inf."""
    if top_k and top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the mass before it already reaches top_p (the first always stays)
        drop_sorted = (probs.cumsum(-1) - probs) >= top_p
        # ...even for a top_p that rounds to 0 in fp32 (1e-320 > 0 passes validation): else nothing
        # is left to sample and the step fails for every request in the batch
        drop_sorted[0] = False
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_row(logits: torch.Tensor, params, generator: torch.Generator) -> int:
    """logits [V] on CPU -> a token id under `params` (greedy when params.greedy)."""
    if params.greedy:
        return int(torch.argmax(logits))
    logits = filter_logits(logits.float() / params.temperature, params.top_k, params.top_p)
    probs = torch.softmax(logits, dim=-1)
    if not bool(torch.isfinite(probs).all()):
        # an inf or NaN logit (a numerical blow-up, not input): torch.multinomial would raise and
        # the failed step would abort every request in the batch. This row takes its argmax (the
        # +inf token, where there is one) and still consumes its draw, so a resume's skip_draws
        # stays in step with the generator.
        skip_draws(generator, logits.numel(), 1)
        return int(torch.argmax(logits))
    return int(torch.multinomial(probs, 1, generator=generator))


def skip_draws(generator: torch.Generator, vocab: int, n: int) -> None:
    """Advance `generator` past n draws of `sample_row` over a vocabulary of `vocab` tokens: what a
    draw consumes depends on the size of the distribution only, not on its values."""
    uniform = torch.ones(vocab)
    for _ in range(n):
        torch.multinomial(uniform, 1, generator=generator)


def sample(logits: torch.Tensor, requests) -> tuple[list[int], list[float | None]]:
    """logits [B,V] (any device) for `requests` (each with .params and .generator)."""
    greedy = torch.argmax(logits, dim=-1).tolist()  # one device sync for the common case
    want_lp = any(r.params.logprobs for r in requests)
    needs_rows = want_lp or any(not r.params.greedy for r in requests)
    rows = logits.float().cpu() if needs_rows else None
    tokens, logprobs = [], []
    for i, r in enumerate(requests):
        tok = greedy[i] if r.params.greedy else sample_row(rows[i], r.params, r.generator)
        tokens.append(tok)
        logprobs.append(float(torch.log_softmax(rows[i], -1)[tok]) if r.params.logprobs else None)
    return tokens, logprobs
