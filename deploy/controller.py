"""The conversion controller: one Serve deployment (a single replica) for the application.

Replicas report their engine load (see replica.py); every poll interval the
controller aggregates the fresh reports, asks the pure policy (policy.py) for the
number of DSLA layers, and answers later reports with the first that many layers
of the store's order. It also owns the distill workers: it starts them, polls
their progress into metrics and restarts any that died. Being a Serve deployment,
Serve restarts the controller itself if it dies; the new one leaves the replicas'
layers alone until it has heard them all, then adopts the most layers any serves, so
a restart does not revert a loaded fleet.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, deque

import ray
from ray import serve

from deploy.config import AppConfig
from deploy.distill import DistillPool
from deploy.metrics import ControllerMetrics
from deploy.policy import Load, PolicyState, aggregate, decide, max_layers

log = logging.getLogger("ray.serve")
DISTILL_POLL_S = 2.0


def load_of(stats: dict) -> Load:
    return Load(queue=stats.get("waiting", 0), waiting_tokens=stats.get("waiting_prompt_tokens", 0),
                cache_usage=stats.get("cache_usage", 0.0), tpot_s=stats.get("recent_tpot_s"),
                running=stats.get("running", 0))


@serve.deployment(name="ConversionController", num_replicas=1, max_ongoing_requests=1000)
class ConversionController:
    async def __init__(self, config: dict, num_layers: int):
        self.cfg = cfg = AppConfig.model_validate(config)
        self.policy = cfg.controller.policy
        self.num_layers = num_layers  # from the app builder: no model code in this process
        self.store_path = cfg.store_path()
        self.store = None
        if self.store_path:
            from dsla_model.layer_store import LayerStore

            self.store = LayerStore(self.store_path)
        self.published: list[int] = []
        self.store_version = 0
        self.state = PolicyState(layers=cfg.controller.initial_layers)
        self.adopted = False
        self.first_report_t: float | None = None  # when this controller first heard a replica
        self.reports: dict[str, tuple[float, dict]] = {}
        self.last_decision: dict | None = None
        self.history: deque = deque(maxlen=100)  # decisions that changed the target
        self.counts: Counter = Counter()
        self.metrics = ControllerMetrics(self.num_layers)
        self.actor_name = ray.get_runtime_context().get_actor_name()
        self.distill = DistillPool(cfg, self.store_path, self.metrics)
        self._refresh_store()
        self.distill.start(serve.get_replica_context().app_name)
        loop = asyncio.get_running_loop()
        self._task = loop.create_task(self._loop())
        # apart: a worker that does not answer (loading, or not schedulable) holds a poll for its
        # whole status timeout, which must not hold the conversion decisions with it
        self._distill_task = loop.create_task(self._distill_loop())

    # -- called by replicas and the ingress --------------------------------
    async def report(self, replica_id: str, stats: dict) -> dict:
        now = time.monotonic()
        self.reports[replica_id] = (now, stats)
        if self.first_report_t is None:
            self.first_report_t = now
        if not self.adopted:  # not heard the fleet yet (see _maybe_adopt): each replica keeps its layers
            return {"dsla_layers": list(stats.get("dsla_layers", []))}
        return {"dsla_layers": self.target_layers()}

    def _maybe_adopt(self, now: float):
        """A (re)started controller continues from what the fleet serves, once every live replica
        has had time to speak (counted from the first report: Serve may route to a new controller
        well after it started): the most layers any of them serves. Taking the first report instead
        let a replica that had just started (with the initial layers) revert a loaded fleet; the wait
        is as long as a live replica may stay silent (report_timeout_s), since a busy one reports late."""
        ctl = self.cfg.controller
        if (self.adopted or not self.reports or self.first_report_t is None
                or now - self.first_report_t < max(2 * ctl.poll_interval_s, ctl.report_timeout_s)):
            return
        self.adopted = True
        layers = max(len(s.get("dsla_layers", [])) for _, s in self.reports.values())
        self.state = PolicyState(layers=layers, last_change_t=now)

    def target_layers(self) -> list[int]:
        return self.published[:self.state.layers]

    async def snapshot(self) -> dict:
        now = time.monotonic()
        replicas = {}
        for rid, (t, s) in sorted(self.reports.items()):
            replicas[rid] = {
                "dsla_layers": s.get("dsla_layers", []), "store_version": s.get("store_version"),
                "loaded_store_version": s.get("loaded_store_version"), "queue": s.get("waiting", 0),
                "waiting_prompt_tokens": s.get("waiting_prompt_tokens", 0), "running": s.get("running", 0),
                "cache_usage": s.get("cache_usage", 0.0), "capacity_4k": s.get("capacity_4k"),
                "swaps": s.get("swaps", 0), "generated_tokens": s.get("generated_tokens", 0),
                "ttft_s": s.get("ttft_s"), "tpot_s": s.get("tpot_s"), "recent_tpot_s": s.get("recent_tpot_s"),
                "actor_name": s.get("actor_name"),
                "layer_errors": s.get("layer_errors", {}), "report_age_s": round(now - t, 3)}
        target = self.target_layers()
        return {
            "num_layers": self.num_layers,
            "controller": {
                "actor_name": self.actor_name, "enabled": self.cfg.controller.enabled, "target_layers": len(target), "target_dsla_layers": target,
                "target_ratio": len(target) / max(1, self.num_layers),
                "max_layers": max_layers(self.policy, self.num_layers, self.available_layers()),
                "last_decision": self.last_decision, "decisions": dict(self.counts),
                "history": list(self.history)[-20:]},
            "store": {"path": self.store_path, "version": self.store_version, "published_layers": self.published},
            "replicas": replicas,
            "distill": await self.distill.snapshot(),
        }

    # -- the decision loop -------------------------------------------------
    def _refresh_store(self):
        if self.store is None or not self.store.exists():
            return
        from dsla_model.layer_store import LayerStoreError

        try:  # read every tick (a small file): a store wiped and distilled again may repeat a version
            manifest = self.store.read_manifest()
            self.published = self.store.published_layers(manifest)
            self.store_version = int(manifest["version"])
        except (LayerStoreError, OSError) as e:
            log.warning("layer store unreadable for now: %s", e)

    def tick(self, now: float):
        timeout = self.cfg.controller.report_timeout_s
        self.reports = {r: (t, s) for r, (t, s) in self.reports.items() if now - t <= timeout}
        self._maybe_adopt(now)
        self._refresh_store()
        loads = [load_of(s) for _, s in self.reports.values()]
        load = aggregate(loads)
        self.metrics.load(load.queue, len(loads), len(self.published))
        if not self.cfg.controller.enabled or not loads or not self.adopted:
            return  # before adoption the replicas keep their layers: a decision would be a phantom
        d = decide(self.policy, self.state, load, now, self.num_layers, self.available_layers())
        self.state = d.state
        self.last_decision = {"action": d.action, "layers": d.layers, "reason": d.reason, "queue": load.queue,
                              "waiting_tokens": load.waiting_tokens, "cache_usage": round(load.cache_usage, 4),
                              "tpot_s": load.tpot_s, "time": time.time()}
        self.metrics.decision(d.action, d.layers)
        if d.changed:
            self.counts[d.action] += 1
            self.history.append(self.last_decision)
            log.info("conversion %s to %d layers: %s", d.action, d.layers, d.reason)

    def available_layers(self) -> int:
        """Length of the store's order that every replica has loaded: a replica cannot
        convert a layer it does not hold (not yet read, or refused as corrupt)."""
        n = len(self.published)
        for _, s in self.reports.values():
            loaded = set(s.get("loaded_layers", self.published))
            n = min(n, next((i for i, layer in enumerate(self.published) if layer not in loaded), n))
        return n

    async def _loop(self):
        while True:
            try:
                self.tick(time.monotonic())
            except Exception:  # noqa: BLE001 - one bad tick must not end the loop
                log.exception("controller tick failed")
            await asyncio.sleep(self.cfg.controller.poll_interval_s)

    async def _distill_loop(self):
        while True:
            try:
                await self.distill.poll()
            except Exception:  # noqa: BLE001
                log.exception("distill poll failed")
            await asyncio.sleep(DISTILL_POLL_S)

    def __del__(self):
        pool = getattr(self, "distill", None)
        if pool is not None:
            pool.stop()
