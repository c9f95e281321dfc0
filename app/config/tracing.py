"""Where the request path's OpenTelemetry traces go (`tracing` in the config)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, HttpUrl

from app.config.models import StrictModel


class TracingSettings(StrictModel):
    """OTLP export of the ingress's spans (docs/observability.md#traces)."""

    endpoint: HttpUrl = Field(
        description="The OTLP receiver (a collector, Jaeger, Tempo...): its base URL, e.g. "
        "http://otel-collector:4318 for OTLP over HTTP or http://otel-collector:4317 for gRPC."
    )
    protocol: Literal["http/protobuf", "grpc"] = Field(
        "http/protobuf", description="OTLP's transport: `http/protobuf` (port 4318) or `grpc`."
    )
    service_name: str = Field(
        "vrstack", min_length=1, max_length=128, description="`service.name` of the spans."
    )
    sample_ratio: float = Field(
        1.0,
        ge=0,
        le=1,
        description="Share of new traces recorded; a client's `traceparent` decides for its own.",
    )
    headers: dict[str, str] = Field(
        default_factory=dict, description="Headers sent with each export (e.g. authorization)."
    )
