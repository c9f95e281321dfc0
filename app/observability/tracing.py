"""OpenTelemetry traces of the request path, exported by OTLP (`tracing` in the config).

One trace per HTTP request to an OpenAI endpoint, continuing the client's `traceparent` when it
sends one (W3C Trace Context):

    POST /v1/chat/completions   (server span: model, tenant, status, usage)
    ├── admission               (with tenants: the wait for an engine slot in fair order)
    └── engine                  (client span, one per attempt: the routing decision as
                                 attributes, the replica, the `first_token` event; the
                                 engine request carries this span's `traceparent`)

Without `tracing` configured nothing here runs on the request path (`RequestTrace` is None).
Spans leave in batches from a background thread (OpenTelemetry's `BatchSpanProcessor`), so a
slow or absent receiver never holds a request; `Tracing.shutdown` flushes what is left.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from app.config.tracing import TracingSettings
from app.engines.http_server import Usage
from app.observability.metrics import CLIENT_LEFT
from app.routing import Decision

__all__ = ["RequestTrace", "Span", "Tracing", "end_attempt", "exporter_for"]

_PROPAGATOR = TraceContextTextMapPropagator()
_CARRIED = (b"traceparent", b"tracestate")


def exporter_for(settings: TracingSettings) -> SpanExporter:
    """The OTLP exporter of `settings.protocol`, sending to `settings.endpoint`."""
    base = str(settings.endpoint).rstrip("/")
    headers = dict(settings.headers)
    if settings.protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        insecure = settings.endpoint.scheme == "http"
        return OTLPSpanExporter(endpoint=base, insecure=insecure, headers=headers or None)
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
        OTLPSpanExporter as HttpSpanExporter,
    )

    return HttpSpanExporter(endpoint=base + "/v1/traces", headers=headers)


class Tracing:
    """The ingress's tracer: `start` one `RequestTrace` per request; `shutdown` flushes."""

    def __init__(self, settings: TracingSettings, exporter: SpanExporter | None = None) -> None:
        self.settings = settings
        self.provider = TracerProvider(
            resource=Resource.create({"service.name": settings.service_name}),
            sampler=ParentBased(TraceIdRatioBased(settings.sample_ratio)),
        )
        self.provider.add_span_processor(
            BatchSpanProcessor(exporter or exporter_for(settings), schedule_delay_millis=1000)
        )
        self.tracer = self.provider.get_tracer("vrstack")

    def start(
        self, method: str, path: str, headers: Iterable[tuple[bytes, bytes]], request_id: str
    ) -> RequestTrace:
        """The server span of one request, a child of the client's `traceparent` if any."""
        carrier = {k.decode("latin-1"): v.decode("latin-1") for k, v in headers if k in _CARRIED}
        parent = _PROPAGATOR.extract(carrier) if carrier else None
        span = self.tracer.start_span(
            f"{method} {path}",
            context=parent,
            kind=SpanKind.SERVER,
            attributes={
                "http.request.method": method,
                "url.path": path,
                "vrstack.request_id": request_id,
            },
        )
        return RequestTrace(self.tracer, span)

    def force_flush(self, timeout_ms: int = 5000) -> bool:
        return self.provider.force_flush(timeout_ms)

    def shutdown(self) -> None:
        self.provider.shutdown()


class RequestTrace:
    """One request's spans (see the module docstring)."""

    __slots__ = ("_context", "_tracer", "span")

    def __init__(self, tracer: trace.Tracer, span: Span) -> None:
        self._tracer = tracer
        self.span = span
        self._context = trace.set_span_in_context(span, otel_context.Context())

    def request(self, model: str | None, tenant: str | None, stream: bool) -> None:
        """What the request asked for, once it is parsed."""
        if model is not None:
            self.span.set_attribute("gen_ai.request.model", model)
        if tenant is not None:
            self.span.set_attribute("vrstack.tenant", tenant)
        self.span.set_attribute("vrstack.stream", stream)

    def child(self, name: str, kind: SpanKind = SpanKind.INTERNAL, **attributes: Any) -> Span:
        """A span under the request's (the caller ends it)."""
        return self._tracer.start_span(name, self._context, kind, attributes=attributes)

    def admission(self, tenant: str, priority: int) -> Span:
        """The `admission` span: the wait for an engine slot (the caller ends it)."""
        return self.child("admission", **{"vrstack.tenant": tenant, "vrstack.priority": priority})

    def attempt(self, decision: Decision, attempt: int, url: str, private: bool) -> Span:
        """The `engine` span of one attempt, with the routing decision; `private` (tenants
        share the stack): the policy only, as in the `x-route-*` headers."""
        attributes: dict[str, Any] = {
            "vrstack.route.policy": decision.policy,
            "vrstack.attempt": attempt,
        }
        if not private:
            attributes["vrstack.route.replica"] = decision.replica_id
            attributes["vrstack.route.reason"] = decision.reason
            attributes["server.address"] = url
            receipt = decision.receipt
            if receipt is not None:  # asked for (app.routing.receipts), as compact JSON
                attributes["vrstack.route.receipt"] = json.dumps(
                    receipt.to_json(), separators=(",", ":")
                )
                attributes["vrstack.route.predicted_cached_tokens"] = (
                    receipt.predicted_cached_tokens
                )
        return self.child("engine", SpanKind.CLIENT, **attributes)

    @staticmethod
    def traceparent(span: Span) -> str:
        """The W3C `traceparent` of `span`, for the engine request."""
        carrier: dict[str, str] = {}
        _PROPAGATOR.inject(carrier, trace.set_span_in_context(span, otel_context.Context()))
        return carrier.get("traceparent", "")

    def end(self, status: int, usage: Usage | None = None) -> None:
        """End the request's span with its HTTP status (`CLIENT_LEFT`: the client left) and
        the answer's usage (prompt, completion and, when the engine said, cached tokens)."""
        span = self.span
        span.set_attribute("http.response.status_code", status)
        if usage is not None:
            span.set_attribute("gen_ai.usage.input_tokens", usage.prompt)
            span.set_attribute("gen_ai.usage.output_tokens", usage.completion)
            if usage.cached is not None:
                span.set_attribute("vrstack.usage.cached_tokens", usage.cached)
        if status >= 500 or status == CLIENT_LEFT:
            left = status == CLIENT_LEFT
            span.set_status(Status(StatusCode.ERROR, "the client left" if left else None))
        span.end()


def end_attempt(span: Span, answered: bool) -> None:
    """End an `engine` span: answered, or failed before answering (marked an error)."""
    if not answered:
        span.set_status(Status(StatusCode.ERROR, "failed before answering"))
    span.end()
