"""FCFS scheduler: who runs this step, and how many of their tokens.

Every step each running request that has finished its prompt decodes one
token; requests still in their prompt get chunks of what is left of the token
budget (chunked prefill); then waiting requests are admitted in arrival order
while the running cap, the token budget and the cache pool allow. A request
that does not fit blocks those behind it (strict FCFS: no starvation of long
prompts).
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from dsla_model.engine.seq_cache import SeqCache


@dataclass
class WorkItem:
    req: object
    start: int  # first position fed this step
    n: int  # tokens fed this step

    @property
    def samples(self) -> bool:
        """Whether this step's last token produces the next token."""
        return self.start + self.n == len(self.req.tokens)


class Scheduler:
    def __init__(self, config, pool):
        self.config = config
        self.pool = pool
        self.waiting: deque = deque()
        self.running: list = []

    def add(self, req):
        self.waiting.append(req)

    def remove(self, req):
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)

    def fits(self, req) -> bool:
        c = req.conf
        return self.pool.can_allocate(len(c.attn_layers), len(c.dsla_layers), req.max_len)

    def admits_next(self) -> bool:
        """Whether the next schedule() would admit a waiting request."""
        return (bool(self.waiting) and len(self.running) < self.config.max_running
                and self.config.max_batched_tokens > len(self.running) and self.fits(self.waiting[0]))

    def schedule(self) -> list[WorkItem]:
        budget = self.config.max_batched_tokens
        items = []
        for r in self.running:
            if not r.in_prefill:
                items.append(WorkItem(r, r.num_computed, len(r.tokens) - r.num_computed))
                budget -= items[-1].n
        for r in self.running:
            if r.in_prefill and budget > 0:
                n = min(len(r.tokens) - r.num_computed, budget)
                items.append(WorkItem(r, r.num_computed, n))
                budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.config.max_running:
            r = self.waiting[0]
            if not self.fits(r):
                break
            r.cache = SeqCache(self.pool, r.conf, r.max_len)  # if it raises, r waits on, holding nothing
            self.waiting.popleft()
            self.running.append(r)
            n = min(len(r.tokens), budget)
            items.append(WorkItem(r, 0, n))
            budget -= n
        return items
