"""Application metrics through `ray.util.metrics`.

Ray exports them (prefixed `ray_`) at every node's metrics endpoint, which the
Ray dashboard and Prometheus scrape; deploy/grafana_dashboard.json plots them.
Engine counters are cumulative inside the engine, so the replica exports the
difference since its last poll. Objects are created inside the actor that
records them (metric objects do not travel between processes).
"""
from __future__ import annotations

from ray.util.metrics import Counter, Gauge, Histogram

PREFIX = "dsla_serve_"
TTFT_BUCKETS = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]
TPOT_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5]


class ReplicaMetrics:
    def __init__(self, replica: str, num_layers: int):
        self.tags = {"replica": replica}
        self.num_layers = max(1, num_layers)
        keys = ("replica",)
        g = lambda name, doc: Gauge(PREFIX + name, doc, tag_keys=keys)  # noqa: E731
        self.dsla_layers = g("dsla_layers", "DSLA layers this replica serves new requests with")
        self.ratio = g("conversion_ratio", "share of attention layers running as DSLA")
        self.queue = g("queue_depth", "requests waiting for admission in the engine")
        self.waiting_tokens = g("waiting_prompt_tokens", "prompt tokens waiting for prefill")
        self.running = g("running_requests", "requests in the running batch")
        self.cache = g("cache_usage", "fraction of the cache budget in use")
        self.capacity = g("capacity_4k", "4K-token sequences the cache budget holds at this conversion")
        self.store_version = g("store_version", "layer store version the replica has loaded")
        self.tokens = Counter(PREFIX + "generated_tokens", "tokens generated", tag_keys=keys)
        self.swaps = Counter(PREFIX + "swaps", "hot swaps of the layer configuration", tag_keys=keys)
        self.requests = Counter(PREFIX + "requests", "finished requests", tag_keys=("replica", "finish_reason"))
        self.ttft = Histogram(PREFIX + "ttft_seconds", "time to first token", TTFT_BUCKETS, tag_keys=keys)
        self.tpot = Histogram(PREFIX + "tpot_seconds", "time per output token after the first", TPOT_BUCKETS,
                              tag_keys=keys)
        self._last_tokens = 0
        self._last_swaps = 0

    def update(self, stats: dict, store_version: int):
        t = self.tags
        n = len(stats.get("dsla_layers", []))
        self.dsla_layers.set(n, t)
        self.ratio.set(n / self.num_layers, t)
        self.queue.set(stats.get("waiting", 0), t)
        self.waiting_tokens.set(stats.get("waiting_prompt_tokens", 0), t)
        self.running.set(stats.get("running", 0), t)
        self.cache.set(stats.get("cache_usage", 0.0), t)
        self.capacity.set(stats.get("capacity_4k", 0), t)
        self.store_version.set(store_version, t)
        tokens, swaps = stats.get("generated_tokens", 0), stats.get("swaps", 0)
        if tokens > self._last_tokens:
            self.tokens.inc(tokens - self._last_tokens, t)
        if swaps > self._last_swaps:
            self.swaps.inc(swaps - self._last_swaps, t)
        self._last_tokens, self._last_swaps = tokens, swaps

    def request_done(self, finish_reason: str, ttft_s, tpot_s):
        self.requests.inc(1, {**self.tags, "finish_reason": finish_reason or "unknown"})
        if ttft_s is not None:
            self.ttft.observe(ttft_s, self.tags)
        if tpot_s is not None:
            self.tpot.observe(tpot_s, self.tags)


class ControllerMetrics:
    def __init__(self, num_layers: int):
        self.num_layers = max(1, num_layers)
        self.target = Gauge(PREFIX + "target_dsla_layers", "DSLA layers the controller asks for")
        self.target_ratio = Gauge(PREFIX + "target_conversion_ratio", "conversion ratio the controller asks for")
        self.decisions = Counter(PREFIX + "conversion_decisions", "controller decisions that changed the target",
                                 tag_keys=("action",))
        self.load_queue = Gauge(PREFIX + "controller_queue_depth", "queue depth the policy saw (busiest replica)")
        self.replicas = Gauge(PREFIX + "replicas_reporting", "replicas that reported recently")
        self.published = Gauge(PREFIX + "store_published_layers", "layers published in the layer store")
        self.distill_layer = Gauge(PREFIX + "distill_layer", "layer a distill worker is training",
                                   tag_keys=("worker",))
        self.distill_progress = Gauge(PREFIX + "distill_progress", "fraction of the current layer's budget done",
                                      tag_keys=("worker",))
        self.distill_loss = Gauge(PREFIX + "distill_loss", "current distillation loss", tag_keys=("worker",))
        self.distill_restarts = Counter(PREFIX + "distill_worker_restarts", "distill workers found dead and restarted")

    def decision(self, action: str, layers: int):
        if action != "hold":
            self.decisions.inc(1, {"action": action})
        self.target.set(layers)
        self.target_ratio.set(layers / self.num_layers)

    def load(self, queue: float, replicas: int, published: int):
        self.load_queue.set(queue)
        self.replicas.set(replicas)
        self.published.set(published)

    def distill(self, worker: str, status: dict):
        tags = {"worker": worker}
        if status.get("layer") is not None:
            self.distill_layer.set(status["layer"], tags)
        steps, step = status.get("steps"), status.get("step")
        if steps:
            self.distill_progress.set(min(1.0, (step or 0) / steps), tags)
        if status.get("loss") is not None:
            self.distill_loss.set(float(status["loss"]), tags)
