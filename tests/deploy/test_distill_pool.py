"""The distill workers' restart backoff (deploy/distill.py DistillPool), without Ray: RETRY_MIN_S
doubled per failure in a row up to RETRY_MAX_S, reset only by progress."""
import asyncio
from types import SimpleNamespace

import deploy.distill as dd
from deploy.distill import DistillPool


class _FailingWorker:
    """start() runs for 3 s (state 'capturing'), then the run raises; `publishes` adds a layer per run."""

    def __init__(self, clock, publishes=False):
        self.clock, self.starts, self.fail_at, self.publishes, self.published = clock, 0, clock[0] + 3.0, publishes, []
        self.status = SimpleNamespace(remote=self._status)
        self.start = SimpleNamespace(remote=self._start)

    async def _status(self):
        state = "capturing" if self.clock[0] < self.fail_at else "error"
        return {"state": state, "error": "CUDA out of memory", "published": list(self.published)}

    def _start(self):
        self.starts += 1
        self.fail_at = self.clock[0] + 3.0
        if self.publishes:
            self.published.append(len(self.published))


def _restarts_in(minutes, monkeypatch, publishes):
    clock = [1000.0]
    monkeypatch.setattr(dd.time, "monotonic", lambda: clock[0])
    metrics = SimpleNamespace(distill=lambda *a: None, distill_restarts=SimpleNamespace(inc=lambda n: None))
    pool = DistillPool(SimpleNamespace(distill=SimpleNamespace(num_workers=1)), "/store", metrics)
    pool.workers["w"] = w = _FailingWorker(clock, publishes)

    async def run():
        for _ in range(int(minutes * 60 / 2.0)):  # the controller polls every DISTILL_POLL_S = 2 s
            await pool.poll()
            clock[0] += 2.0
    asyncio.run(run())
    return w.starts


def test_a_run_failing_seconds_after_each_start_is_backed_off(monkeypatch):
    """Seen 'capturing' between failures, it had its backoff reset each time: 149 restarts in 10 min."""
    assert _restarts_in(10, monkeypatch, publishes=False) <= 10


def test_a_run_that_publishes_between_failures_restarts_at_once(monkeypatch):
    assert _restarts_in(10, monkeypatch, publishes=True) >= 100
