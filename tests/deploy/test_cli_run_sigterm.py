"""`dsla-serve run` shuts Serve and Ray down cleanly on SIGTERM (as on Ctrl-C).

`ray.init` installs its own SIGTERM handler (`sys.exit(signum)`); the CLI's handler must win,
else SIGTERM skipped the clean shutdown: no "shutting down", the process aborted half-way
through and Ray's dashboard / runtime-env agents were left running. Ray itself is stubbed here
(its `ray.init` handler is reproduced), so no cluster starts.
"""
from __future__ import annotations

import os
import signal
import sys
import types

import pytest


@pytest.fixture
def stubbed_ray(monkeypatch):
    import ray
    from ray import serve

    import deploy.app
    import deploy.commands_serve as cs

    calls = []

    def fake_init(**kw):
        def ray_sigterm_handler(signum, frame):  # what ray.init installs (ray/_private/worker.py)
            sys.exit(signum)

        signal.signal(signal.SIGTERM, ray_sigterm_handler)
        calls.append("ray.init")
        return types.SimpleNamespace(dashboard_url="127.0.0.1:8265")

    def fake_sleep(_s):  # the serving loop: a SIGTERM arrives while it sleeps
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(100):  # the handler runs between bytecodes
            pass
        raise AssertionError("SIGTERM did not interrupt the serving loop")

    monkeypatch.setattr(ray, "init", fake_init)
    monkeypatch.setattr(ray, "shutdown", lambda: calls.append("ray.shutdown"))
    monkeypatch.setattr(ray, "nodes", lambda: [{"MetricsExportPort": 8080}])
    monkeypatch.setattr(serve, "start", lambda **kw: calls.append("serve.start"))
    monkeypatch.setattr(serve, "run", lambda app, **kw: calls.append("serve.run"))
    monkeypatch.setattr(serve, "shutdown", lambda: calls.append("serve.shutdown"))
    monkeypatch.setattr(deploy.app, "build_app", lambda cfg: "app")
    monkeypatch.setattr(deploy.app, "num_layers", lambda cfg: 30)
    monkeypatch.setattr(cs.time, "sleep", fake_sleep)
    previous = signal.getsignal(signal.SIGTERM)
    yield calls
    signal.signal(signal.SIGTERM, previous)


def test_sigterm_shuts_down_cleanly(stubbed_ray, capsys):
    from deploy.cli import main

    rc = main(["run", "--no-dashboard"])
    assert rc == 0
    assert "shutting down" in capsys.readouterr().err
    assert stubbed_ray[-2:] == ["serve.shutdown", "ray.shutdown"]
