"""The Grafana dashboard of the stack, built from the ingress's metrics (docs/metrics.md).

Written to docs/grafana/vrstack-dashboard.json and, as a ConfigMap labelled
`grafana_dashboard: "1"` (Grafana's dashboard sidecar picks those up), to
kuberay/grafana-dashboard.yaml; `vrstack k8s render --all` writes both and `--check` compares.
Every panel's PromQL is evaluated against a real Prometheus in
tests/e2e/prometheus_panels.py.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

UID = "vrstack-overview"
TITLE = "vllm-ray-stack"
JSON_PATH = Path("docs/grafana/vrstack-dashboard.json")
CONFIGMAP_NAME = "vrstack-grafana-dashboard"
CONFIGMAP_KEY = "vrstack-dashboard.json"
CONFIGMAP_FILE = "grafana-dashboard.yaml"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
MODEL = 'model=~"$model"'
WINDOW = "1m"  # rate window; Prometheus scrapes the stack every 15 s in kuberay/


@dataclass(frozen=True)
class Panel:
    title: str
    targets: tuple[tuple[str, str], ...]  # (PromQL, legend)
    unit: str = "short"
    kind: str = "timeseries"
    description: str = ""


def _sel(metric: str) -> str:
    """The metric for the models picked in the dashboard's `model` variable."""
    return f"{metric}{{{MODEL}}}"


def _rate(metric: str) -> str:
    return f"rate({_sel(metric)}[{WINDOW}])"


def _quantiles(metric: str) -> tuple[tuple[str, str], ...]:
    return tuple(
        (
            f"histogram_quantile({q}, sum by (le, model) ({_rate(metric + '_bucket')}))",
            f"p{int(q * 100)} {{{{model}}}}",
        )
        for q in (0.5, 0.99)
    )


def _route_tokens(kinds: str) -> str:
    """Per model and policy, the rate of the route prediction checks' tokens of `kinds`."""
    selector = f'vrstack_route_cached_tokens_total{{{MODEL},kind=~"{kinds}"}}'
    return f"sum by (model, policy) (rate({selector}[{WINDOW}]))"


PER_REPLICA = "{{model}} {{replica}}"
PANELS: tuple[Panel, ...] = (
    Panel(
        "Available instances",
        ((f"sum by (model) ({_sel('vrstack_model_replicas_available')})", "{{model}}"),),
        kind="stat",
        description="Engine replicas in RUNNING state per model (Ray Serve).",
    ),
    Panel(
        "Request rate",
        (
            (
                f"sum by (model, status) ({_rate('vrstack_requests_total')})",
                "{{model}} {{status}}",
            ),
        ),
        unit="reqps",
        description="Requests per second to the OpenAI endpoints, by model and HTTP status.",
    ),
    Panel(
        "Request latency (p50, p99)",
        _quantiles("vrstack_request_latency_seconds"),
        unit="s",
        description="End-to-end latency at the ingress (to the last byte of a stream).",
    ),
    Panel(
        "Time to first token (p50, p99)",
        _quantiles("vrstack_time_to_first_token_seconds"),
        unit="s",
        description="Streams: from the request's arrival to the first chunk with text.",
    ),
    Panel(
        "Inter-token latency (p50, p99)",
        _quantiles("vrstack_inter_token_latency_seconds"),
        unit="s",
        description="Streams: time between consecutive chunks with text.",
    ),
    Panel(
        "Token throughput",
        (
            (f"sum by (model) ({_rate('vrstack_prompt_tokens_total')})", "prompt {{model}}"),
            (f"sum by (model) ({_rate('vrstack_output_tokens_total')})", "output {{model}}"),
        ),
        description="Prompt and output tokens per second.",
    ),
    Panel(
        "Running and pending requests",
        (
            (
                f"sum by (model, replica) ({_sel('vrstack_engine_requests_running')})",
                "running " + PER_REPLICA,
            ),
            (
                f"sum by (model, replica) ({_sel('vrstack_engine_requests_waiting')})",
                "pending " + PER_REPLICA,
            ),
            ("sum by (endpoint) (vrstack_requests_in_flight)", "ingress {{endpoint}}"),
        ),
        description="Per replica: requests the engine runs and requests in its queue; "
        "per endpoint: requests the ingress is answering.",
    ),
    Panel(
        "KV-cache usage",
        (
            (
                f"max by (model, replica) ({_sel('vrstack_engine_kv_cache_usage_ratio')})",
                PER_REPLICA,
            ),
        ),
        unit="percentunit",
        description="Fraction of each replica's KV-cache blocks in use.",
    ),
    Panel(
        "Prefix-cache hit rate",
        (
            (
                f"max by (model, replica) ({_sel('vrstack_engine_prefix_cache_hit_rate')})",
                "recent " + PER_REPLICA,
            ),
            (
                f"sum by (model) ({_rate('vrstack_engine_prefix_cache_hits_tokens_total')}) / "
                f"sum by (model) ({_rate('vrstack_engine_prefix_cache_queries_tokens_total')})",
                "{{model}} over " + WINDOW,
            ),
        ),
        unit="percentunit",
        description="Prompt tokens found in the prefix cache / prompt tokens looked up.",
    ),
    Panel(
        "Routing decisions",
        (
            (
                "sum by (model, policy, reason, replica) "
                f"({_rate('vrstack_routing_decisions_total')})",
                "{{policy}} {{reason}} -> {{replica}}",
            ),
        ),
        unit="reqps",
        description="Replica choices per second by policy, reason and replica.",
    ),
    Panel(
        "Routing prediction error",
        (
            (
                f"{_route_tokens('overpredicted|underpredicted')} / {_route_tokens('prompt')}",
                "error {{model}} {{policy}}",
            ),
            (
                f"{_route_tokens('overpredicted')} / {_route_tokens('prompt')}",
                "stale {{model}} {{policy}}",
            ),
        ),
        unit="percentunit",
        description="Cached tokens the router predicted wrongly (|predicted - realised|), and "
        "the part it predicted but the engine no longer held (a stale index), over the prompt "
        "tokens of the answers checked (docs/routing.md, route receipts).",
    ),
    Panel(
        "LoRA adapters",
        (
            (
                f"count by (model, adapter) ({_sel('vrstack_lora_adapter_held')})",
                "held {{model}} {{adapter}}",
            ),
            (f"sum by (model) ({_rate('vrstack_lora_adapter_loads_total')})", "loads/s {{model}}"),
            (
                f"sum by (model) ({_rate('vrstack_lora_adapter_unloads_total')})",
                "unloads/s {{model}}",
            ),
        ),
        description="Replicas holding each LoRA adapter, and adapter loads and unloads per "
        "second (a steady unload rate: more adapters in use than replicas hold; raise "
        "max_adapters_per_replica).",
    ),
)


def expressions() -> list[str]:
    """Every panel's PromQL (with the dashboard's variables still in it)."""
    return [expr for panel in PANELS for expr, _ in panel.targets]


def _panel(index: int, panel: Panel) -> dict[str, Any]:
    width = 12 if panel.kind == "timeseries" else 6
    row, col = divmod(index, 2)
    return {
        "id": index + 1,
        "type": panel.kind,
        "title": panel.title,
        "description": panel.description,
        "datasource": DATASOURCE,
        "gridPos": {"h": 8, "w": width, "x": col * 12, "y": row * 8},
        "fieldConfig": {"defaults": {"unit": panel.unit}, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom"}}
        if panel.kind == "timeseries"
        else {"reduceOptions": {"calcs": ["lastNotNull"]}, "colorMode": "value"},
        "targets": [
            {
                "refId": chr(ord("A") + i),
                "expr": expr,
                "legendFormat": legend,
                "datasource": DATASOURCE,
            }
            for i, (expr, legend) in enumerate(panel.targets)
        ],
    }


def dashboard() -> dict[str, Any]:
    """The Grafana dashboard model (schema 39, Grafana 10+)."""
    return {
        "uid": UID,
        "title": TITLE,
        "description": "Requests, latency, TTFT, ITL, tokens, engine state and routing of a "
        "vllm-ray-stack (metrics: docs/metrics.md).",
        "tags": ["vllm", "ray-serve", "vllm-ray-stack"],
        "timezone": "browser",
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "refresh": "10s",
        "time": {"from": "now-1h", "to": "now"},
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "type": "datasource",
                    "query": "prometheus",
                    "label": "Data source",
                },
                {
                    "name": "model",
                    "type": "query",
                    "label": "Model",
                    "datasource": DATASOURCE,
                    "query": "label_values(vrstack_model_replicas_available, model)",
                    "refresh": 2,
                    "includeAll": True,
                    "multi": True,
                    "allValue": ".*",
                    "current": {"text": "All", "value": "$__all"},
                },
            ]
        },
        "panels": [_panel(i, p) for i, p in enumerate(PANELS)],
    }


def dashboard_json() -> str:
    """The dashboard as the JSON text that is checked in (deterministic)."""
    return json.dumps(dashboard(), indent=2, sort_keys=True) + "\n"


def configmap() -> dict[str, Any]:
    """The dashboard as a ConfigMap for Grafana's dashboard sidecar."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": CONFIGMAP_NAME,
            "labels": {"app.kubernetes.io/name": "vllm-ray-stack", "grafana_dashboard": "1"},
        },
        "data": {CONFIGMAP_KEY: dashboard_json()},
    }
