"""Prometheus metrics of the ingress (`GET /metrics`); every metric is listed in docs/metrics.md.

One `CollectorRegistry` per ingress process (never prometheus-client's global one, which Ray and
vLLM fill too). Two sources, each measuring what it holds:

- The ingress's HTTP path (`StackMetrics.finish`, called once per request with what the path
  already knows): requests by status, latency, time to the answer's first byte, routing
  decisions; requests in flight; with tenants configured, per tenant (`tenant_finish`):
  requests, tokens and refusals by a quota; and fair admission's queue time, refusals and
  preemptions (`tenant_queued`, `tenant_queue_rejected`, `tenant_preempted`).
- The engine replicas, through the routing stats Serve brings to the ingress's request routers
  (`EngineCollector`, read at scrape time): each replica's scheduler state (running, waiting,
  KV usage, prefix-cache hits; also under production-stack's `vllm:` names), and its per-token
  figures (`app.engines.request_meter`: inter-token latency, prompt and output tokens), summed
  over the model's replicas, those gone included.
- The request routers' KV event feeds, with a policy that reads them (`KvFeedCollector`): event
  batches and events taken, gaps replayed, indexes dropped.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any, get_args

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.utils import floatToGoString

from app.config import StackConfig
from app.engines.http_server import Usage
from app.engines.items import Endpoint
from app.engines.request_meter import ITL_BUCKETS
from app.observability.receipts import PredictionCheck, check_prediction
from app.routing import Decision

PREFIX = "vrstack_"
ENDPOINT_NAMES = tuple(sorted(get_args(Endpoint)))  # every endpoint's series from the start
UNKNOWN_MODEL = "unknown"
NO_TENANT = "anonymous"  # the tenant label of callers without a tenant
CLIENT_LEFT = 499  # the status counted for a request whose client left before its answer
QUOTAS = ("requests_per_second", "tokens_per_minute", "tokens_per_day", "max_concurrent")
TOKEN_KINDS = ("prompt", "output", "estimated")
MIGRATION_OUTCOMES = ("continued", "failed")
QUEUE_REASONS = ("queue_full", "expired")  # why fair admission refused a request
QUEUE_BUCKETS = (0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120)
LATENCY_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)
ERROR_BUCKETS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 10, 20, 60)
ReplicaStats = Callable[[], dict[str, dict[str, dict[str, Any]]]]


class StackMetrics:
    """The ingress's metrics, in a registry of their own."""

    def __init__(self, config: StackConfig, replica_stats: ReplicaStats | None = None) -> None:
        from app.engines import router_registry

        self.config = config
        self.registry = r = CollectorRegistry()
        self.requests = Counter(
            PREFIX + "requests",
            "Requests to the OpenAI endpoints, by model, endpoint and HTTP status.",
            ["model", "endpoint", "status"],
            registry=r,
        )
        self.latency = Histogram(
            PREFIX + "request_latency_seconds",
            "End-to-end request latency at the ingress (to the last byte of a stream).",
            ["model", "endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            PREFIX + "time_to_first_token_seconds",
            "Streams: time from the request's arrival at the ingress to the answer's first byte.",
            ["model", "endpoint"],
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge(
            PREFIX + "requests_in_flight",
            "Requests this ingress is answering now, by endpoint.",
            ["endpoint"],
            registry=r,
        )
        self.routing = Counter(
            PREFIX + "routing_decisions",
            "Routing decisions by model, policy, reason kind and chosen replica.",
            ["model", "policy", "reason", "replica"],
            registry=r,
        )
        self.route_tokens = Counter(
            PREFIX + "route_cached_tokens",
            "Routing's cached-token predictions checked against the engines' answers, by model "
            "and policy: `prompt` tokens of the checked answers, cached tokens `predicted` by "
            "the chosen replica's match and `realised` (the engine's cached_tokens), and the "
            "`overpredicted` (stale index) and `underpredicted` (missing) parts of the error.",
            ["model", "policy", "kind"],
            registry=r,
        )
        self.route_error = Histogram(
            PREFIX + "route_prediction_error_ratio",
            "Per answer, |predicted - realised cached tokens| over its prompt tokens (routing "
            "regret from a wrong view of the caches), by model and policy.",
            ["model", "policy"],
            buckets=ERROR_BUCKETS,
            registry=r,
        )
        self.migrations = Counter(
            PREFIX + "stream_migrations",
            "Streams that broke after their first byte, by model and outcome: continued on "
            "another replica, or failed (ended with an error event).",
            ["model", "outcome"],
            registry=r,
        )
        self.replicas = Gauge(
            PREFIX + "model_replicas_available",
            "Engine replicas of the model in RUNNING state (Ray Serve).",
            ["model"],
            registry=r,
        )
        self.ready = Gauge(
            PREFIX + "model_ready",
            "1 when the model has a running replica (or scales from zero), else 0.",
            ["model"],
            registry=r,
        )
        for spec in config.models:  # every series exists from the start: rate() sees a first rise
            self.replicas.labels(spec.name).set(0)
            self.ready.labels(spec.name).set(0)
            for endpoint in ENDPOINT_NAMES:
                self.requests.labels(spec.name, endpoint, "200")
                self.latency.labels(spec.name, endpoint)
            for endpoint in ("completions", "chat"):
                self.ttft.labels(spec.name, endpoint)
            for outcome in MIGRATION_OUTCOMES:
                self.migrations.labels(spec.name, outcome)
        for endpoint in ENDPOINT_NAMES:
            self.in_flight.labels(endpoint).set(0)
        self._series: dict[tuple[str, str, int], tuple[Any, Any, Any]] = {}
        self.tenants = [t.name for t in config.tenants]
        if self.tenants:
            self._tenant_metrics(r)
        models = [spec.name for spec in config.models]
        self.engines = EngineCollector(replica_stats or router_registry.snapshot, models)
        r.register(self.engines)
        r.register(KvFeedCollector(router_registry.kv_counts))

    def model_label(self, name: str | None) -> str:
        """The canonical model for a name or alias; `unknown` otherwise (bounded labels)."""
        spec = self.config.model(name) if name else None
        return spec.name if spec is not None else UNKNOWN_MODEL

    def refresh(self, states: Any) -> None:
        """Set the per-model replica gauges (before a scrape) from `ModelState`s."""
        for state in states:
            self.replicas.labels(state.name).set(state.running_replicas)
            self.ready.labels(state.name).set(1 if state.ready or state.scales_to_zero else 0)

    def finish(
        self,
        model: str | None,
        endpoint: str,
        status: int,
        elapsed_s: float,
        *,
        ttft_s: float | None = None,
        decision: Decision | None = None,
        migration: str | None = None,
        usage: Usage | None = None,
    ) -> None:
        """Record one finished request (`migration`: the outcome of a stream that broke;
        `usage`: the answer's, to check the decision's cached-token prediction)."""
        label = self.model_label(model)
        key = (label, endpoint, status)
        series = self._series.get(key)
        if series is None:  # label lookups cost more than the updates: once per combination
            series = self._series[key] = (
                self.requests.labels(label, endpoint, str(status)),
                self.latency.labels(label, endpoint),
                self.ttft.labels(label, endpoint),
            )
        series[0].inc()
        series[1].observe(elapsed_s)
        if ttft_s is not None:
            series[2].observe(ttft_s)
        if decision is not None:
            kind = decision.reason.split("=", 1)[0] or "none"
            self.routing.labels(label, decision.policy, kind, decision.replica_id).inc()
            if migration is None and (check := check_prediction(decision.match, usage)):
                self._prediction(label, decision.policy, check)
        if migration is not None:
            self.migrations.labels(label, migration).inc()

    def _prediction(self, model: str, policy: str, check: PredictionCheck) -> None:
        tokens = self.route_tokens
        tokens.labels(model, policy, "prompt").inc(check.prompt)
        tokens.labels(model, policy, "predicted").inc(check.predicted)
        tokens.labels(model, policy, "realised").inc(check.realised)
        tokens.labels(model, policy, "overpredicted").inc(check.over)
        tokens.labels(model, policy, "underpredicted").inc(check.under)
        self.route_error.labels(model, policy).observe(check.error_share)

    def _tenant_metrics(self, r: CollectorRegistry) -> None:
        self.tenant_requests = Counter(
            PREFIX + "tenant_requests",
            "Requests to the OpenAI endpoints by tenant (`anonymous`: keys without one) and "
            "HTTP status.",
            ["tenant", "status"],
            registry=r,
        )
        self.tenant_tokens = Counter(
            PREFIX + "tenant_tokens",
            "Tokens charged to each tenant: `prompt` and `output` from the engine's usage when "
            "the ingress reads it (JSON answers), else the admission `estimated` total.",
            ["tenant", "kind"],
            registry=r,
        )
        self.tenant_rejections = Counter(
            PREFIX + "tenant_rejections",
            "Requests refused by a quota (requests_per_second, tokens_per_minute, "
            "tokens_per_day, max_concurrent), by tenant.",
            ["tenant", "quota"],
            registry=r,
        )
        self.tenant_queue_time = Histogram(
            PREFIX + "tenant_queue_seconds",
            "Time a request waited in its model's fair admission queue for an engine slot, by "
            "tenant (requests granted a slot).",
            ["tenant"],
            buckets=QUEUE_BUCKETS,
            registry=r,
        )
        self.tenant_queue_rejections = Counter(
            PREFIX + "tenant_queue_rejections",
            "Requests fair admission refused, by tenant and reason: queue_full (429, the "
            "tenant's queue is full) or expired (503, no slot within admission.max_wait_s).",
            ["tenant", "reason"],
            registry=r,
        )
        self.tenant_preemptions = Counter(
            PREFIX + "tenant_preemptions",
            "Streams of each tenant stopped for a more important waiter (they went on from "
            "their tokens when a slot was free).",
            ["tenant"],
            registry=r,
        )
        for tenant in (*self.tenants, NO_TENANT):  # every series exists from the start
            self.tenant_preemptions.labels(tenant)
            self.tenant_requests.labels(tenant, "200")
            for kind in TOKEN_KINDS:
                self.tenant_tokens.labels(tenant, kind)
            for quota in QUOTAS:
                self.tenant_rejections.labels(tenant, quota)
            self.tenant_queue_time.labels(tenant)
            for reason in QUEUE_REASONS:
                self.tenant_queue_rejections.labels(tenant, reason)

    def tenant_finish(
        self,
        tenant: str | None,
        status: int,
        usage: tuple[int, int] | None,
        lease: Any,
        quota: str | None,
    ) -> None:
        """Record one finished request of a tenant (None: a caller without one): its status,
        the tokens it was charged (`usage` when known, else the `lease`'s estimate) and the
        quota that refused it."""
        label = tenant or NO_TENANT
        self.tenant_requests.labels(label, str(status)).inc()
        if usage is not None:
            self.tenant_tokens.labels(label, "prompt").inc(usage[0])
            self.tenant_tokens.labels(label, "output").inc(usage[1])
        elif lease is not None and lease.tokens:
            self.tenant_tokens.labels(label, "estimated").inc(lease.tokens)
        if quota is not None:
            self.tenant_rejections.labels(label, quota).inc()

    def tenant_queued(self, tenant: str, waited_s: float) -> None:
        """A request of `tenant` (a name from the config, or `anonymous`) got its slot."""
        self.tenant_queue_time.labels(tenant).observe(waited_s)

    def tenant_preempted(self, tenant: str, times: int = 1) -> None:
        """A stream of `tenant` gave its engine slot up to a more important waiter `times`."""
        self.tenant_preemptions.labels(tenant).inc(times)

    def tenant_queue_rejected(self, tenant: str, reason: str) -> None:
        """Fair admission refused a request of `tenant`; `reason` is one of `QUEUE_REASONS`."""
        self.tenant_queue_rejections.labels(tenant, reason).inc()

    def status(self) -> dict[str, Any]:
        """In-flight requests of this ingress and each replica's engine state, as plain data."""
        engines = self.engines.read()
        return {
            "in_flight": {
                sample.labels["endpoint"]: int(sample.value)
                for family in self.in_flight.collect()
                for sample in family.samples
            },
            "replicas": {spec.name: engines.get(spec.name, {}) for spec in self.config.models},
        }


class EngineCollector:
    """Per-replica engine state and per-model token figures at scrape time (from the routers'
    view of the replicas)."""

    GAUGES = (
        # (stat key, our name, production-stack name or None, help)
        ("running", "engine_requests_running", "vllm:num_requests_running",
         "Requests the replica's engine is running (decoding or prefilling)."),
        ("queued", "engine_requests_waiting", "vllm:num_requests_waiting",
         "Requests waiting in the replica's engine queue."),
        ("in_flight", "engine_requests_in_flight", None,
         "Requests inside the replica (from every ingress), waiting or running."),
        ("kv_usage", "engine_kv_cache_usage_ratio", "vllm:gpu_cache_usage_perc",
         "Fraction of the replica's KV-cache blocks in use (0-1)."),
        ("prefix_cache_hit_rate", "engine_prefix_cache_hit_rate", "vllm:gpu_prefix_cache_hit_rate",
         "Prefix-cache hit rate of the replica's recent requests (hit / queried tokens, 0-1)."),
    )  # fmt: skip
    COUNTERS = (
        ("prefix_cache_queries", "engine_prefix_cache_queries_tokens",
         "Prompt tokens looked up in the replica's prefix cache."),
        ("prefix_cache_hits", "engine_prefix_cache_hits_tokens",
         "Prompt tokens found in the replica's prefix cache."),
        ("lora_loads", "lora_adapter_loads", "LoRA adapters the replica loaded."),
        ("lora_unloads", "lora_adapter_unloads",
         "LoRA adapters the replica unloaded (least recently used, over its limit)."),
    )  # fmt: skip

    def __init__(self, source: ReplicaStats, models: list[str]) -> None:
        self.source = source
        self.models = models
        self.tokens = TokenFigures()

    def read(self) -> dict[str, dict[str, dict[str, Any]]]:
        try:
            return self.source()
        except Exception:  # never fail a scrape on a router being torn down
            return {}

    def describe(self) -> list[Metric]:
        return []  # collected only on scrape (not at registration)

    def collect(self) -> Iterator[Metric]:
        replicas = self.read()
        yield from self._gauges(replicas)
        for key, name, text in self.COUNTERS:
            counter = CounterMetricFamily(PREFIX + name, text, labels=["model", "replica"])
            for model, replica, values in _each(replicas):
                if key in values:
                    counter.add_metric([model, replica], float(values[key]))
            yield counter
        yield from self.tokens.families(replicas, self.models)
        held = GaugeMetricFamily(
            PREFIX + "lora_adapter_held",
            "1 for each LoRA adapter a replica holds.",
            labels=["model", "replica", "adapter"],
        )
        for model, replica, values in _each(replicas):
            for adapter in values.get("lora_adapters") or ():
                held.add_metric([model, replica, str(adapter)], 1.0)
        yield held

    def _gauges(self, replicas: dict[str, dict[str, dict[str, Any]]]) -> Iterator[Metric]:
        for key, name, compat, text in self.GAUGES:
            ours = GaugeMetricFamily(PREFIX + name, text, labels=["model", "replica"])
            theirs = GaugeMetricFamily(compat, text, labels=["model", "server"]) if compat else None
            for model, replica, values in _each(replicas):
                if key not in values:
                    continue
                ours.add_metric([model, replica], float(values[key]))
                if theirs is not None:
                    theirs.add_metric([model, replica], float(values[key]))
            yield ours
            if theirs is not None:
                yield theirs


class KvFeedCollector:
    """The KV event feeds of this ingress's routers, per model (`router_registry.kv_counts`)."""

    COUNTERS = (
        ("batches", "kv_event_batches", "KV cache event batches taken from the engines."),
        ("events", "kv_events", "KV cache events (blocks stored, removed, cleared) applied."),
        ("replays", "kv_event_replays", "Gaps in an engine's event batches asked back by replay."),
        ("resets", "kv_index_resets",
         "Replica indexes dropped and rebuilt (a gap the replay no longer held, an engine "
         "started again)."),
    )  # fmt: skip

    def __init__(self, source: Callable[[], dict[str, dict[str, int]]]) -> None:
        self.source = source

    def describe(self) -> list[Metric]:
        return []  # collected only on scrape

    def collect(self) -> Iterator[Metric]:
        try:
            counts = self.source()
        except Exception:  # never fail a scrape on a router being torn down
            counts = {}
        if not counts:
            return
        for key, name, text in self.COUNTERS:
            counter = CounterMetricFamily(PREFIX + name, text, labels=["model"])
            for model, values in sorted(counts.items()):
                counter.add_metric([model], float(values.get(key, 0)))
            yield counter


def _each(replicas: dict[str, dict[str, dict[str, Any]]]) -> Iterator[tuple[str, str, dict]]:
    for model, stats in sorted(replicas.items()):
        for replica, values in sorted(stats.items()):
            yield model, replica, values


class TokenFigures:
    """The replicas' per-token figures summed per model and endpoint. A replica's last report
    is kept when it goes, so the sums never fall (Prometheus would read a fall as a reset)."""

    FIELDS = ("prompt_tokens", "output_tokens", "itl_sum")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}  # (model, replica)

    def totals(
        self, replicas: dict[str, dict[str, dict[str, Any]]]
    ) -> dict[tuple[str, str], dict[str, Any]]:
        """(model, endpoint) -> summed figures (live replicas' reports and gone ones' last)."""
        with self._lock:
            for model, replica, values in _each(replicas):
                if isinstance(values.get("requests"), dict):
                    self._last[(model, replica)] = values["requests"]
            reports = list(self._last.items())
        out: dict[tuple[str, str], dict[str, Any]] = {}
        for (model, _replica), report in reports:
            for endpoint, figures in report.items():
                total = out.setdefault((model, endpoint), _empty())
                for field in self.FIELDS:
                    total[field] += figures.get(field, 0)
                counts = figures.get("itl_counts") or []
                for i, count in enumerate(counts[: len(total["itl_counts"])]):
                    total["itl_counts"][i] += count
        return out

    def families(
        self, replicas: dict[str, dict[str, dict[str, Any]]], models: list[str]
    ) -> Iterator[Metric]:
        totals = self.totals(replicas)
        for model in models:  # every series exists from the start
            for endpoint in ("completions", "chat"):
                totals.setdefault((model, endpoint), _empty())
        labels = ["model", "endpoint"]
        itl = HistogramMetricFamily(
            PREFIX + "inter_token_latency_seconds",
            "Streams: time between consecutive chunks of the engine's answer (measured at the "
            "engine replica).",
            labels=labels,
        )
        text = "tokens of answered requests (from the engine's usage)."
        prompt = CounterMetricFamily(PREFIX + "prompt_tokens", "Prompt " + text, labels=labels)
        output = CounterMetricFamily(PREFIX + "output_tokens", "Generated " + text, labels=labels)
        for (model, endpoint), total in sorted(totals.items()):
            cumulative, buckets = 0, []
            for bound, count in zip((*ITL_BUCKETS, float("inf")), total["itl_counts"], strict=True):
                cumulative += count
                buckets.append((floatToGoString(bound), cumulative))
            itl.add_metric([model, endpoint], buckets, sum_value=total["itl_sum"])
            prompt.add_metric([model, endpoint], total["prompt_tokens"])
            output.add_metric([model, endpoint], total["output_tokens"])
        yield from (itl, prompt, output)


def _empty() -> dict[str, Any]:
    return {
        "itl_counts": [0] * (len(ITL_BUCKETS) + 1),
        "itl_sum": 0.0,
        "prompt_tokens": 0,
        "output_tokens": 0,
    }
