"""One Ray + Serve instance for all of tests/deploy, serving a tiny model.

The model is a tiny random Llama with the default model's tokenizer (so chat
templates and real text work) and a layer store of fresh DSLA layers for every
layer, so conversion can go as far as the policy allows. Ray is started once,
on 127.0.0.1 ports picked here, and shut down when tests/deploy ends.
"""
from __future__ import annotations

import json
import random
import socket
import time
import urllib.request

import pytest

from tests.conftest import tiny_model

NUM_LAYERS = 4
STORE_ORDER = [2, 0, 3, 1]
MODEL_NAME = "tiny-test"


def _ephemeral_range() -> tuple[int, int]:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low, high = map(int, f.read().split())
            return low, high
    except (OSError, ValueError):
        return 32768, 60999


def _port_range() -> tuple[int, int]:
    """[low, high): above Ray's worker ports (10002-19999), outside the ephemeral range."""
    eph_low, eph_high = _ephemeral_range()
    for low, high in ((20000, min(eph_low, 32768)), (max(20000, eph_high + 1), 65536)):
        if high - low >= 100:
            return low, high
    raise RuntimeError(f"no port range outside the ephemeral range {eph_low}-{eph_high} and Ray's worker ports")


def free_port() -> int:
    """A free port outside the kernel's ephemeral range and Ray's worker ports.

    A port the kernel hands out for bind(0) can be taken again, before Serve binds it,
    as the local end of one of the many connections Ray opens (CI failed on exactly
    that), so pick from a range neither uses, starting at a random point so parallel
    sessions don't collide.
    """
    low, high = _port_range()
    start = random.Random().randrange(low, high)
    for offset in range(high - low):
        port = low + (start - low + offset) % (high - low)
        if port in _handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError(f"no free port in {low}-{high - 1}")


_handed_out: set[int] = set()


def get_json(url: str, timeout: float = 10.0):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


def wait_for(predicate, timeout: float, interval: float = 0.25, what: str = "condition"):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
            if last:
                return last
        except Exception as e:  # noqa: BLE001 - retried until the deadline
            last = e
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


def wait_for_replicas(base: str, n: int, timeout: float) -> dict:
    """/status once n replicas report (a replica silent for report_timeout_s, e.g. stalled on a
    loaded machine, drops out until it reports again)."""
    return wait_for(lambda: (lambda s: s if len(s["replicas"]) == n else None)(get_json(base + "/status")),
                    timeout, what=f"{n} replicas reporting")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from transformers import AutoTokenizer

    from dsla_model.loading import resolve_model

    tok = AutoTokenizer.from_pretrained(resolve_model("default"))
    model = tiny_model(layers=NUM_LAYERS, vocab=len(tok), seed=0)
    model.config.max_position_embeddings = 512
    out = tmp_path_factory.mktemp("tiny_model")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="session")
def tiny_store(tiny_model_dir, tmp_path_factory):
    """A store with every layer published (fresh DSLA weights), in STORE_ORDER."""
    from dsla_model.hybrid import HybridModel
    from dsla_model.layer_store import LayerStore
    from dsla_model.loading import load_model

    model, _, model_id = load_model(tiny_model_dir)
    hybrid = HybridModel(model)
    store = LayerStore(tmp_path_factory.mktemp("store"))
    store.init(model_id, hybrid.fingerprint, STORE_ORDER, hybrid.dsla_config)
    for layer in STORE_ORDER:
        store.publish(layer, hybrid.new_dsla_module(layer).state_dict(), {"test": True})
    return str(store.path)


def app_config(model_dir: str, store: str, **overrides) -> dict:
    cfg = {
        "model": model_dir, "served_model_name": MODEL_NAME, "layers_dir": store,
        "store_poll_interval_s": 0.5, "max_tokens_limit": 256, "max_choices": 4,
        "engine": {"max_running": 8, "max_batched_tokens": 512, "cache_memory_bytes": 64 * 2**20},
        # num_cpus 0: the machine's two cores are shared; Ray must not refuse to place actors
        "replica": {"num_cpus": 0, "num_replicas": 2, "max_ongoing_requests": 48, "max_queued_requests": 512},
        "ingress": {"num_cpus": 0},
        "controller": {"num_cpus": 0, "poll_interval_s": 0.25, "report_timeout_s": 3.0, "policy": {
            "queue_high": 3, "queue_low": 0, "waiting_tokens_high": 100000, "waiting_tokens_low": 0,
            "cache_high": 1.0, "cache_low": 1.0, "up_patience": 2, "down_patience": 6,
            "cooldown_s": 0.75, "step_layers": 1, "max_ratio": 0.75}},
    }
    for key, value in overrides.items():
        cfg[key] = {**cfg.get(key, {}), **value} if isinstance(value, dict) else value
    return cfg


# package scope: Ray goes down when tests/deploy ends, before other packages' tests start
# their own Ray in the same pytest run
@pytest.fixture(scope="package")
def ray_session():
    import ray
    from ray import serve

    metrics_port, http_port = free_port(), free_port()
    ray.init(num_cpus=4, include_dashboard=False, _metrics_export_port=metrics_port,
             object_store_memory=200 * 2**20, log_to_driver=False,
             _system_config={"metrics_report_interval_ms": 1000})
    serve.start(http_options={"host": "127.0.0.1", "port": http_port})
    try:
        yield {"http_port": http_port, "metrics_port": metrics_port}
    finally:
        if ray.is_initialized():  # serve.shutdown() would otherwise start a Ray to shut down
            serve.shutdown()
            ray.shutdown()


@pytest.fixture(scope="package")
def server(ray_session, tiny_model_dir, tiny_store):
    """The main application, at http://127.0.0.1:<port>."""
    from ray import serve

    from deploy.app import build_app

    serve.run(build_app(app_config(tiny_model_dir, tiny_store)), name="dsla", route_prefix="/")
    base = f"http://127.0.0.1:{ray_session['http_port']}"
    wait_for_replicas(base, 2, 120)
    return {"base": base, "metrics": f"http://127.0.0.1:{ray_session['metrics_port']}/metrics",
            "model_dir": tiny_model_dir, "store": tiny_store}


@pytest.fixture(scope="package")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server["base"] + "/v1", api_key="unused", max_retries=0, timeout=120)


def pytest_configure(config):
    # Ray Serve's own pydantic models warn on import; they are not ours to fix.
    config.addinivalue_line("filterwarnings", "ignore::DeprecationWarning:ray.*")
    config.addinivalue_line("filterwarnings", "ignore:.*PydanticDeprecatedSince20.*")
