"""The shipped Grafana dashboard is current and plots only metrics the app exports."""
from __future__ import annotations

import json
import re

from deploy import grafana_dashboard, metrics


def exported_names() -> set[str]:
    """Names as Ray's Prometheus endpoint shows them (ray_ prefix, counters _total, histogram series)."""
    src = open(metrics.__file__).read()
    names = set()
    for kind, name in re.findall(r"(Gauge|Counter|Histogram)\(PREFIX \+ \"(\w+)\"", src):
        full = "ray_" + metrics.PREFIX + name
        names |= {full + "_total"} if kind == "Counter" else (
            {full + s for s in ("_bucket", "_sum", "_count")} if kind == "Histogram" else {full})
    for name in re.findall(r"g\(\"(\w+)\"", src):  # ReplicaMetrics' gauge shorthand
        names.add("ray_" + metrics.PREFIX + name)
    return names


def test_dashboard_json_is_generated_from_the_source():
    with open(grafana_dashboard.OUT) as f:
        assert json.load(f) == grafana_dashboard.dashboard()


def test_every_panel_uses_an_exported_metric():
    known = exported_names()
    assert "ray_dsla_serve_conversion_decisions_total" in known
    used = set()
    for p in grafana_dashboard.dashboard()["panels"]:
        for t in p["targets"]:
            used |= set(re.findall(r"ray_dsla_serve_\w+", t["expr"]))
    assert used and used <= known, used - known
