"""OpenTelemetry traces of the request path, received by a real OTLP/HTTP receiver on loopback
(`tests.otlp_receiver`), from the ingress in-process in front of engine doubles."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator

import httpx
import pytest
from opentelemetry.proto.trace.v1.trace_pb2 import Span as ProtoSpan
from opentelemetry.proto.trace.v1.trace_pb2 import Status as ProtoStatus

from app.config import ConfigError, load_config
from app.config.tracing import TracingSettings
from app.ingress.asgi import create_app
from app.ingress.gateway import Gateway
from app.observability.tracing import exporter_for
from tests.engine_double import TOKEN, EngineDouble, Stack
from tests.otlp_receiver import OtlpReceiver

pytestmark = pytest.mark.anyio
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{CLIENT_SPAN}-01"


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture
def receiver():
    with OtlpReceiver() as r:
        yield r


@contextlib.asynccontextmanager
async def traced_stack(
    cpu_model: dict, receiver: OtlpReceiver, **tracing: object
) -> AsyncIterator[tuple[httpx.AsyncClient, Gateway]]:
    extra = tracing.pop("extra", {})
    usage = tracing.pop("usage", None)  # the engine doubles' answers' usage
    config = load_config(
        {
            "models": [cpu_model],
            "tracing": {"endpoint": receiver.url, "service_name": "vrstack-test", **tracing},
            **extra,  # type: ignore[dict-item]
        }
    )
    engines = {m.name: EngineDouble(m.name) for m in config.models}
    for engine in engines.values():
        engine.usage = usage  # type: ignore[assignment]
    stack = await Stack(engines).start()
    gateway = Gateway(config, {}, token=TOKEN, routes=stack.get)
    transport = httpx.ASGITransport(app=create_app(gateway), raise_app_exceptions=False)
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://stack") as client:
            yield client, gateway
    finally:
        assert gateway.tracing is not None
        gateway.tracing.shutdown()
        await gateway.relay.close()
        await stack.stop()


def chat(model: str, stream: bool = True) -> dict:
    return {
        "model": model,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 3,
        "stream": stream,
    }


async def test_a_request_continues_the_clients_trace_with_its_routing_and_engine_spans(
    cpu_model, receiver
):
    async with traced_stack(cpu_model, receiver) as (client, gateway):
        r = await client.post(
            "/v1/chat/completions",
            json=chat(cpu_model["name"]),
            headers={"traceparent": TRACEPARENT},
        )
        assert r.status_code == 200
        gateway.tracing.force_flush()
    spans = {s.name: s for s in receiver.wait_for(2)}
    server, engine = spans["POST /v1/chat/completions"], spans["engine"]
    assert server.trace_id == engine.trace_id == TRACE_ID
    assert server.parent_id == CLIENT_SPAN  # the client's span is the parent
    assert engine.parent_id == server.span_id
    assert server.kind == ProtoSpan.SPAN_KIND_SERVER
    assert engine.kind == ProtoSpan.SPAN_KIND_CLIENT
    assert server.service == "vrstack-test"
    assert server.attributes["gen_ai.request.model"] == cpu_model["name"]
    assert server.attributes["http.response.status_code"] == 200
    assert server.attributes["vrstack.request_id"] == r.headers["x-request-id"]
    assert engine.attributes["vrstack.route.policy"] == r.headers["x-route-policy"]
    assert engine.attributes["vrstack.route.replica"] == r.headers["x-route-replica"]
    assert engine.attributes["vrstack.route.reason"] == r.headers["x-route-reason"]
    assert "first_token" in engine.events


async def test_a_receipt_and_the_cached_tokens_are_span_attributes(cpu_model, receiver):
    usage = {"prompt_tokens": 100, "completion_tokens": 2,
             "prompt_tokens_details": {"cached_tokens": 64}}  # fmt: skip
    async with traced_stack(cpu_model, receiver, usage=usage) as (client, gateway):
        r = await client.post(
            "/v1/completions",
            json={"model": cpu_model["name"], "prompt": "x" * 400, "max_tokens": 2},
            headers={"x-route-receipt": "1"},
        )
        assert r.status_code == 200
        gateway.tracing.force_flush()
    spans = {s.name: s for s in receiver.wait_for(2)}
    attributes = spans["engine"].attributes
    assert attributes["vrstack.route.receipt"] == r.headers["x-route-receipt"]
    predicted = json.loads(r.headers["x-route-receipt"])["predicted_cached_tokens"]
    assert attributes["vrstack.route.predicted_cached_tokens"] == predicted
    server = spans["POST /v1/completions"].attributes
    assert server["gen_ai.usage.input_tokens"] == 100
    assert server["vrstack.usage.cached_tokens"] == 64


async def test_a_request_without_traceparent_starts_a_trace_and_errors_are_marked(
    cpu_model, receiver
):
    async with traced_stack(cpu_model, receiver) as (client, gateway):
        ok = await client.post("/v1/chat/completions", json=chat(cpu_model["name"], False))
        missing = await client.post("/v1/chat/completions", json=chat("no-such-model", False))
        assert (ok.status_code, missing.status_code) == (200, 404)
        gateway.tracing.force_flush()
    spans = receiver.wait_for(3)
    servers = [s for s in spans if s.name == "POST /v1/chat/completions"]
    assert sorted(s.attributes["http.response.status_code"] for s in servers) == [200, 404]
    assert all(s.parent_id == "" for s in servers)  # roots: no client trace
    assert len({s.trace_id for s in servers}) == 2
    refused = next(s for s in servers if s.attributes["http.response.status_code"] == 404)
    assert not [s for s in spans if s.trace_id == refused.trace_id and s.name == "engine"]
    assert refused.status_code == ProtoStatus.STATUS_CODE_UNSET  # a 4xx is the client's


async def test_sampling_follows_the_ratio_and_the_clients_decision(cpu_model, receiver):
    async with traced_stack(cpu_model, receiver, sample_ratio=0.0) as (client, gateway):
        body = chat(cpu_model["name"], False)
        await client.post("/v1/chat/completions", json=body)  # not sampled: ratio 0
        await client.post(
            "/v1/chat/completions", json=body, headers={"traceparent": TRACEPARENT}
        )  # sampled by the client (flags 01)
        gateway.tracing.force_flush()
    spans = receiver.wait_for(2)
    assert {s.trace_id for s in spans} == {TRACE_ID}


async def test_with_tenants_the_engine_span_shows_the_policy_only(cpu_model, receiver):
    extra = {"tenants": [{"name": "a", "api_keys": ["sk-tenant-a"]}]}
    async with traced_stack(cpu_model, receiver, extra=extra) as (client, gateway):
        r = await client.post(
            "/v1/chat/completions",
            json=chat(cpu_model["name"]),
            headers={"authorization": "Bearer sk-tenant-a"},
        )
        assert r.status_code == 200
        gateway.tracing.force_flush()
    spans = {s.name: s for s in receiver.wait_for(2)}
    engine = spans["engine"]
    assert "vrstack.route.policy" in engine.attributes
    assert not {"vrstack.route.replica", "vrstack.route.reason"} & set(engine.attributes)
    assert spans["POST /v1/chat/completions"].attributes["vrstack.tenant"] == "a"


def test_tracing_settings_are_checked_and_both_transports_build():
    with pytest.raises(ConfigError, match="tracing"):
        load_config({"models": [{"name": "m", "source": "org/m"}], "tracing": {"endpoint": "x"}})
    with pytest.raises(ConfigError, match="sample_ratio"):
        load_config(
            {
                "models": [{"name": "m", "source": "org/m"}],
                "tracing": {"endpoint": "http://c:4318", "sample_ratio": 2},
            }
        )
    http = exporter_for(TracingSettings(endpoint="http://c:4318"))
    grpc = exporter_for(TracingSettings(endpoint="http://c:4317", protocol="grpc"))
    assert type(http).__module__.endswith("http.trace_exporter")
    assert type(grpc).__module__.endswith("grpc.trace_exporter")
    http.shutdown()
    grpc.shutdown()
