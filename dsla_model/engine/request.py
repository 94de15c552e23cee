"""A request's state while it is in the engine."""
from __future__ import annotations

import random
import time

import torch

from dsla_model.engine.detokenizer import IncrementalDetokenizer


class Request:
    def __init__(self, request_id: str, prompt_ids: list[int], params, conf, tokenizer, eos_ids,
                 generator: torch.Generator | None = None):
        self.id = request_id
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.conf = conf  # LayerConfig: the engine's at add_request (or at a swap while waiting), kept once admitted
        if generator is None:  # a resumed request's comes from Engine.resume_generator, past its earlier draws
            seed = params.seed if params.seed is not None else random.getrandbits(63)
            generator = torch.Generator(device="cpu").manual_seed(seed)
        self.generator = generator
        n = len(self.prompt_ids) - params.resume_tokens  # the prompt proper; the rest an earlier attempt's output
        self.detok = IncrementalDetokenizer(tokenizer, self.prompt_ids[:n], params.stop, self.prompt_ids[n:],
                                            params.resume_emitted_chars)
        self.stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else set(eos_ids))
        self.tokens = list(prompt_ids)  # prompt + generated so far
        self.num_computed = 0  # tokens whose KV / state is in the cache
        self.cache = None  # SeqCache once admitted
        self.finish_reason: str | None = None
        self.arrival = time.perf_counter()
        self.first_token_at: float | None = None
        self.last_token_at: float | None = None

    @property
    def num_prompt(self) -> int:
        return len(self.prompt_ids)

    @property
    def num_generated(self) -> int:
        return len(self.tokens) - len(self.prompt_ids)

    @property
    def max_len(self) -> int:
        return len(self.prompt_ids) + self.params.max_tokens

    @property
    def in_prefill(self) -> bool:
        return self.num_computed < len(self.prompt_ids)
