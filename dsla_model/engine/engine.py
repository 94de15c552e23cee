"""The synchronous engine: requests in, token events out, one `step()` at a time.

No threads here (AsyncEngine adds one). Between steps the caller may add or
abort requests and change the layer configuration; a configuration change
affects the requests added after it and those still waiting for admission (each
request is pinned to a `LayerConfig` once it has a cache). A step runs one forward
per configuration present in the batch, so a swap never mixes caches of different
layouts.

Pipelined decode (CUDA graphs only): when a step is decode only, one layer
configuration and greedy without logprobs, its tokens stay on the device and
the step returns without waiting for them. The next step, if the batch is
unchanged, replays the next graph at once ("chained": the graph wrote its own
next inputs) and only then reads the previous step's tokens and emits them, so
the host's work overlaps the running step instead of leaving the GPU idle. Any
other step first collects the step in flight, then runs as usual. Events come
one step late; a request that finishes on a token collected late has had one
more step computed, inside its own reserved cache, whose token is dropped.
"""
from __future__ import annotations

import copy
import itertools
import time
import uuid
from collections import deque

import torch

from dsla_model.engine.cache_pool import CachePool
from dsla_model.engine.config import (CPU_DEFAULT_CACHE_BYTES, GPU_CACHE_FRACTION, STATE_FORMATS, EngineConfig,
                                      served_max_len)
from dsla_model.engine.layer_config import LayerConfig
from dsla_model.engine.outputs import TokenEvent
from dsla_model.engine.request import Request
from dsla_model.engine.runner import ModelRunner, fold_reserve_bytes
from dsla_model.engine.sampler import sample, skip_draws
from dsla_model.engine.scheduler import Scheduler, WorkItem
from dsla_model.loading import eos_token_ids

_RECENT = 256  # requests in the ttft / tpot means


class Engine:
    def __init__(self, hybrid, tokenizer, config: EngineConfig | None = None):
        self.config = config = config or EngineConfig()
        config.validate()
        self.hybrid = hybrid
        self.tokenizer = tokenizer
        w = hybrid.model.lm_head.weight
        self.device = w.device
        mc = hybrid.config
        self.vocab_size = mc.vocab_size
        self.logits_width = w.shape[0]  # what one sampled draw spans (the sampler's rows)
        self.max_model_len = served_max_len(config, mc)
        self.pool = CachePool(hybrid.num_kv_heads, hybrid.head_dim, w.dtype, self.device,
                              self._cache_budget(config), config.block_size, STATE_FORMATS[config.state_dtype])
        self.runner = ModelRunner(hybrid, self.pool, self.max_model_len)
        self.graphs = None
        if self.device.type == "cuda" and config.use_cuda_graphs:
            from dsla_model.engine.cuda_graphs import DecodeGraphs

            self.graphs = DecodeGraphs(self.runner, config.max_running, self.max_model_len)
        self.scheduler = Scheduler(config, self.pool)
        self._conf_ids = itertools.count()
        self.conf = LayerConfig.snapshot(hybrid, next(self._conf_ids))
        self.requests: dict[str, Request] = {}
        self._events: list[TokenEvent] = []  # abort events, emitted by the next step
        self._inflight = None  # (group, tokens getter) of a launched step whose tokens are not read yet
        self._computing: list = []  # the requests of the step's forward now running (see step)
        # an engine without a tokenizer works on ids alone: it stops at stop_token_ids only
        self.eos_ids = eos_token_ids(tokenizer, hybrid.model) if tokenizer is not None else []
        self._ttft, self._tpot = deque(maxlen=_RECENT), deque(maxlen=_RECENT)
        self.generated_tokens = 0
        self.swaps = 0
        self.last_swap_s = 0.0

    def _cache_budget(self, config) -> int:
        if config.cache_memory_bytes is not None:
            return int(config.cache_memory_bytes)
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            return int(max(0, free - fold_reserve_bytes(self.hybrid)) * GPU_CACHE_FRACTION)
        return CPU_DEFAULT_CACHE_BYTES

    # ---- requests ----------------------------------------------------------------------
    def resume_generator(self, prompt_ids, params) -> torch.Generator | None:
        """A resumed, seeded, sampled request's generator, past the draws its earlier attempt made
        (one logits-wide draw per token it sampled: ~1 ms each at a 49K vocabulary, so AsyncEngine
        builds it before taking the engine's lock; inside a step it held up every stream). None for
        any other request, and for parameters add_request will refuse."""
        try:
            return self._resume_generator(copy.deepcopy(params).validate(), len(prompt_ids))
        except (ValueError, TypeError):
            return None

    def _resume_generator(self, params, num_prompt: int) -> torch.Generator | None:
        """resume_generator for validated params."""
        if params.greedy or params.seed is None or not 0 < params.resume_tokens < num_prompt:
            return None
        g = torch.Generator(device="cpu").manual_seed(params.seed)
        skip_draws(g, self.logits_width, params.resume_tokens)
        return g

    def add_request(self, prompt_ids, params, request_id: str | None = None,
                    generator: torch.Generator | None = None) -> str:
        """generator: resume_generator's for these prompt_ids and params, built ahead (else built here)."""
        params = copy.deepcopy(params).validate()  # what is checked is what the request keeps
        prompt_ids = list(prompt_ids) if prompt_ids is not None else []
        if not prompt_ids:
            raise ValueError("prompt must contain at least one token")
        if params.resume_tokens >= len(prompt_ids):
            raise ValueError(f"resume_tokens ({params.resume_tokens}) must be less than the prompt's "
                             f"{len(prompt_ids)} tokens")
        if any(not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < self.vocab_size for t in prompt_ids):
            raise ValueError(f"prompt token ids must be integers in [0, {self.vocab_size})")
        total = len(prompt_ids) + params.max_tokens
        if total > self.max_model_len:
            raise ValueError(f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) = {total} "
                             f"exceeds max_model_len {self.max_model_len}")
        c = self.conf
        if not self.pool.ever_fits(len(c.attn_layers), len(c.dsla_layers), total):
            raise ValueError(f"a sequence of {total} tokens does not fit the cache budget "
                             f"({self.pool.budget_bytes} bytes) under the current conversion")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need an engine with a tokenizer")
        request_id = str(request_id) if request_id is not None else uuid.uuid4().hex
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        if any(e.request_id == request_id and e.finish_reason != "abort" for e in self._events):
            # a request that finished inside generate(): its tokens and finish wait for the next step()
            raise ValueError(f"request id {request_id!r} is still in use: its last events are not delivered yet")
        if generator is None:  # after every check: a refused request skips no draws
            generator = self._resume_generator(params, len(prompt_ids))
        req = Request(request_id, prompt_ids, params, c, self.tokenizer, self.eos_ids, generator)
        # an abort event of an earlier request with this id, not emitted yet, would read as this one's
        self._events = [e for e in self._events if e.request_id != request_id]
        self.requests[request_id] = req
        self.scheduler.add(req)
        return request_id

    def abort(self, request_id: str) -> None:
        req = self.requests.get(str(request_id))  # ids are stored as strings (add_request)
        if req is not None:
            self._finish(req, "abort")
            self._events.append(TokenEvent(req.id, -1, "", None, "abort",
                                           req.num_prompt, req.num_generated))

    def abort_all(self) -> list[TokenEvent]:
        """Abort every request and forget the step in flight (its tokens are not read); returns the
        abort events now instead of with the next step. For callers that stop, or that recover from
        a step that raised (stepping again could raise again)."""
        for rid in list(self.requests):
            self.abort(rid)
        self._inflight = None
        events, self._events = self._events, []
        return events

    def has_unfinished(self) -> bool:
        return bool(self.requests) or bool(self._events) or self._inflight is not None

    def _finish(self, req, reason):
        req.finish_reason = reason
        self.scheduler.remove(req)
        if req.cache is not None:
            req.cache.free()
            req.cache = None
        self.requests.pop(req.id, None)
        if (self.graphs is not None and req.conf is not self.conf
                and not any(r.conf is req.conf for r in self.requests.values())):
            try:
                self.graphs.drop(req.conf.id)  # the last request of a swapped-out configuration
            except Exception:  # noqa: BLE001 - a device that has failed (drop synchronizes): the request is
                pass  # finished either way, and aborting the others must go on; the graphs stay with the engine
        if reason != "abort" and req.first_token_at is not None:
            self._ttft.append(req.first_token_at - req.arrival)
            if req.num_generated > 1:
                self._tpot.append((req.last_token_at - req.first_token_at) / (req.num_generated - 1))

    # ---- the step ----------------------------------------------------------------------
    @torch.no_grad()
    def step(self) -> list[TokenEvent]:
        """One step's token events (and the abort events queued since the last). A step that raises
        aborts the requests it was computing: a DSLA layer updates its states in place, so a request
        whose forward stopped part way holds some of its tokens in some layers, and computing them
        again would count them twice. Their abort events, and every event not handed out yet, come
        with the next step (or abort_all)."""
        events, self._events = self._events, []
        self._computing = []
        try:
            self._step(events)
        except BaseException:
            try:
                self._fail()
            except BaseException:  # noqa: BLE001 - the step's own error is the one to report (abort_all meets this again)
                pass
            finally:
                self._events = events + self._events
            raise
        self._computing = []
        return events

    def _fail(self):
        for req in self._computing:
            if req.finish_reason is None:
                self.abort(req.id)
        self._computing = []
        if self._inflight is not None and all(it.req.finish_reason is not None for it in self._inflight[0]):
            self._inflight = None

    def _step(self, events: list):
        if self._inflight is not None:
            self._computing = [it.req for it in self._inflight[0]]
            if self._can_chain():
                events += self._chain()
                return
            events += self._collect(self._inflight)
            self._inflight = None
            self._computing = []  # collected whole: a failure from here on is not theirs
        items = self.scheduler.schedule()
        groups: dict[int, list] = {}
        for it in items:
            groups.setdefault(it.req.conf.id, []).append(it)
        for group in groups.values():
            self._computing = [it.req for it in group]
            conf = group[0].req.conf
            want = [i for i, it in enumerate(group) if it.samples]
            if self.graphs is not None and all(it.n == 1 for it in group) and not self.runner.needs_long_table(group):
                # every row must be a token that samples: a prompt chunk of one token that does not
                # would have the graph's greedy guess emitted and fed back as its next prompt token
                if len(groups) == 1 and self._greedy_only(group) and all(it.samples for it in group):
                    self._launch(conf, group, chained=False)  # its tokens come with the next step
                    continue
                logits = self.graphs.run(conf, group)[0]
            else:
                logits = self.runner.forward_pieces(conf, group, want)  # runs even if nothing samples: it fills the cache
            for it in group:
                it.req.num_computed += it.n
            if not want:
                continue
            reqs = [group[i].req for i in want]
            if logits.shape[0] != len(want):  # the graph path returns every row
                logits = logits[torch.tensor(want, device=logits.device)]
            tokens, logprobs = sample(logits, reqs)
            now = time.perf_counter()
            for req, tok, lp in zip(reqs, tokens, logprobs):
                events.append(self._emit(req, tok, lp, now))

    # ---- pipelined decode (see the module docstring) ----------------------------------
    @staticmethod
    def _greedy_only(group) -> bool:
        return all(it.req.params.greedy and not it.req.params.logprobs for it in group)

    def _launch(self, conf, group, chained):
        """Replay the decode graph for `group`; its tokens become the step in flight. Returns the
        step that was in flight before (or None)."""
        _, tokens = self.graphs.run(conf, group, chained)
        for it in group:
            it.req.num_computed += 1
        prev, self._inflight = self._inflight, (group, self.graphs.fetch(tokens))
        return prev

    def _can_chain(self) -> bool:
        """The step in flight can be followed without looking at its tokens: the scheduler would
        give the same decode batch (nobody aborted, admitted or due to finish by length)."""
        group = self._inflight[0]
        s = self.scheduler
        if len(s.running) != len(group) or s.admits_next():
            return False
        return all(r is it.req and r.num_generated + 1 < r.params.max_tokens for r, it in zip(s.running, group))

    def _chain(self) -> list[TokenEvent]:
        group = self._inflight[0]
        prev = self._launch(group[0].req.conf, [WorkItem(it.req, it.start + 1, 1) for it in group], chained=True)
        return self._collect(prev)

    def _collect(self, inflight) -> list[TokenEvent]:
        """Wait for a launched step's tokens and emit them (not for requests finished since)."""
        group, get = inflight
        tokens = get()
        now = time.perf_counter()
        return [self._emit(it.req, tok, None, now) for it, tok in zip(group, tokens) if it.req.finish_reason is None]

    def _emit(self, req, tok, logprob, now) -> TokenEvent:
        req.tokens.append(tok)
        self.generated_tokens += 1
        if req.first_token_at is None:
            req.first_token_at = now
        req.last_token_at = now
        finish = None
        if tok in req.stop_ids:
            # as in vLLM (without include_stop_str_in_output, which the API refuses): the stop token
            # ends the answer without its own text; what the detokenizer held back comes out
            text, _ = req.detok.flush()
            finish = "stop"
        else:
            text, hit = req.detok.add(tok)
            if hit:
                finish = "stop"
            elif req.num_generated >= req.params.max_tokens:
                rest, hit = req.detok.flush()  # the last token may complete a character, and a stop string
                text, finish = text + rest, "stop" if hit else "length"
        ev = TokenEvent(req.id, tok, text, logprob, finish, req.num_prompt, req.num_generated)
        if finish:
            self._finish(req, finish)
        return ev

    # ---- hot swap ----------------------------------------------------------------------
    def set_conversion(self, dsla_layers, store_version=None, layer_weights: dict | None = None) -> None:
        """Make `dsla_layers` the DSLA layers for requests added from now on, and for those
        still waiting (see `_repin_waiting`).

        A layer in `layer_weights` gets a new module with those weights; another
        converted layer keeps the DSLA module installed in the model (a fresh one if
        it has none). Running requests keep their pinned modules and caches.
        """
        t0 = time.perf_counter()
        wanted = sorted({int(i) for i in dsla_layers})
        bad = [i for i in wanted if not 0 <= i < self.hybrid.num_layers]
        if bad:
            raise ValueError(f"layers {bad} out of range 0..{self.hybrid.num_layers - 1}")
        # Every new module is built (and its weights checked) before any layer switches: a bad
        # one leaves the model as it was.
        modules = {i: self.hybrid.new_dsla_module(i, w) for i, w in (layer_weights or {}).items() if i in wanted}
        for i in range(self.hybrid.num_layers):
            if i in wanted:
                if i in modules:
                    self.hybrid.install(i, modules[i])
                self.hybrid.convert(i)
            else:
                self.hybrid.revert(i)
        new = LayerConfig.snapshot(self.hybrid, next(self._conf_ids), store_version)
        if new.same_modules(self.conf):
            self.conf.store_version = store_version if store_version is not None else self.conf.store_version
        else:
            before = {r.conf.id for r in self.requests.values()} | {self.conf.id}
            self.conf = new
            self.swaps += 1
            self._repin_waiting()
            if self.graphs is not None:  # configurations no request holds any more
                held = {r.conf.id for r in self.requests.values()}
                for cid in before - held:
                    self.graphs.drop(cid)
        self.last_swap_s = time.perf_counter() - t0

    def _repin_waiting(self):
        """Requests still waiting (no cache yet) take the new configuration: conversion is meant
        to make room for the queue, and a queue pinned to the old one would need the old cache
        (the controller converts because the queue is long). A request that could never fit the
        pool under the new one (a revert to longer KV) keeps its old configuration."""
        c = self.conf
        for r in self.scheduler.waiting:
            if r.cache is None and self.pool.ever_fits(len(c.attn_layers), len(c.dsla_layers), r.max_len):
                r.conf = c

    # ---- sizing and metrics ------------------------------------------------------------
    def capacity(self, seq_len: int) -> int:
        c = self.conf
        return self.pool.usable_blocks // self.pool.blocks_for(len(c.attn_layers), len(c.dsla_layers), seq_len)

    def stats(self) -> dict:
        s = self.scheduler
        waiting_tokens = sum(len(r.tokens) for r in s.waiting) + sum(
            len(r.prompt_ids) - r.num_computed for r in s.running if r.in_prefill)
        mean = lambda d: (sum(d) / len(d)) if d else None  # noqa: E731
        return {
            "waiting": len(s.waiting),
            "running": len(s.running),
            "waiting_prompt_tokens": waiting_tokens,
            "cache_used_bytes": self.pool.used_bytes,
            "cache_budget_bytes": self.pool.budget_bytes,
            "cache_usage": self.pool.used_bytes / max(1, self.pool.usable_blocks * self.pool.block_bytes),
            "dsla_layers": list(self.conf.dsla_layers),
            "store_version": self.conf.store_version,
            "swaps": self.swaps,
            "last_swap_s": self.last_swap_s,
            "generated_tokens": self.generated_tokens,
            "ttft_s": mean(self._ttft),
            "tpot_s": mean(self._tpot),
            "capacity_4k": self.capacity(4096),
            "max_model_len": self.max_model_len,
        }

    # ---- convenience -------------------------------------------------------------------
    def generate(self, prompts, params) -> list[list[int]]:
        """Run `prompts` to completion as one continuous batch; returns the generated ids."""
        plist = params if isinstance(params, list) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise ValueError("one SamplingParams per prompt, or a single one for all")
        ids = []
        try:
            for p, sp in zip(prompts, plist):
                ids.append(self.add_request(p, sp))
        except Exception:
            for rid in ids:  # all or nothing: a refused prompt leaves nothing behind
                self.abort(rid)
            self._events = [e for e in self._events if e.request_id not in ids]
            raise
        out = {i: [] for i in ids}
        others = []  # events of requests added by add_request: the next step() hands them out
        try:
            while any(i in self.requests for i in ids):
                for ev in self.step():
                    if ev.request_id not in out:
                        others.append(ev)
                    elif ev.token_id >= 0:
                        out[ev.request_id].append(ev.token_id)
        except BaseException:
            for rid in ids:  # as a refused prompt: nothing of this call is left behind
                self.abort(rid)
            self._events = others + [e for e in self._events if e.request_id not in out]
            raise
        self._events = others + self._events
        return [out[i] for i in ids]
