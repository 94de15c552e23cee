"""A (re)started controller (deploy/controller.py) continues from what the fleet serves, without Serve:
its methods run on a bare object holding the state they use."""
import asyncio
from types import SimpleNamespace

from deploy.controller import ConversionController
from deploy.policy import PolicyState

C = ConversionController.func_or_class


def _controller():
    cfg = SimpleNamespace(controller=SimpleNamespace(poll_interval_s=0.5, report_timeout_s=5.0))
    c = SimpleNamespace(cfg=cfg, reports={}, adopted=False, first_report_t=None, published=[2, 0, 3, 1],
                        state=PolicyState(layers=0))
    c.target_layers = lambda: C.target_layers(c)
    return c


def _report(c, rid, layers):
    return asyncio.run(C.report(c, rid, {"dsla_layers": layers}))["dsla_layers"]


def test_a_fresh_replica_reporting_first_does_not_revert_a_loaded_fleet():
    """The wait counts from the first report, not from the controller's start: Serve may route
    replicas to a new controller seconds after it started, and a clock started then let the first
    tick that heard anyone adopt (a fresh replica's none, reverting the fleet). And it lasts as long
    as a live replica may stay silent (report_timeout_s): a busy replica reporting 1.2 s late was
    reverted when the wait was two poll intervals."""
    c = _controller()
    # a replica that has just started (initial layers: none) happens to report first
    assert _report(c, "fresh", []) == []
    t0 = c.first_report_t
    C._maybe_adopt(c, t0 + 0.1)  # however long ago the controller started
    assert not c.adopted
    C._maybe_adopt(c, t0 + 1.2)  # the loaded replica is busy and has not reported yet
    assert not c.adopted
    assert _report(c, "loaded", [2, 0, 3]) == [2, 0, 3]  # told to keep its layers, not to revert
    C._maybe_adopt(c, t0 + 4.0)  # too early: a live replica may be silent for report_timeout_s
    assert not c.adopted
    C._maybe_adopt(c, t0 + 5.0)
    assert c.adopted and c.state.layers == 3
    assert _report(c, "fresh", []) == [2, 0, 3] and _report(c, "loaded", [2, 0, 3]) == [2, 0, 3]


def test_nothing_is_adopted_before_any_report():
    c = _controller()
    C._maybe_adopt(c, 500.0)
    assert not c.adopted and c.state.layers == 0


def test_no_decision_is_made_before_the_fleet_is_adopted():
    """Before adoption the replicas keep their layers; decisions taken then reached the metrics and
    the history (a 'convert' that never happened), and moved the policy state adoption replaces."""
    from collections import Counter, deque

    from deploy.config import ControllerSettings

    seen = []
    c = _controller()
    c.cfg.controller = ControllerSettings(poll_interval_s=0.5, policy={"queue_high": 1, "up_patience": 1,
                                                                       "cooldown_s": 0})
    c.store, c.num_layers, c.counts, c.history, c.last_decision = None, 4, Counter(), deque(), None
    c.policy = c.cfg.controller.policy
    c.metrics = SimpleNamespace(load=lambda *a: None, decision=lambda *a: seen.append(a))
    c.available_layers = lambda: C.available_layers(c)
    c._maybe_adopt = lambda now: C._maybe_adopt(c, now)
    c._refresh_store = lambda: None
    busy = {"dsla_layers": [], "waiting": 50, "loaded_layers": [2, 0, 3, 1]}
    c.reports, c.first_report_t = {"r": (100.1, busy)}, 100.1
    C.tick(c, 100.2)  # heard the fleet for less than report_timeout_s: no decision
    assert not seen and not c.history and c.state.layers == 0
    c.reports = {"r": (105.1, busy)}
    C.tick(c, 105.2)
    assert c.adopted and seen  # now the policy runs (and converts: the queue is long)


def test_an_unanswering_distill_worker_does_not_slow_the_decisions(monkeypatch):
    """A distill worker still in its constructor (loading the model, computing the order) or never
    scheduled answers no status(): polled inline, it held every decision tick for the status
    timeout (10 s) instead of poll_interval_s. Timings here are the code's scaled by 1/10."""
    import time

    import deploy.controller as ctl
    from deploy.distill import DistillPool

    monkeypatch.setattr("deploy.distill.STATUS_TIMEOUT_S", 1.0)
    monkeypatch.setattr(ctl, "DISTILL_POLL_S", 0.2)
    pending = SimpleNamespace(status=SimpleNamespace(remote=lambda: asyncio.get_running_loop().create_future()))
    pool = DistillPool(SimpleNamespace(distill=SimpleNamespace(num_workers=1)), "/nonexistent", None)
    pool.workers["dsla-distill-app-0"] = pending
    ticks = []
    c = SimpleNamespace(cfg=SimpleNamespace(controller=SimpleNamespace(poll_interval_s=0.05)), distill=pool,
                        tick=ticks.append)

    async def main():
        tasks = [asyncio.create_task(C._loop(c)), asyncio.create_task(C._distill_loop(c))]
        await asyncio.sleep(1.5)
        for t in tasks:
            t.cancel()

    t0 = time.monotonic()
    asyncio.run(main())
    assert time.monotonic() - t0 < 3 and len(ticks) >= 15, len(ticks)
