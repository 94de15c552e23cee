"""AsyncEngine: an Engine driven by one background thread, for asyncio callers.

The thread owns the engine's steps; callers add, abort and reconfigure under a
lock that is held for one step at most, so every change lands between steps.
An asyncio caller never waits for that lock on its event loop (a step can take
a second on a CPU, and every stream of the loop would stall meanwhile): admission
waits on a worker thread, and an early exit queues its abort for the engine
thread. Events travel to each request's asyncio queue through its event loop
(`call_soon_threadsafe`). Leaving a `generate` iterator early (cancellation,
`break`, client gone) aborts the request. Every stream ends with a finish event:
if a step fails, each open stream gets an abort (after what the engine emitted
before the failure), and so does each one still open at shutdown; if aborting
fails as well, the engine stops and refuses new requests.
"""
from __future__ import annotations

import asyncio
import collections
import threading
import uuid
from typing import AsyncIterator

from dsla_model.engine.config import EngineConfig
from dsla_model.engine.engine import Engine
from dsla_model.engine.outputs import TokenEvent


class AsyncEngine:
    def __init__(self, hybrid, tokenizer, config: EngineConfig | None = None):
        self.engine = Engine(hybrid, tokenizer, config)
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._aborts: collections.deque = collections.deque()  # ids whose streams were left; any thread appends
        self._stop = False
        self.error: BaseException | None = None
        self._stats = self.engine.stats()  # as the last step (or swap) left them; written under the lock
        self._thread = threading.Thread(target=self._loop, name="dsla-engine", daemon=True)
        self._thread.start()

    def _loop(self):
        while True:
            with self._wake:
                while not self._stop and not self.engine.has_unfinished():
                    self._wake.wait()
                stop = self._stop
                try:
                    self._drain_aborts()
                    events = self._abort_all() if stop else self.engine.step()
                except BaseException as e:  # noqa: BLE001 - the thread must report, not die silently
                    self.error = e
                    events, stop = self._recover()
                if not stop:
                    self._stats = self.engine.stats()  # ~3 us
                streams = dict(self._streams)
            self._deliver(events, streams)
            if stop:
                return

    def _recover(self) -> tuple[list[TokenEvent], bool]:  # under the lock
        """After a failed step every open stream ends with an abort. If aborting fails too (a device
        that no longer answers), the engine stops: each stream gets an abort made here, and
        admissions are refused, rather than streams that wait for ever on a dead thread."""
        try:
            return self._abort_all(), self._stop
        except BaseException as e:  # noqa: BLE001
            self.error = e
            self._stop = True
            return [TokenEvent(rid, -1, "", None, "abort", 0, 0) for rid in list(self._streams)], True

    def _drain_aborts(self):  # under the lock
        while self._aborts:
            self.engine.abort(self._aborts.popleft())

    def _abort_all(self) -> list[TokenEvent]:
        """Abort events for every open stream: the engine's for its requests, and one made here for
        a stream whose request is gone (finished in a step whose events were lost)."""
        events = self.engine.abort_all()
        done = {ev.request_id for ev in events}
        # a snapshot: the event loop pops streams without the lock
        return events + [TokenEvent(rid, -1, "", None, "abort", 0, 0) for rid in list(self._streams) if rid not in done]

    @staticmethod
    def _deliver(events, streams):
        for ev in events:
            target = streams.get(ev.request_id)
            if target is not None:
                loop, q = target
                try:
                    loop.call_soon_threadsafe(q.put_nowait, ev)
                except RuntimeError:  # the caller's loop is closed
                    pass

    def _admit(self, request_id, prompt_ids, params, loop, q):
        generator = self.engine.resume_generator(prompt_ids, params)  # seconds for a long resume: not under the lock
        with self._wake:
            # aborts queued before this admission land first: one queued for an earlier request of
            # this id (left after it had finished) would otherwise abort this one
            self._drain_aborts()
            if self._stop:
                raise RuntimeError("engine is shut down" if self.error is None else f"engine failed: {self.error!r}")
            if request_id in self._streams:
                raise ValueError(f"request id {request_id!r} is already in use")
            self.engine.add_request(prompt_ids, params, request_id, generator)  # ValueError reaches the caller
            self._streams[request_id] = (loop, q)
            self._wake.notify()

    def _leave(self, request_id):
        """The stream is gone: no more events for it, and its request (if any) aborted between steps."""
        self._streams.pop(request_id, None)
        self._aborts.append(request_id)

    async def generate(self, prompt_ids, params, request_id: str | None = None) -> AsyncIterator[TokenEvent]:
        request_id = str(request_id) if request_id is not None else uuid.uuid4().hex
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        admission = loop.run_in_executor(None, self._admit, request_id, prompt_ids, params, loop, q)
        try:
            await asyncio.shield(admission)
        except asyncio.CancelledError:  # the thread may admit it still: leave once it has
            admission.add_done_callback(lambda f: f.cancelled() or f.exception() or self._leave(request_id))
            raise
        finished = False
        try:
            while True:
                ev = await q.get()
                if ev.finish_reason is not None:
                    finished = True
                yield ev
                if finished:
                    return
        finally:
            if finished:
                self._streams.pop(request_id, None)
            else:
                self._leave(request_id)

    def abort(self, request_id: str) -> None:
        with self._wake:
            self.engine.abort(request_id)
            self._wake.notify()

    def set_conversion(self, dsla_layers, store_version=None, layer_weights=None) -> None:
        with self._wake:
            self.engine.set_conversion(dsla_layers, store_version, layer_weights)
            self._stats = self.engine.stats()

    def stats(self) -> dict:
        """Never waits for a step: a prefill step holds the lock for seconds on a CPU, and a replica
        waiting for it reported its load too late for the controller (dropped as silent). While a
        step runs, the numbers as the step before it left them."""
        if self._lock.acquire(blocking=False):
            try:
                self._stats = self.engine.stats()
            finally:
                self._lock.release()
        return dict(self._stats)

    def capacity(self, seq_len: int) -> int:
        with self._lock:
            return self.engine.capacity(seq_len)

    def shutdown(self):
        with self._wake:
            self._stop = True
            self._wake.notify()
        self._thread.join(timeout=30)
