"""Writes deploy/grafana_dashboard.json: the Grafana dashboard for DSLA-Serve's metrics.

Generated rather than hand-edited so that every panel names a metric that
deploy/metrics.py really exports (tests/deploy/test_dashboard.py checks both).
Ray exports metrics with a `ray_` prefix and counters with a `_total` suffix.
Import the JSON in Grafana (Dashboards > Import) and pick the Prometheus data
source that scrapes Ray (`ray metrics launch-prometheus` sets one up).

    python -m deploy.grafana_dashboard   # rewrite the JSON after changing metrics
"""
from __future__ import annotations

import json
from pathlib import Path

OUT = Path(__file__).with_name("grafana_dashboard.json")
M = "ray_dsla_serve_"

# (title, unit, [(expr, legend)], panel width)
PANELS = [
    ("Conversion ratio: target and per replica", "percentunit",
     [(f"max({M}target_conversion_ratio)", "target"),
      (f"max by (replica) ({M}conversion_ratio)", "replica {{replica}}")], 12),
    ("DSLA layers", "none",
     [(f"max({M}target_dsla_layers)", "target"),
      (f"max by (replica) ({M}dsla_layers)", "replica {{replica}}"),
      (f"max({M}store_published_layers)", "published in the store")], 12),
    ("Conversion decisions / min", "none",
     [(f"sum by (action) (increase({M}conversion_decisions_total[1m]))", "{{action}}")], 8),
    ("Queue depth and running requests", "none",
     [(f"sum by (replica) ({M}queue_depth)", "waiting {{replica}}"),
      (f"sum by (replica) ({M}running_requests)", "running {{replica}}"),
      (f"max({M}controller_queue_depth)", "seen by the policy")], 8),
    ("Waiting prompt tokens", "none",
     [(f"sum by (replica) ({M}waiting_prompt_tokens)", "{{replica}}")], 8),
    ("Cache use", "percentunit", [(f"max by (replica) ({M}cache_usage)", "{{replica}}")], 8),
    ("Capacity: 4K-token sequences that fit", "none", [(f"sum by (replica) ({M}capacity_4k)", "{{replica}}")], 8),
    ("Generated tokens / s", "none",
     [(f"sum(rate({M}generated_tokens_total[1m]))", "all replicas"),
      (f"sum by (replica) (rate({M}generated_tokens_total[1m]))", "{{replica}}")], 8),
    ("Time to first token", "s",
     [(f"histogram_quantile(0.5, sum by (le) (rate({M}ttft_seconds_bucket[1m])))", "p50"),
      (f"histogram_quantile(0.9, sum by (le) (rate({M}ttft_seconds_bucket[1m])))", "p90"),
      (f"histogram_quantile(0.99, sum by (le) (rate({M}ttft_seconds_bucket[1m])))", "p99")], 12),
    ("Time per output token", "s",
     [(f"histogram_quantile(0.5, sum by (le) (rate({M}tpot_seconds_bucket[1m])))", "p50"),
      (f"histogram_quantile(0.9, sum by (le) (rate({M}tpot_seconds_bucket[1m])))", "p90"),
      (f"histogram_quantile(0.99, sum by (le) (rate({M}tpot_seconds_bucket[1m])))", "p99")], 12),
    ("Requests / s by finish reason", "reqps",
     [(f"sum by (finish_reason) (rate({M}requests_total[1m]))", "{{finish_reason}}")], 8),
    ("Hot swaps / min", "none", [(f"sum by (replica) (increase({M}swaps_total[1m]))", "{{replica}}")], 8),
    ("Layer store version per replica", "none", [(f"max by (replica) ({M}store_version)", "{{replica}}")], 8),
    ("Distillation: layer in training and progress", "none",
     [(f"max by (worker) ({M}distill_layer)", "layer ({{worker}})"),
      (f"max by (worker) ({M}distill_progress)", "progress of the layer ({{worker}})")], 12),
    ("Distillation loss and worker restarts", "none",
     [(f"max by (worker) ({M}distill_loss)", "loss ({{worker}})"),
      (f"sum({M}distill_worker_restarts_total)", "restarts")], 12),
]


def panel(i: int, title: str, unit: str, targets, width: int, x: int, y: int) -> dict:
    return {
        "id": i + 1, "type": "timeseries", "title": title,
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "gridPos": {"h": 8, "w": width, "x": x, "y": y},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom"}, "tooltip": {"mode": "multi"}},
        "targets": [{"refId": chr(ord("A") + j), "expr": expr, "legendFormat": legend,
                     "datasource": {"type": "prometheus", "uid": "${datasource}"}}
                    for j, (expr, legend) in enumerate(targets)],
    }


def dashboard() -> dict:
    panels, x, y = [], 0, 0
    for i, (title, unit, targets, width) in enumerate(PANELS):
        if x + width > 24:
            x, y = 0, y + 8
        panels.append(panel(i, title, unit, targets, width, x, y))
        x += width
    return {
        "title": "DSLA-Serve", "uid": "dsla-serve", "schemaVersion": 39, "version": 1, "editable": True,
        "tags": ["dsla-serve", "ray", "serve"], "time": {"from": "now-30m", "to": "now"}, "refresh": "10s",
        "templating": {"list": [{"name": "datasource", "type": "datasource", "query": "prometheus",
                                 "label": "Prometheus", "current": {}}]},
        "panels": panels,
    }


def main():
    OUT.write_text(json.dumps(dashboard(), indent=1) + "\n")
    print(OUT)


if __name__ == "__main__":
    main()
