"""One poll of a replica's control loop (deploy/replica.py `_control_once`), without Ray."""
from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import pytest

from deploy.replica import LLMReplica


class _Controller:
    def __init__(self):
        self.reports = []

        async def remote(replica_id, stats):
            self.reports.append((replica_id, stats))
            return {"dsla_layers": [3, 1]}
        self.report = SimpleNamespace(remote=remote)


class _Silent:
    """A handle to a controller with no live replica: Serve queues the call without a deadline."""
    class report:
        @staticmethod
        def remote(*a):
            return asyncio.get_running_loop().create_future()  # never resolves


def _bind_apply(replica):
    replica._start_apply = lambda wanted: LLMReplica.func_or_class._start_apply(replica, wanted)
    replica._apply_done = lambda task: LLMReplica.func_or_class._apply_done(replica, task)


@pytest.mark.parametrize("enabled", [True, False])
def test_a_replica_reports_even_with_the_controller_disabled_and_then_keeps_its_initial_layers(enabled):
    """Disabled, the controller's target is ignored: the replica serves initial_layers with the store's
    current weights (a republished or unpublished layer reaches the engine at the next poll)."""
    applied = []

    async def apply(layers):
        applied.append(layers)

    replica = SimpleNamespace(
        cfg=SimpleNamespace(store_poll_interval_s=1e9, controller=SimpleNamespace(enabled=enabled, initial_layers=1,
                                                                              report_timeout_s=5.0)),
        _last_store_poll=time.monotonic(), engine=SimpleNamespace(stats=lambda: {"dsla_layers": [], "waiting": 2}),
        metrics=SimpleNamespace(update=lambda stats, version: None),
        layers=SimpleNamespace(store_version=1, order=[0, 2], prefix=[0, 2]),
        controller=_Controller(), replica_id="r0", report=lambda stats: dict(stats, replica_id="r0"), _apply=apply)
    replica._stats = lambda: LLMReplica.func_or_class._stats(replica)
    _bind_apply(replica)

    async def main():
        await LLMReplica.func_or_class._control_once(replica)
        await replica._apply_task
    asyncio.run(main())
    assert [(rid, s["waiting"]) for rid, s in replica.controller.reports] == [("r0", 2)]
    assert applied == ([[3, 1]] if enabled else [[0]])


def test_the_control_loop_goes_on_while_the_controller_does_not_answer():
    """Serve queues a call to a deployment with no live replica without a deadline: while the
    controller restarted, every replica's control loop hung on its report (no metrics, no layer
    store polls, no initial_layers)."""
    from deploy.config import AppConfig

    polls = []
    r = object.__new__(LLMReplica.func_or_class)
    r.cfg = AppConfig.model_validate({"controller": {"poll_interval_s": 0.05, "report_timeout_s": 0.1},
                                      "store_poll_interval_s": 1000})
    r.controller, r.replica_id, r._last_store_poll = _Silent, "r1", time.monotonic()
    r.metrics = SimpleNamespace(update=lambda stats, version: polls.append(stats))
    r.layers = SimpleNamespace(store_version=3)
    r.report = lambda s: s

    async def stats():
        return {"dsla_layers": [], "waiting": 7}
    r._stats = stats

    async def main():
        task = asyncio.create_task(r._control_loop())
        await asyncio.sleep(1.0)
        task.cancel()
    asyncio.run(main())
    assert len(polls) >= 4, len(polls)


def test_with_the_controller_disabled_a_silent_controller_does_not_hold_back_initial_layers():
    from deploy.config import AppConfig

    applied = []
    r = object.__new__(LLMReplica.func_or_class)
    r.cfg = AppConfig.model_validate({"controller": {"enabled": False, "initial_layers": 1, "poll_interval_s": 0.02,
                                                     "report_timeout_s": 0.05}})
    r.controller, r.replica_id, r._last_store_poll = _Silent, "r1", time.monotonic()
    r.metrics = SimpleNamespace(update=lambda stats, version: None)
    r.layers = SimpleNamespace(store_version=3, prefix=[2, 0])
    r.report = lambda s: s

    async def stats():
        return {"dsla_layers": []}

    async def apply(layers):
        applied.append(layers)
    r._stats, r._apply = stats, apply

    async def main():
        try:
            await LLMReplica.func_or_class._control_once(r)
        finally:
            await r._apply_task
    with pytest.raises(asyncio.TimeoutError):
        asyncio.run(main())
    assert applied == [[2]]


def test_the_control_loop_goes_on_reporting_while_a_swap_waits_for_a_step():
    """A swap waits for the engine's current step, seconds for a CPU prefill: the replica stopped
    reporting for that long, and the controller dropped it as silent (/status showed no replica)."""
    from deploy.config import AppConfig

    r = object.__new__(LLMReplica.func_or_class)
    r.cfg = AppConfig.model_validate({"controller": {"poll_interval_s": 0.05, "report_timeout_s": 1.0},
                                      "store_poll_interval_s": 1000})
    r.controller, r.replica_id, r._last_store_poll = _Controller(), "r1", time.monotonic()
    r.metrics = SimpleNamespace(update=lambda stats, version: None)
    r.layers = SimpleNamespace(store_version=3)
    r.report = lambda s: s
    started, release = [], None

    async def stats():
        return {"dsla_layers": []}

    async def apply(layers):  # a swap that waits for a long step
        started.append(layers)
        await release.wait()
    r._stats, r._apply = stats, apply

    async def main():
        nonlocal release
        release = asyncio.Event()
        task = asyncio.create_task(r._control_loop())
        await asyncio.sleep(1.0)
        n = len(r.controller.reports)
        release.set()
        await asyncio.sleep(0.2)
        task.cancel()
        return n
    during = asyncio.run(main())
    assert during >= 5, during  # reports went on while the swap waited
    assert len(started) >= 2 and started[0] == [3, 1]  # one swap at a time, the next after it ended



def test_a_swap_stops_at_the_first_target_layer_the_replica_lacks():
    """The controller answers a report with the fleet's target before it has heard that this
    replica could not load layer 1 (a new or restarted replica). Layer 0 was distilled with 1
    converted, so the replica installs the leading run it holds, [3], not [3, 0]."""
    from deploy.layer_preload import PreloadedLayers

    pre = PreloadedLayers(None)
    pre.weights = {3: {"w": 3}, 0: {"w": 0}}
    pre.versions = {3: (1, "a"), 0: (3, "c")}
    pre.order, pre.prefix, pre.errors = [3, 0], [3], {1: "sha256 mismatch"}
    swapped = []
    replica = SimpleNamespace(layers=pre, installed={}, replica_id="r0")
    replica.engine = SimpleNamespace(set_conversion=lambda layers, v, w: swapped.append((list(layers), sorted(w))),
                                     stats=lambda: {"dsla_layers": []})
    replica._stats = lambda: LLMReplica.func_or_class._stats(replica)
    asyncio.run(LLMReplica.func_or_class._apply(replica, [3, 1, 0]))
    assert swapped == [([3], [3])]
    assert replica.installed == {3: (1, "a")}


def test_a_refresh_between_counting_and_taking_the_layers_cannot_convert_one_without_weights():
    """_apply counted the usable layers and took their weights in two reads: a store refresh that
    dropped layer 0 in between (its file damaged) left 0 in the swap's layers without weights, and
    the engine converts such a layer with a fresh, untrained module."""
    from deploy.layer_preload import PreloadedLayers

    pre = PreloadedLayers(None)
    pre.weights = {3: {"w": 3}, 0: {"w": 0}}
    pre.versions = {3: (1, "a"), 0: (2, "b")}
    pre.order, pre.prefix, pre.errors = [3, 0], [3, 0], {}
    real = pre.take

    def refreshed_first(layers, installed):
        pre.weights.pop(0, None)  # the refresh lands here
        return real(layers, installed)
    pre.take = refreshed_first
    swapped = []
    replica = SimpleNamespace(layers=pre, installed={}, replica_id="r0")
    replica.engine = SimpleNamespace(set_conversion=lambda layers, v, w: swapped.append((list(layers), sorted(w))),
                                     stats=lambda: {"dsla_layers": []})
    replica._stats = lambda: LLMReplica.func_or_class._stats(replica)
    asyncio.run(LLMReplica.func_or_class._apply(replica, [3, 0]))
    assert swapped == [([3, 0], [0, 3])]  # every converted layer with the weights it was counted for
