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

import ray

from deploy.config import AppConfig
from deploy.resilience import describe

log = logging.getLogger("ray.serve")
STATUS_TIMEOUT_S = 10.0
NAMESPACE = "dsla-serve"  # distill workers are named actors here


class DistillPool:
    def __init__(self, cfg: AppConfig, store_path, metrics):
        self.cfg, self.store_path, self.metrics = cfg, store_path, metrics
        self.workers: dict[str, object] = {}
        self.status: dict[str, dict] = {}
        self.restarts = 0

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
            self.workers[name] = self._new_worker(name)

    async def poll(self):
        for name, handle in list(self.workers.items()):
            try:
                st = await asyncio.wait_for(handle.status.remote(), STATUS_TIMEOUT_S)
            except (asyncio.TimeoutError, ray.exceptions.ActorUnavailableError):
                continue  # busy, or being restarted by Ray itself (max_restarts): not dead
            except ray.exceptions.RayActorError as e:  # dead for good (e.g. ray.kill): replace it
                log.warning("distill worker %s died (%s); starting a new one", name, describe(e))
                self.status[name] = {"state": "restarting", "error": describe(e)}
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

    async def snapshot(self) -> dict:
        return {"workers": dict(self.status), "restarts": self.restarts, "namespace": NAMESPACE}

    def stop(self):
        for handle in self.workers.values():
            try:
                ray.kill(handle)
            except Exception:  # noqa: BLE001 - already gone
                pass
        self.workers.clear()
