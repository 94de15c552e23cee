"""What the engine emits: one event per generated token (and one per abort)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TokenEvent:
    request_id: str
    token_id: int  # -1 on an abort event (no token was generated)
    text: str  # detokenized text delta; never contains a stop string
    logprob: float | None
    finish_reason: str | None  # "stop" | "length" | "abort" | None (more to come)
    num_prompt_tokens: int
    num_generated_tokens: int

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
