"""The Grafana dashboard: its panels, their PromQL, and the checked-in JSON and ConfigMap."""

from __future__ import annotations

import json
import re

import yaml

from app.k8s.validate import document_errors
from app.observability import dashboard
from tests.conftest import ROOT

PANEL_TITLES = {
    "Available instances",
    "Request rate",
    "Request latency (p50, p99)",
    "Time to first token (p50, p99)",
    "Inter-token latency (p50, p99)",
    "Token throughput",
    "Running and pending requests",
    "KV-cache usage",
    "Prefix-cache hit rate",
    "Routing decisions",
    "Routing prediction error",
    "LoRA adapters",
}


def test_panels_cover_the_issue_and_use_our_metrics():
    model = dashboard.dashboard()
    panels = model["panels"]
    assert {p["title"] for p in panels} == PANEL_TITLES
    assert len({p["id"] for p in panels}) == len(panels)
    for panel in panels:
        assert panel["targets"], panel["title"]
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        for target in panel["targets"]:
            assert "vrstack_" in target["expr"]
            assert target["legendFormat"] and target["refId"]
    exprs = " ".join(dashboard.expressions())
    for metric in (
        "vrstack_model_replicas_available",
        "vrstack_requests_total",
        "vrstack_request_latency_seconds_bucket",
        "vrstack_time_to_first_token_seconds_bucket",
        "vrstack_inter_token_latency_seconds_bucket",
        "vrstack_engine_requests_running",
        "vrstack_engine_requests_waiting",
        "vrstack_engine_kv_cache_usage_ratio",
        "vrstack_engine_prefix_cache_hit_rate",
        "vrstack_routing_decisions_total",
    ):
        assert metric in exprs, metric
    variables = {v["name"] for v in model["templating"]["list"]}
    assert variables == {"datasource", "model"}


def test_every_metric_the_dashboard_uses_is_documented():
    docs = (ROOT / "docs" / "metrics.md").read_text()
    names = {n for e in dashboard.expressions() for n in re.findall(r"vrstack_[a-z_]+", e)}
    assert len(names) >= 10
    for name in names:
        base = name.removesuffix("_bucket")
        assert f"`{base}`" in docs, base


def test_checked_in_json_and_configmap_hold_the_same_dashboard():
    text = (ROOT / dashboard.JSON_PATH).read_text()
    assert text == dashboard.dashboard_json(), "run `vrstack k8s render --all`"
    (configmap,) = [
        d
        for d in yaml.safe_load_all((ROOT / "kuberay" / dashboard.CONFIGMAP_FILE).read_text())
        if d
    ]
    assert configmap["kind"] == "ConfigMap"
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(configmap["data"][dashboard.CONFIGMAP_KEY]) == json.loads(text)
    assert document_errors(configmap, None) == []
