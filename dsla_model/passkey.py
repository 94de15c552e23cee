"""Passkey retrieval: a number hidden in long filler text, asked for at the end.

Scored teacher-forced in one forward pass: the answer counts as retrieved when the model's
argmax at every answer position is the answer's next token and its argmax after the last one
does not go on with the number (a digit), which is what greedy decoding would produce, without
paying one full forward per generated token.
"""
from __future__ import annotations

import random

import torch

FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. "
          "There and back again. ")
INTRO = ("There is an important pass key hidden inside a lot of irrelevant text. "
         "Find it and memorize it. I will quiz you about the pass key.\n")
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key.\n"
QUESTION = "\nWhat is the pass key? The pass key is"


def make_prompt(tokenizer, context: int, key: int, depth: float) -> tuple[list[int], list[int]]:
    """(prompt ids, answer ids) with the prompt about `context` tokens long and the
    needle at relative `depth` of the filler."""
    enc = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]
    intro, needle, question = enc(INTRO), enc(NEEDLE.format(key=key)), enc(QUESTION)
    answer = enc(f" {key}")
    filler_unit = enc(FILLER)
    room = context - len(intro) - len(needle) - len(question) - len(answer)
    if room < len(filler_unit):
        raise ValueError(f"context {context} is too short for a passkey prompt")
    filler = (filler_unit * (room // len(filler_unit) + 1))[:room]
    # the needle goes in at a token boundary (it may split a filler sentence, which is harmless:
    # the needle is its own sentences, starting a new line is not required)
    cut = int(depth * len(filler))
    prompt = intro + filler[:cut] + needle + filler[cut:] + question
    return prompt, answer


def _device(model):
    return next(model.parameters()).device


@torch.no_grad()
def passkey_accuracy(model, tokenizer, contexts=(512, 1024, 2048), trials: int = 4, seed: int = 0) -> dict:
    """{context: fraction retrieved} over `trials` keys at spread depths, plus 'mean'.
    `model(input_ids) -> logits` (a HybridModel)."""
    rng = random.Random(seed)
    out = {}
    for ctx in contexts:
        hits = 0
        for t in range(trials):
            key = rng.randrange(10000, 100000)
            depth = (t + 0.5) / trials
            prompt, answer = make_prompt(tokenizer, ctx, key, depth)
            ids = torch.tensor([prompt + answer], device=_device(model))
            logits = model(ids)[0]
            n = len(answer)
            pred = logits[-n - 1:-1].argmax(-1)
            # 604946 is not 60494: where numbers are split into digits, the next token must end it
            ends = not tokenizer.decode([int(logits[-1].argmax())])[:1].isdigit()
            hits += int(torch.equal(pred.cpu(), torch.tensor(answer)) and ends)
        out[str(ctx)] = hits / trials
    out["mean"] = sum(out[str(c)] for c in contexts) / len(contexts)
    return out
