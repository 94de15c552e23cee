"""The distill workers the application runs next to serving (engineer C's DistillWorker).

The controller owns them: it starts `distill.num_workers` actors on the configured
resources, polls `status()` into metrics, and replaces any worker that died (a
killed actor is not restarted by Ray when killed on purpose). A replacement
resumes after the last layer published in the store, so a death costs at most
the layer in progress; published layers are files in the store and never depend
on a worker being alive.
"""
from __future__ import annotations

import asyncio
import logging
import time

import ray

from deploy.config import AppConfig
from deploy.resilience import describe

log = logging.getLogger("ray.serve")
STATUS_TIMEOUT_S = 10.0
# A worker that failed (its run raised, or its actor died) is restarted at once, then, if it keeps
# failing, after RETRY_MIN_S doubled per failure in a row up to RETRY_MAX_S: a transient error
# (a store on a flaky shared filesystem, an out-of-memory) does not end distillation, and a
# permanent one (a worker_kwargs value its constructor refuses) does not reload the model every poll.
RETRY_MIN_S, RETRY_MAX_S = 5.0, 600.0
NAMESPACE = "dsla-serve"  # distill workers are named actors here


class DistillPool:
    def __init__(self, cfg: AppConfig, store_path, metrics):
        self.cfg, self.store_path, self.metrics = cfg, store_path, metrics
        self.workers: dict[str, object] = {}
        self.status: dict[str, dict] = {}
        self.restarts = 0
        self._failures: dict[str, int] = {}  # failures in a row, per worker
        self._published_at_failure: dict[str, int] = {}  # layers it had published when it last failed
        self._retry_at: dict[str, float] = {}

    def _may_retry(self, name: str) -> bool:
        """True when a failed worker's backoff is over; the first call after a failure starts it."""
        now = time.monotonic()
        if name not in self._retry_at:
            n = self._failures[name] = self._failures.get(name, 0) + 1
            self._retry_at[name] = now + (0.0 if n == 1 else min(RETRY_MAX_S, RETRY_MIN_S * 2 ** (n - 2)))
        if now < self._retry_at[name]:
            return False
        del self._retry_at[name]
        return True

    def _new_worker(self, name: str):
        from distill_workers.worker import DistillWorker

        d = self.cfg.distill
        # named, so operators (and tests) can find a worker: ray.get_actor(name, namespace=NAMESPACE)
        handle = DistillWorker.options(name=name, namespace=NAMESPACE, num_cpus=d.num_cpus,
                                       num_gpus=d.num_gpus).remote(
            model=self.cfg.model, store=self.store_path, **d.worker_kwargs)
        handle.start.remote()  # idempotent; the worker also starts itself
        return handle

    def start(self, app_name: str = "app"):
        if self.cfg.distill.num_workers and not self.store_path:
            log.error("distill.num_workers is set but there is no layer store to publish into: not started")
            return
        for i in range(self.cfg.distill.num_workers):
            name = f"dsla-distill-{app_name}-{i}"
            self.workers[name] = self._start_named(name)

    def _start_named(self, name: str):
        """A new worker, or None while the name is still taken: a restarted controller can come up
        before Ray has released the name of the worker its predecessor owned. poll() tries again."""
        try:
            return self._new_worker(name)
        except ValueError as e:
            log.warning("cannot start %s yet: %s", name, e)
            self.status[name] = {"state": "starting", "error": str(e)}
            return None

    async def poll(self):
        for name, handle in list(self.workers.items()):
            if handle is None:
                self.workers[name] = self._start_named(name)
                continue
            try:
                st = await asyncio.wait_for(handle.status.remote(), STATUS_TIMEOUT_S)
            except (asyncio.TimeoutError, ray.exceptions.ActorUnavailableError):
                continue  # busy, or being restarted by Ray itself (max_restarts): not dead
            except ray.exceptions.RayActorError as e:  # dead for good (e.g. ray.kill): replace it
                self.status[name] = {"state": "restarting", "error": describe(e),
                                     "failures_in_a_row": self._failures.get(name, 0) + (name not in self._retry_at)}
                if not self._may_retry(name):
                    continue
                log.warning("distill worker %s died (%s); starting a new one", name, describe(e))
                try:
                    self.workers[name] = self._new_worker(name)
                except ValueError as e2:  # the dead one's name is not released yet: next poll
                    log.warning("cannot restart %s yet: %s", name, e2)
                    continue
                self.restarts += 1
                self.metrics.distill_restarts.inc(1)
                continue
            except Exception as e:  # noqa: BLE001 - a failing status() is reported, not fatal
                self.status[name] = {"state": "error", "error": describe(e)}
                continue
            self.status[name] = st if isinstance(st, dict) else {"status": st}
            self.metrics.distill(name, self.status[name])
            published = len(self.status[name].get("published") or [])
            if self.status[name].get("state") == "error":  # its run raised; the actor is fine
                self._published_at_failure.setdefault(name, published)
                if self._may_retry(name):
                    log.warning("distill worker %s failed (%s); starting it again", name,
                                (self.status[name].get("error") or "").strip().splitlines()[-1:])
                    handle.start.remote()
                    self.restarts += 1
                    self.metrics.distill_restarts.inc(1)
            elif (self.status[name].get("state") == "done"
                  or published > self._published_at_failure.get(name, published)):
                # progress since the last failure: the next one starts from RETRY_MIN_S. Merely running
                # is none: a run that fails seconds after each start was restarted at once, forever.
                self._failures.pop(name, None)
                self._published_at_failure.pop(name, None)

    async def snapshot(self) -> dict:
        return {"workers": dict(self.status), "restarts": self.restarts, "namespace": NAMESPACE}

    def stop(self):
        for handle in filter(None, self.workers.values()):
            try:
                ray.kill(handle)
            except Exception:  # noqa: BLE001 - already gone
                pass
        self.workers.clear()
