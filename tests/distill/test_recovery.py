"""Distillation recovers on its own: a damaged published layer is distilled again, a worker whose
run failed is started again by the pool (with backoff), a worker restart clears the old error."""
import asyncio

import torch

from distill_workers.trainer import ChainedDistiller, DistillConfig
from dsla_model.layer_store import LayerStore
from tests.distill.conftest import tiny_blocks, tiny_hybrid

CFG = DistillConfig(tokens_per_layer=96, train_blocks=4, block_size=48, lr=2e-2, train_chunk_size=8, kl_steps=0)


def test_a_damaged_published_layer_is_distilled_again(tmp_path):
    torch.set_num_threads(1)
    store, blocks = LayerStore(tmp_path / "s"), tiny_blocks(4)
    h = tiny_hybrid()
    assert ChainedDistiller(h, None, "tiny", store, [2, 0, 1], CFG, h.dsla_config, num_layers=1,
                            blocks=blocks).run() == [2]
    f = store.path / store.read_manifest()["layers"]["2"]["file"]
    data = bytearray(f.read_bytes())
    data[-3] ^= 0xFF  # bit rot, a bad copy
    f.write_bytes(bytes(data))
    h2 = tiny_hybrid()
    d = ChainedDistiller(h2, None, "tiny", store, [2, 0, 1], CFG, h2.dsla_config, num_layers=2, blocks=blocks)
    assert d.run() == [2, 0]  # used to raise "layer 2 ... is corrupt" here, for good
    assert store.read_manifest()["layers"]["2"]["version"] == 2
    store.load_layer(2, h2.fingerprint)  # readable again
    assert d.todo() == []


class _FlakyDistiller:
    def __init__(self):
        self.calls, self.status = 0, {"state": "idle"}

    def run(self):
        self.calls += 1
        if self.calls <= 2:
            raise OSError("EIO writing the store (transient)")
        self.status["state"] = "done"

    def todo(self):
        return [] if self.calls > 2 else [0, 1]

    def stop(self):
        pass

    def resume(self):
        pass


class _Handle:
    """What DistillPool.poll calls on a worker actor, over a DistillWorkerImpl in this process."""

    def __init__(self, impl):
        class _Awaited:  # status.remote() is awaited by the pool
            def remote(self):
                async def call():
                    return impl.status()
                return call()

        class _FireAndForget:  # start.remote() is not: the call happens, its ref is dropped
            def remote(self):
                impl.start()
        self.status, self.start = _Awaited(), _FireAndForget()


def test_the_pool_starts_a_failed_worker_again_after_a_backoff(monkeypatch):
    import deploy.distill as dd
    import distill_workers.worker as worker

    monkeypatch.setattr(worker, "build_distiller", lambda *a, **k: _FlakyDistiller())
    clock = [1000.0]
    monkeypatch.setattr(dd.time, "monotonic", lambda: clock[0])
    w = worker.DistillWorkerImpl(store="/x")
    w.wait(5)
    assert w.status()["state"] == "error" and w.error

    class _Metrics:
        class distill_restarts:  # noqa: N801 - a counter's interface
            inc = staticmethod(lambda n: None)

        def distill(self, *a):
            pass

    pool = dd.DistillPool.__new__(dd.DistillPool)
    dd.DistillPool.__init__(pool, None, "/x", _Metrics())
    pool.workers["w0"] = _Handle(w)
    asyncio.run(pool.poll())  # a first failure: started again at once (and it fails again)
    w.wait(5)
    assert w.distiller.calls == 2 and pool.restarts == 1
    for _ in range(3):  # a second failure in a row: the next start waits RETRY_MIN_S
        asyncio.run(pool.poll())
    assert w.distiller.calls == 2 and pool.restarts == 1
    clock[0] += dd.RETRY_MIN_S
    asyncio.run(pool.poll())
    w.wait(5)
    assert pool.restarts == 2 and w.distiller.calls == 3
    assert w.status()["state"] == "done" and w.error is None
    asyncio.run(pool.poll())
    assert pool.status["w0"]["state"] == "done" and "w0" not in pool._failures


def test_a_worker_that_dies_at_every_start_is_not_recreated_at_every_poll(monkeypatch):
    """A constructor that always fails (e.g. a store made with other DSLA settings) used to get a
    new actor, and a model load, every poll."""
    import ray

    import deploy.distill as dd

    class _Dead:
        class status:  # noqa: N801
            @staticmethod
            def remote():
                async def call():
                    raise ray.exceptions.RayActorError()
                return call()

    clock, made = [0.0], []
    monkeypatch.setattr(dd.time, "monotonic", lambda: clock[0])
    pool = dd.DistillPool.__new__(dd.DistillPool)
    dd.DistillPool.__init__(pool, None, "/x", type("M", (), {"distill": lambda *a: None,
                                                               "distill_restarts": type("C", (), {"inc": lambda *a: None})()})())
    monkeypatch.setattr(pool, "_new_worker", lambda name: made.append(name) or _Dead())
    pool.workers["w0"] = _Dead()
    for _ in range(200):  # 100 s of polls at 0.5 s
        asyncio.run(pool.poll())
        clock[0] += 0.5
    assert 4 <= len(made) <= 6  # at 0, 5, 15, 35, 75 s: not 200
    assert pool.status["w0"]["state"] == "restarting" and pool.status["w0"]["failures_in_a_row"] >= 5


def test_a_worker_name_still_taken_at_start_is_started_by_a_later_poll(monkeypatch):
    """A controller restarted by Serve can start before Ray released its predecessor's worker
    name: the ValueError used to fail the controller's constructor."""
    import deploy.distill as dd

    tries = []

    def new_worker(name):
        tries.append(name)
        if len(tries) == 1:
            raise ValueError(f"The name {name} is already taken")
        return "handle"

    pool = dd.DistillPool.__new__(dd.DistillPool)
    cfg = type("Cfg", (), {"distill": type("D", (), {"num_workers": 1})()})()
    dd.DistillPool.__init__(pool, cfg, "/x", None)
    monkeypatch.setattr(pool, "_new_worker", new_worker)
    pool.start("app")
    assert pool.workers == {"dsla-distill-app-0": None} and pool.status["dsla-distill-app-0"]["state"] == "starting"
    asyncio.run(pool.poll())
    assert pool.workers == {"dsla-distill-app-0": "handle"} and len(tries) == 2


def test_a_layer_distilled_again_sees_only_the_layers_before_it(tmp_path, monkeypatch):
    """Order [2, 0, 1], all published, layer 2's file damaged: layer 2 (position 0) is captured with
    no DSLA layer before it, not with 0 and 1 (the later positions) converted; the chain is whole
    again after the run."""
    import distill_workers.trainer as T

    torch.set_num_threads(1)
    store, blocks = LayerStore(tmp_path / "s"), tiny_blocks(4)
    h = tiny_hybrid()
    assert ChainedDistiller(h, None, "tiny", store, [2, 0, 1], CFG, h.dsla_config, blocks=blocks).run() == [2, 0, 1]
    f = store.path / store.read_manifest()["layers"]["2"]["file"]
    f.write_bytes(b"garbage")
    seen = []
    real = T.capture_layer
    monkeypatch.setattr(T, "capture_layer", lambda hyb, layer, *a, **k: seen.append((layer, hyb.dsla_layers))
                        or real(hyb, layer, *a, **k))
    h2 = tiny_hybrid()
    assert ChainedDistiller(h2, None, "tiny", store, [2, 0, 1], CFG, h2.dsla_config, blocks=blocks).run() == [2]
    assert seen == [(2, [])]
    assert sorted(h2.dsla_layers) == [0, 1, 2]


def test_a_diverged_layer_is_not_published(tmp_path):
    """A learning rate that blows the weights up to inf / NaN used to publish them (and replicas
    served them: every token 0); now the run stops with an error and the store is unchanged."""
    import pytest

    torch.set_num_threads(1)
    store, blocks = LayerStore(tmp_path / "s"), tiny_blocks(4)
    h = tiny_hybrid()
    cfg = DistillConfig(**{**CFG.to_dict(), "lr": float("inf")})
    with pytest.raises(ValueError, match="diverged"):
        ChainedDistiller(h, None, "tiny", store, [2, 0, 1], cfg, h.dsla_config, num_layers=1, blocks=blocks).run()
    assert store.published_layers() == []


def test_a_stopped_chain_runs_again_after_resume_and_the_worker_resumes_on_start(tmp_path, monkeypatch):
    import distill_workers.worker as worker

    torch.set_num_threads(1)
    store, blocks = LayerStore(tmp_path / "s"), tiny_blocks(4)
    h = tiny_hybrid()
    d = ChainedDistiller(h, None, "tiny", store, [2, 0, 1], CFG, h.dsla_config, num_layers=2, blocks=blocks)
    d.stop()
    assert d.run() == [] and d.status["state"] == "stopped"
    d.resume()
    assert d.run() == [2, 0] and d.status["state"] == "done"
    # the worker's start() after a stop(): the distiller resumes before its thread runs
    monkeypatch.setattr(worker, "build_distiller", lambda *a, **k: d)
    w = worker.DistillWorkerImpl(store="/x", autostart=False)
    w.stop()
    assert d._stop
    w.start()
    w.wait(60)
    assert not d._stop and w.status()["state"] == "done"
