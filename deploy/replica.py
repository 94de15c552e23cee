"""The LLM replica: one AsyncEngine per replica, driven by the conversion controller.

Each replica runs a small control loop: it preloads newly published layers,
reports its engine's load to the controller and applies the layer configuration
the controller answers with. Pushing reports (instead of the controller calling
replicas) needs no way to address single Serve replicas, survives replicas
coming and going with autoscaling, and a silent replica simply ages out.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import deque

import ray
from ray import serve

from deploy.config import AppConfig
from deploy.layer_preload import PreloadedLayers
from deploy.metrics import ReplicaMetrics

log = logging.getLogger("ray.serve")
TPOT_WINDOW_S = 10.0


def _event(ev) -> dict:
    return {"token_id": ev.token_id if ev.token_id >= 0 else None, "text": ev.text, "logprob": ev.logprob,
            "finish_reason": ev.finish_reason, "num_prompt_tokens": ev.num_prompt_tokens,
            "num_generated_tokens": ev.num_generated_tokens}


def refresh_layers(layers: PreloadedLayers, hybrid) -> list[int]:
    """Preload what the store published since the last call, and build new DSLA modules with the
    store's settings: a replica that started before its store existed (a fresh --layers-dir with
    a distillation worker) built its model with the defaults, and the worker's layers would not
    fit them."""
    from dsla_model.layer_store import LayerStoreError

    loaded = layers.refresh()
    try:
        cfg = layers.dsla_config()
    except (LayerStoreError, OSError):  # mid-rewrite: the next poll reads it
        return loaded
    if cfg != hybrid.dsla_config:
        log.info("DSLA settings follow the layer store: %s", cfg)
        hybrid.dsla_config = cfg
    return loaded


@serve.deployment(name="LLMReplica")
class LLMReplica:
    async def __init__(self, config: dict, controller):
        from dsla_model.engine import AsyncEngine
        from dsla_model.hybrid import HybridModel
        from dsla_model.loading import load_model

        self.cfg = cfg = AppConfig.model_validate(config)
        self.controller = controller
        ctx = serve.get_replica_context()
        self.replica_id = ctx.replica_id.unique_id
        self.actor_name = ray.get_runtime_context().get_actor_name()
        model, tok, self.model_id = await asyncio.to_thread(load_model, cfg.model, cfg.model_dtype(), cfg.device())
        self.layers = PreloadedLayers(cfg.store_path())
        self.hybrid = HybridModel(model, self.layers.dsla_config())
        self.layers.fingerprint = self.hybrid.fingerprint
        await asyncio.to_thread(refresh_layers, self.layers, self.hybrid)
        self.engine = AsyncEngine(self.hybrid, tok, cfg.engine.engine_config())
        self.installed: dict[int, tuple] = {}  # layer -> (version, sha256) of its installed DSLA module
        self.metrics = ReplicaMetrics(self.replica_id, self.hybrid.num_layers)
        self.recent_tpot: deque = deque(maxlen=1024)  # (finish time, time per output token)
        if cfg.controller.initial_layers:
            await self._apply(self.layers.prefix[:cfg.controller.initial_layers])
        self._last_store_poll = time.monotonic()
        self._loop_task = asyncio.get_running_loop().create_task(self._control_loop())
        log.info("replica %s ready: %s, %d layers, store version %d, %d layers preloaded", self.replica_id,
                 self.model_id, self.hybrid.num_layers, self.layers.store_version, len(self.layers.order))

    # -- generation --------------------------------------------------------
    async def generate(self, prompt_ids: list[int], params: dict, request_id: str):
        """Batches of event dicts. Under load several events are waiting by the time
        the previous batch is sent; sending them together keeps the per-message cost
        of streaming through Ray from growing with the number of tokens."""
        from dsla_model.engine import SamplingParams

        try:
            sp = SamplingParams(**params).validate()
        except (TypeError, ValueError) as e:
            yield [{"error": {"status": 400, "message": str(e)}}]
            return
        queue: asyncio.Queue = asyncio.Queue()
        end = object()

        async def pump():
            try:
                async for ev in self.engine.generate(prompt_ids, sp, request_id):
                    queue.put_nowait(ev)
            except ValueError as e:  # refused at admission (too long for the cache, ...)
                queue.put_nowait(e)
            except Exception as e:  # noqa: BLE001 - reported to the caller below
                queue.put_nowait(e)
            finally:
                queue.put_nowait(end)

        t0 = time.monotonic()
        first_at = last_at = None
        task = asyncio.get_running_loop().create_task(pump())
        try:
            while True:
                items = [await queue.get()]
                while not queue.empty():
                    items.append(queue.get_nowait())
                batch, done = [], False
                for item in items:
                    if item is end:
                        done = True
                    elif isinstance(item, ValueError):
                        batch.append({"error": {"status": 400, "message": str(item)}})
                    elif isinstance(item, Exception):
                        raise item
                    else:
                        if item.token_id >= 0:
                            last_at = time.monotonic()
                            first_at = first_at or last_at
                        batch.append(_event(item))
                        if item.finish_reason is not None:
                            n = item.num_generated_tokens
                            tpot = (last_at - first_at) / (n - 1) if first_at and n > 1 else None
                            self.metrics.request_done(item.finish_reason, first_at and first_at - t0, tpot)
                            if tpot is not None:
                                self.recent_tpot.append((last_at, tpot))
                if batch:
                    yield batch
                if done:
                    return
        finally:
            task.cancel()  # leaving early (client gone) aborts the engine request

    # -- control -----------------------------------------------------------
    async def _control_loop(self):
        interval = self.cfg.controller.poll_interval_s
        while True:
            try:
                await self._control_once()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - the controller may be restarting: keep serving
                log.warning("control loop: %s: %s", type(e).__name__, e)
            await asyncio.sleep(interval)

    async def _control_once(self):
        now = time.monotonic()
        if now - self._last_store_poll >= self.cfg.store_poll_interval_s:
            self._last_store_poll = now
            await asyncio.to_thread(refresh_layers, self.layers, self.hybrid)
        stats = await self._stats()
        self.metrics.update(stats, self.layers.store_version)
        if not self.cfg.controller.enabled:  # initial_layers, with the store's current weights
            # before the report: a controller that does not answer must not hold them back
            self._start_apply(self.layers.prefix[:self.cfg.controller.initial_layers])
        # reported even with the controller disabled: the report is what /status shows of a replica
        resp = self.controller.report.remote(self.replica_id, self.report(stats))
        try:  # Serve queues a call to a controller with no live replica without a deadline
            target = await asyncio.wait_for(resp, self.cfg.controller.report_timeout_s)
        except asyncio.TimeoutError:
            if hasattr(resp, "cancel"):  # a Serve DeploymentResponse: drop the queued call too
                resp.cancel()
            raise
        if self.cfg.controller.enabled and target is not None:
            self._start_apply(target["dsla_layers"])

    def _start_apply(self, wanted: list[int]):
        """`_apply` in a task of its own: a swap waits for the engine's current step (seconds for a CPU
        prefill), and the control loop must go on reporting meanwhile (a replica silent for a swap was
        dropped from /status and from the controller's view). One swap at a time: a target that comes
        while one runs is taken at a later poll, as the controller repeats it."""
        task = getattr(self, "_apply_task", None)
        if task is not None and not task.done():
            return
        self._apply_task = asyncio.get_running_loop().create_task(self._apply(wanted))
        self._apply_task.add_done_callback(self._apply_done)

    def _apply_done(self, task):
        if not task.cancelled() and task.exception() is not None:
            e = task.exception()
            log.warning("replica %s: swap failed: %s: %s", self.replica_id, type(e).__name__, e)

    def recent_tpot_s(self):
        """Mean time per output token of requests finished in the last TPOT_WINDOW_S. The
        engine's own mean covers its last requests however old they are: after a busy
        period it would stay high forever and the controller could never revert."""
        now = time.monotonic()
        recent = [t for at, t in self.recent_tpot if now - at <= TPOT_WINDOW_S]
        return sum(recent) / len(recent) if recent else None

    def report(self, stats: dict) -> dict:
        stats = dict(stats)
        stats.update(recent_tpot_s=self.recent_tpot_s(), replica_id=self.replica_id, actor_name=self.actor_name,
                     num_layers=self.hybrid.num_layers,
                     loaded_layers=list(self.layers.order), loaded_store_version=self.layers.store_version,
                     layer_errors={str(k): v for k, v in self.layers.errors.items()})
        return stats

    async def _apply(self, wanted: list[int]):
        """Swap to `wanted` (those of them this replica holds weights for)."""
        # one read: a store poll on another thread may refresh the layers meanwhile
        layers, taken, version = self.layers.take_usable(wanted, self.installed)
        weights = {i: w for i, (w, _) in taken.items()}
        current = (await self._stats())["dsla_layers"]
        if sorted(layers) == sorted(current) and not weights:
            return
        # set_conversion waits for the engine's current step: keep the event loop free meanwhile
        await asyncio.to_thread(self.engine.set_conversion, layers, version, weights)
        for i, (_, ident) in taken.items():
            self.installed[i] = ident
        log.info("replica %s: DSLA layers %s -> %s (store version %d)", self.replica_id, current, layers, version)

    async def _stats(self) -> dict:
        # AsyncEngine.stats never waits for a step; on a worker thread it queued behind admissions
        # that do (each holds one of the default executor's few threads until a step ends)
        return self.engine.stats()

    async def status(self) -> dict:
        return self.report(await self._stats())

    def check_health(self):
        if self.engine.engine is not None and self.engine.error is not None:
            raise RuntimeError(f"engine failed: {self.engine.error!r}")

    def __del__(self):
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()
