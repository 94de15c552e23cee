"""OpenAI response bodies and stream chunks, built from the engine's token events.

Events reach the ingress as plain dicts with the TokenEvent fields (text is the
incremental delta with stop strings already honoured by the engine).
"""
from __future__ import annotations

import itertools
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Optional

from deploy.request_plan import Plan
from deploy.token_bytes import TokenBytes


@dataclass
class ChoiceState:
    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish_reason: Optional[str] = None
    generated: int = 0
    started: bool = False  # chat streams announce the role once
    streamed_logprobs: int = 0  # tokens whose logprobs a chunk has carried
    streamed_chars: int = 0  # their token strings' length: where the next chunk's text_offset starts


def usage_body(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def sse(data) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


class ResponseBuilder:
    def __init__(self, plan: Plan, model_name: str, tok):
        self.plan, self.model, self.tok = plan, model_name, tok
        self.chat = plan.kind == "chat"
        self.id = ("chatcmpl-" if self.chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.choices = {job.index: ChoiceState() for job in plan.jobs}
        self.prompt_len = {job.index: len(job.prompt_ids) for job in plan.jobs}
        self.want_logprobs = {job.index: job.params.get("logprobs", False) for job in plan.jobs}
        self.token_bytes = TokenBytes(tok) if self.chat else None

    # -- accumulation ------------------------------------------------------
    def add(self, index: int, ev: dict) -> list[dict]:
        """Record one event; return the stream chunks it produces (maybe none)."""
        c = self.choices[index]
        chunks = []
        if self.chat and not c.started:
            c.started = True
            chunks.append(self._chunk(index, {"role": "assistant", "content": ""}, None, None))
        if ev.get("token_id") is not None and ev.get("num_generated_tokens", 0) > c.generated:
            c.token_ids.append(ev["token_id"])
            c.logprobs.append(ev.get("logprob"))
        c.generated = max(c.generated, ev.get("num_generated_tokens", 0))
        delta = ev.get("text") or ""
        c.text.append(delta)
        fr = ev.get("finish_reason")
        if fr is not None:
            c.finish_reason = fr
        if delta or fr is not None:
            lp = self._pending_logprobs(index)
            body = {"content": delta} if self.chat and delta else ({} if self.chat else delta)
            chunks.append(self._chunk(index, body, fr, lp))
        return chunks

    def _pending_logprobs(self, index: int) -> Optional[dict]:
        """Logprobs of the tokens no chunk has carried yet: a token whose text is held back
        (a possible stop-string prefix, part of a character) makes no chunk of its own."""
        c = self.choices[index]
        start, c.streamed_logprobs = c.streamed_logprobs, len(c.token_ids)
        if start == len(c.token_ids):
            return None
        lp = self._logprobs(index, c.token_ids[start:], c.logprobs[start:], c.streamed_chars)
        if lp is not None and not self.chat:
            c.streamed_chars += sum(map(len, lp["tokens"]))
        return lp

    def done(self) -> bool:
        return all(c.finish_reason is not None for c in self.choices.values())

    def usage(self) -> dict:
        return usage_body(self.plan.prompt_tokens, sum(c.generated for c in self.choices.values()))

    # -- bodies ------------------------------------------------------------
    def _logprobs(self, index: int, ids: list[int], lps: list, offset: int = 0) -> Optional[dict]:
        """offset: the characters of the completion's earlier tokens (a stream's later chunks)."""
        if not self.want_logprobs[index]:
            return None
        toks = [self.tok.decode([t]) for t in ids]
        if self.chat:
            return {"content": [{"token": t, "logprob": lp, "bytes": b, "top_logprobs": []}
                                for t, lp, b in zip(toks, lps, self.token_bytes(ids))]}
        # legacy completions: with logprobs=0 (the one value served) each step's top_logprobs holds
        # the sampled token alone, as vLLM answers; text_offset is where each token's string starts
        return {"tokens": toks, "token_logprobs": list(lps), "top_logprobs": [{t: lp} for t, lp in zip(toks, lps)],
                "text_offset": list(itertools.accumulate(map(len, toks[:-1]), initial=offset))}

    def _chunk(self, index: int, delta, finish_reason, logprobs) -> dict:
        if self.chat:
            choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
            obj = "chat.completion.chunk"
        else:
            choice = {"index": index, "text": delta, "logprobs": logprobs, "finish_reason": finish_reason}
            obj = "text_completion"
        chunk = {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": [choice]}
        if self.plan.continuous_usage:  # the choice's own counts so far, as vLLM reports them
            chunk["usage"] = usage_body(self.prompt_len[index], self.choices[index].generated)
        return chunk

    def usage_chunk(self) -> dict:
        return {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": [], "usage": self.usage()}

    def final(self) -> dict:
        choices = []
        for index in sorted(self.choices):
            c = self.choices[index]
            text = "".join(c.text)
            lp = self._logprobs(index, c.token_ids, c.logprobs)
            if self.chat:
                choices.append({"index": index, "message": {"role": "assistant", "content": text},
                                "logprobs": lp, "finish_reason": c.finish_reason})
            else:
                choices.append({"index": index, "text": text, "logprobs": lp, "finish_reason": c.finish_reason})
        return {"id": self.id, "object": "chat.completion" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": choices, "usage": self.usage()}
