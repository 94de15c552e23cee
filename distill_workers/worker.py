"""`DistillWorker`: a Ray actor distilling layers one after another into a layer store.

The trainer runs in a thread of the actor so that `status()` answers while a layer trains.
The actor starts distilling in its constructor: when Ray restarts it (`max_restarts`) after
a crash or a kill, nobody calls `start()` again, and the new instance simply resumes after
the last layer published in the store. A layer killed mid-training is never half-published
(publishing is one atomic rename), so a restart costs at most that layer's work.
"""
from __future__ import annotations

import os
import threading
import time
import traceback

import ray

from distill_workers.runner import build_distiller

DEFAULT_MAX_RESTARTS = 3


class DistillWorkerImpl:
    """The actor's body, usable without Ray (tests, the CLI without --ray)."""

    def __init__(self, model: str = "default", store: str | None = None, autostart: bool = True,
                 threads: int | None = None, **kwargs):
        if store is None:
            raise ValueError("DistillWorker needs a layer store path (store=...)")
        if threads:
            import torch

            torch.set_num_threads(threads)
        self.started_at = time.time()
        self.distiller = build_distiller(model, store, **kwargs)
        self.error: str | None = None
        self._thread: threading.Thread | None = None
        if autostart:
            self.start()

    def _run(self):
        try:
            self.distiller.run()
        except Exception:  # noqa: BLE001 - reported through status(), the actor stays up
            self.error = traceback.format_exc(limit=5)
            self.distiller.status["state"] = "error"

    def start(self) -> bool:
        """Start (or keep) the background distillation; idempotent."""
        if self._thread is not None and self._thread.is_alive() and self.distiller._stop:
            self._thread.join()  # a stop still winding down (its join timed out): let it end, then start again
        if self._thread is None or not self._thread.is_alive():
            self.error = None  # a retry after a failure: the old traceback is not this run's
            self.distiller.resume()  # before the thread starts, so an early stop() is not lost
            self.distiller.status["state"] = "starting"
            self._thread = threading.Thread(target=self._run, name="distill", daemon=True)
            self._thread.start()
        return True

    def status(self) -> dict:
        s = dict(self.distiller.status)
        s.update(pid=os.getpid(), error=self.error, uptime_s=round(time.time() - self.started_at, 1),
                 remaining=self.distiller.todo())
        return s

    def stop(self, timeout: float = 60.0) -> dict:
        """Stop after the current step (the layer in progress is dropped, not published)."""
        self.distiller.stop()
        if self._thread is not None:
            self._thread.join(timeout)
        return self.status()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the distillation ends (True) or `timeout` passes (False)."""
        if self._thread is not None:
            self._thread.join(timeout)
            return not self._thread.is_alive()
        return True


# max_concurrency > 1 so that status() is served while wait() blocks
DistillWorker = ray.remote(max_restarts=DEFAULT_MAX_RESTARTS, max_concurrency=4)(DistillWorkerImpl)
