"""Prometheus metrics of the ingress (`GET /metrics`); every metric is listed in docs/metrics.md.

One `CollectorRegistry` per ingress process (never prometheus-client's global one, which Ray and
vLLM fill too). Three sources:

- `MetricsMiddleware` (ASGI) times every OpenAI request and reads what it needs from the
  response as it passes: the status, the `x-route-*` headers (routing decisions), the `model` and
  `usage` fields of a JSON answer, and for streams the time of each chunk that carries text
  (time to first token, inter-token latency) and the final `usage` chunk when the client asked
  for one (`stream_options.include_usage`), else one output token per text chunk.
- `EngineCollector` reads, at scrape time, each engine replica's last reported state (running,
  waiting, KV usage, prefix-cache hits; `app.engines.stats`), also under production-stack's
  `vllm:` names.
- `StackMetrics.refresh` sets the available replicas per model from the readiness cache.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.config import StackConfig

PREFIX = "vrstack_"
# Paths of the OpenAI endpoints -> the `endpoint` label.
ENDPOINTS = {
    "/v1/completions": "completions",
    "/completions": "completions",
    "/v1/chat/completions": "chat",
    "/chat/completions": "chat",
    "/v1/embeddings": "embeddings",
    "/embeddings": "embeddings",
    "/tokenize": "tokenize",
    "/v1/tokenize": "tokenize",
    "/detokenize": "detokenize",
    "/v1/detokenize": "detokenize",
}
UNKNOWN_MODEL = "unknown"
LATENCY_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 10, 20, 60)
ITL_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1, 2.5, 5)
_MODEL = re.compile(r'"model"\s*:\s*"')
_USAGE = re.compile(r'"usage"\s*:\s*\{')
_DECODER = json.JSONDecoder()
_MAX_BODY = 8 * 2**20  # JSON answers larger than this are not inspected for usage


class StackMetrics:
    """The ingress's metrics, in a registry of their own."""

    def __init__(
        self,
        config: StackConfig,
        replica_stats: Callable[[], dict[str, dict[str, dict[str, Any]]]] | None = None,
    ) -> None:
        from app.engines import router_registry

        self.config = config
        self.registry = CollectorRegistry()
        r = self.registry
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
            "Time from the request's arrival to the first chunk carrying text (streams).",
            ["model", "endpoint"],
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            PREFIX + "inter_token_latency_seconds",
            "Time between consecutive chunks carrying text (streams).",
            ["model", "endpoint"],
            buckets=ITL_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(
            PREFIX + "prompt_tokens",
            "Prompt tokens of answered requests (from `usage`).",
            ["model", "endpoint"],
            registry=r,
        )
        self.output_tokens = Counter(
            PREFIX + "output_tokens",
            "Generated tokens (from `usage`, else one per streamed text chunk).",
            ["model", "endpoint"],
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
            for endpoint in sorted(set(ENDPOINTS.values())):
                self.requests.labels(spec.name, endpoint, "200")
                self.latency.labels(spec.name, endpoint)
            for endpoint in ("completions", "chat"):
                for metric in (self.ttft, self.itl, self.prompt_tokens, self.output_tokens):
                    metric.labels(spec.name, endpoint)
        for endpoint in sorted(set(ENDPOINTS.values())):
            self.in_flight.labels(endpoint).set(0)
        self.engines = EngineCollector(replica_stats or router_registry.snapshot)
        r.register(self.engines)

    def model_label(self, name: str | None) -> str:
        """The canonical model for a name or alias; `unknown` otherwise (bounded labels)."""
        spec = self.config.model(name) if name else None
        return spec.name if spec is not None else UNKNOWN_MODEL

    async def refresh(self, readiness: Any) -> None:
        """Set the per-model replica gauges from the readiness cache (before a scrape)."""
        for spec in self.config.models:
            state = await readiness.state(spec)
            self.replicas.labels(spec.name).set(state.running_replicas)
            self.ready.labels(spec.name).set(1 if state.ready or state.scales_to_zero else 0)

    def finish(self, record: RequestRecord) -> None:
        """Record one finished request."""
        model = record.model_label(self)
        endpoint = record.endpoint
        self.requests.labels(model, endpoint, str(record.status)).inc()
        self.latency.labels(model, endpoint).observe(record.elapsed())
        if record.first_token_at is not None:
            self.ttft.labels(model, endpoint).observe(record.first_token_at - record.started)
        if record.gaps:
            itl = self.itl.labels(model, endpoint)
            for gap in record.gaps:
                itl.observe(gap)
        prompt, output = record.tokens()
        if prompt:
            self.prompt_tokens.labels(model, endpoint).inc(prompt)
        if output:
            self.output_tokens.labels(model, endpoint).inc(output)
        if record.route_policy and record.route_replica:
            self.routing.labels(
                model,
                record.route_policy,
                record.route_reason.split("=", 1)[0] or "none",
                record.route_replica,
            ).inc()

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


@dataclass
class RequestRecord:
    """What the middleware learns about one request while it passes."""

    endpoint: str
    started: float = field(default_factory=time.perf_counter)
    status: int = 500  # no response started: the app failed
    streaming: bool = False
    model: str | None = None
    route_policy: str = ""
    route_replica: str = ""
    route_reason: str = ""
    usage: dict[str, Any] | None = None
    text_chunks: int = 0
    first_token_at: float | None = None
    last_token_at: float | None = None
    gaps: list[float] = field(default_factory=list)
    request_body: list[bytes] = field(default_factory=list)
    response_body: list[bytes] = field(default_factory=list)
    response_size: int = 0
    _buffer: bytes = b""

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def model_label(self, metrics: StackMetrics) -> str:
        if self.model is None and self.request_body:  # no answer named it: ask the request
            self.model = _model_of(b"".join(self.request_body))
        return metrics.model_label(self.model)

    def tokens(self) -> tuple[int, int]:
        """(prompt, output) tokens: `usage` when known, else the streamed text chunks."""
        if self.usage:
            prompt = self.usage.get("prompt_tokens") or 0
            output = self.usage.get("completion_tokens") or 0
            return int(prompt), int(output)
        return 0, self.text_chunks

    # -- what passes ---------------------------------------------------------------------------
    def on_start(self, message: Message) -> None:
        self.status = int(message.get("status", 500))
        for key, value in message.get("headers") or []:
            if key == b"content-type":
                self.streaming = value.startswith(b"text/event-stream")
            elif key == b"x-route-policy":
                self.route_policy = value.decode("latin-1")
            elif key == b"x-route-replica":
                self.route_replica = value.decode("latin-1")
            elif key == b"x-route-reason":
                self.route_reason = value.decode("latin-1")

    def on_body(self, chunk: bytes) -> None:
        if not chunk:
            return
        if self.streaming:
            self._on_sse(chunk, time.perf_counter())
        elif self.response_size <= _MAX_BODY:
            self.response_body.append(chunk)
            self.response_size += len(chunk)

    def on_end(self) -> None:
        if self.streaming or not self.response_body or self.response_size > _MAX_BODY:
            return
        body = b"".join(self.response_body)
        self.response_body.clear()
        if self.status == 200:
            self.model = _model_of(body) or self.model
            self.usage = _usage_of(body)

    def _on_sse(self, chunk: bytes, now: float) -> None:
        data = self._buffer + chunk
        events = data.split(b"\n\n")
        self._buffer = events.pop()  # an incomplete event waits for the next chunk
        for event in events:
            for line in event.split(b"\n"):
                if not line.startswith(b"data:"):
                    continue
                payload = line[5:].strip()
                if not payload or payload == b"[DONE]":
                    continue
                self._on_event(payload, now)

    def _on_event(self, payload: bytes, now: float) -> None:
        try:
            event = json.loads(payload)
        except ValueError:
            return
        if not isinstance(event, dict):
            return
        if self.model is None and isinstance(event.get("model"), str):
            self.model = event["model"]
        if isinstance(event.get("usage"), dict):
            self.usage = event["usage"]
        if not any(_has_text(choice) for choice in event.get("choices") or ()):
            return
        self.text_chunks += 1
        if self.first_token_at is None:
            self.first_token_at = now
        elif self.last_token_at is not None:
            self.gaps.append(now - self.last_token_at)
        self.last_token_at = now


def _has_text(choice: Any) -> bool:
    if not isinstance(choice, dict):
        return False
    if choice.get("text"):
        return True
    delta = choice.get("delta")
    return isinstance(delta, dict) and bool(delta.get("content") or delta.get("reasoning_content"))


def _value_after(body: bytes, pattern: re.Pattern[str], *, last: bool) -> Any:
    """The JSON value after the first (or last) `"key": ` in a JSON text, without parsing the
    whole text (a key inside a string value is escaped, `\\"key\\"`, so it does not match)."""
    text = body.decode("utf-8", "replace")
    matches = list(pattern.finditer(text)) if last else [pattern.search(text)]
    match = matches[-1] if matches else None
    if match is None:
        return None
    try:
        value, _ = _DECODER.raw_decode(text, match.end() - 1)  # from the quote or brace
    except ValueError:
        return None
    return value


def _model_of(body: bytes) -> str | None:
    value = _value_after(body, _MODEL, last=False)
    return value if isinstance(value, str) else None


def _usage_of(body: bytes) -> dict[str, Any] | None:
    value = _value_after(body, _USAGE, last=True)
    return value if isinstance(value, dict) else None


class MetricsMiddleware:
    """Times and counts the OpenAI endpoints' requests (pure ASGI; streams pass untouched)."""

    def __init__(self, app: ASGIApp, *, metrics: StackMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        endpoint = ENDPOINTS.get(scope.get("path", "")) if scope["type"] == "http" else None
        if endpoint is None or scope.get("method") != "POST":
            await self.app(scope, receive, send)
            return
        record = RequestRecord(endpoint)
        gauge = self.metrics.in_flight.labels(endpoint)
        gauge.inc()

        async def receive_and_keep() -> Message:
            message = await receive()
            if message["type"] == "http.request" and len(record.request_body) < 64:
                record.request_body.append(message.get("body", b""))
            return message

        async def send_and_watch(message: Message) -> None:
            if message["type"] == "http.response.start":
                record.on_start(message)
            elif message["type"] == "http.response.body":
                record.on_body(message.get("body", b""))
                if not message.get("more_body", False):
                    record.on_end()
            await send(message)

        try:
            await self.app(scope, receive_and_keep, send_and_watch)
        finally:
            gauge.dec()
            try:
                self.metrics.finish(record)
            finally:
                record.request_body.clear()


class EngineCollector:
    """Per-replica engine state at scrape time (from the routers' view of the replicas)."""

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
    )  # fmt: skip

    def __init__(self, source: Callable[[], dict[str, dict[str, dict[str, Any]]]]) -> None:
        self.source = source

    def read(self) -> dict[str, dict[str, dict[str, Any]]]:
        try:
            return self.source()
        except Exception:  # never fail a scrape on a router being torn down
            return {}

    def describe(self) -> list[Metric]:
        return []  # collected only on scrape (not at registration)

    def collect(self) -> Iterator[Metric]:
        replicas = self.read()
        for key, name, compat, text in self.GAUGES:
            ours = GaugeMetricFamily(PREFIX + name, text, labels=["model", "replica"])
            theirs = GaugeMetricFamily(compat, text, labels=["model", "server"]) if compat else None
            for model, stats in sorted(replicas.items()):
                for replica, values in sorted(stats.items()):
                    if key not in values:
                        continue
                    ours.add_metric([model, replica], float(values[key]))
                    if theirs is not None:
                        theirs.add_metric([model, replica], float(values[key]))
            yield ours
            if theirs is not None:
                yield theirs
        for key, name, text in self.COUNTERS:
            counter = CounterMetricFamily(PREFIX + name, text, labels=["model", "replica"])
            for model, stats in sorted(replicas.items()):
                for replica, values in sorted(stats.items()):
                    if key in values:
                        counter.add_metric([model, replica], float(values[key]))
            yield counter
