"""Per-request sampling parameters."""
from __future__ import annotations

from dataclasses import dataclass, field

from dsla_model.generate import GREEDY_BELOW


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 (or below GREEDY_BELOW) = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    # None: a fresh random seed per request. Any integer in [0, 2**64) is taken, but torch's CPU
    # generator (mt19937) keeps the low 32 bits: seeds equal modulo 2**32 sample alike.
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: bool = False  # report the chosen token's log-probability under the model
    # Set by the ingress when a request resumes on another replica (deploy/ingress.py): the last
    # resume_tokens prompt tokens are the earlier attempt's output, which delivered
    # resume_emitted_chars chars of their text (stop strings match across them).
    resume_tokens: int = 0
    resume_emitted_chars: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    def validate(self):
        """Checks every field, normalising numbers to plain floats: a value the sampler cannot
        take (a huge int, a Decimal) would otherwise fail inside a step, for every request."""
        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        for name in ("temperature", "top_p"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ValueError(f"{name} must be a number, got {v!r}")
            try:
                v = float(v)
            except OverflowError:
                raise ValueError(f"{name} is out of range: {v!r}") from None
            setattr(self, name, v)
        if not (0 <= self.temperature < float("inf")):  # also rejects NaN
            raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)
                                      or not 0 <= self.seed < 2**64):
            raise ValueError(f"seed must be an integer in [0, 2**64) or None, got {self.seed!r}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        for name in ("stop", "stop_token_ids"):
            if not isinstance(getattr(self, name), (list, tuple)):
                raise ValueError(f"{name} must be a list, got {getattr(self, name)!r}")
        if any(not isinstance(s, str) or s == "" for s in self.stop):
            raise ValueError(f"stop must be a list of non-empty strings, got {self.stop!r}")
        if any(not isinstance(t, int) or isinstance(t, bool) or t < 0 for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must be non-negative integers, got {self.stop_token_ids!r}")
        for name in ("resume_tokens", "resume_emitted_chars"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {v!r}")
        return self
