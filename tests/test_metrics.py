"""GET /metrics and GET /status of the ingress, in-process, in front of simulated engines."""

from __future__ import annotations

import json
from types import SimpleNamespace

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from app.config import load_config
from app.engines import router_registry, stat_logger
from app.ingress.asgi import create_app
from app.ingress.gateway import Gateway
from app.ingress.readiness import Readiness
from app.observability.metrics import EngineCollector, RequestRecord, StackMetrics
from tests.engine_double import SimulatedEngine

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend():
    return "asyncio"


class UsageEngine(SimulatedEngine):
    """Streams chat chunks like vLLM: a role chunk, text chunks, then a usage chunk."""

    def remote(self, endpoint: str, body: dict, route: dict | None = None):
        self.calls.append((endpoint, body))
        if route is not None:
            route.update(replica_id="r-7", policy="prefix", reason="prefix-match=0.50")

        async def items():
            base = {"id": "c1", "object": "chat.completion.chunk", "model": body["model"]}
            yield {"sse": _sse({**base, "choices": [{"index": 0, "delta": {"role": "x"}}]})}
            for word in ("a", "b", "c", "d"):
                delta = {"index": 0, "delta": {"content": word}}
                yield {"sse": _sse({**base, "choices": [delta]})}
            usage = {"prompt_tokens": 11, "completion_tokens": 4, "total_tokens": 15}
            yield {"sse": _sse({**base, "choices": [], "usage": usage})}
            yield {"sse": "data: [DONE]\n\n"}

        return _Items(items())


class _Items:
    def __init__(self, gen) -> None:
        self._gen = gen

    def __aiter__(self):
        return self

    async def __anext__(self):
        return await self._gen.__anext__()

    def cancel(self) -> None:
        pass


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj)}\n\n"


CHAT = {"messages": [{"role": "user", "content": "hi"}]}
REPLICAS = {
    "smollm2": {
        "r-1": {
            "in_flight": 2,
            "running": 1,
            "queued": 1,
            "kv_usage": 0.25,
            "prefix_cache_queries": 100,
            "prefix_cache_hits": 40,
            "prefix_cache_hit_rate": 0.4,
        }
    }
}


def make(cpu_model, engine_cls=SimulatedEngine):
    config = load_config({"models": [cpu_model, {**cpu_model, "name": "second", "aliases": []}]})
    engines = {m.name: engine_cls(m.name) for m in config.models}
    ready = {"engine:smollm2": 2, "engine:second": 0}
    gateway = Gateway(config, engines, Readiness(lambda: ready, ttl_s=0))
    app = create_app(gateway)
    app.state.metrics.engines.source = lambda: REPLICAS  # what the routers would see
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    return httpx.AsyncClient(transport=transport, base_url="http://stack"), app


async def scrape(client) -> dict[str, list]:
    response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples: dict[str, list] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples


def value(samples, name, **labels) -> float:
    found = [
        v for lab, v in samples.get(name, []) if all(lab.get(k) == w for k, w in labels.items())
    ]
    assert found, f"{name}{labels} not in {samples.get(name)}"
    return sum(found)


async def test_plain_request_counts_latency_and_routing(cpu_model):
    client, _ = make(cpu_model)
    response = await client.post("/v1/completions", json={"model": "default", "prompt": "hi"})
    assert response.status_code == 200
    samples = await scrape(client)
    labels = {"model": "smollm2", "endpoint": "completions"}
    assert value(samples, "vrstack_requests_total", status="200", **labels) == 1
    assert value(samples, "vrstack_request_latency_seconds_count", **labels) == 1
    assert value(
        samples,
        "vrstack_routing_decisions_total",
        model="smollm2",
        policy="scored",
        reason="least-load",
        replica="smollm2-r1",
    ) == 1  # fmt: skip
    assert value(samples, "vrstack_requests_in_flight", endpoint="completions") == 0
    assert value(samples, "vrstack_model_replicas_available", model="smollm2") == 2
    assert value(samples, "vrstack_model_ready", model="second") == 0


async def test_errors_are_counted_with_their_status_and_bounded_model_label(cpu_model):
    client, _ = make(cpu_model)
    await client.post("/v1/completions", json={"model": "nope", "prompt": "hi"})
    await client.post("/v1/chat/completions", json={"model": "second", **CHAT})
    await client.post("/v1/completions", json={"model": "smollm2", "prompt": "x", "n": 99})
    samples = await scrape(client)
    assert value(samples, "vrstack_requests_total", model="unknown", status="404") == 1
    assert value(samples, "vrstack_requests_total", model="second", status="503") == 1
    assert value(samples, "vrstack_requests_total", model="smollm2", status="400") == 1


async def test_stream_without_usage_counts_text_chunks_ttft_and_itl(cpu_model):
    client, _ = make(cpu_model)
    body = {"model": "smollm2", "prompt": "hi", "stream": True}
    async with client.stream("POST", "/v1/completions", json=body) as response:
        text = "".join([chunk async for chunk in response.aiter_text()])
    assert text.endswith("data: [DONE]\n\n")
    samples = await scrape(client)
    labels = {"model": "smollm2", "endpoint": "completions"}
    assert value(samples, "vrstack_time_to_first_token_seconds_count", **labels) == 1
    assert value(samples, "vrstack_inter_token_latency_seconds_count", **labels) == 2  # 3 chunks
    assert value(samples, "vrstack_output_tokens_total", **labels) == 3
    assert value(samples, "vrstack_prompt_tokens_total", **labels) == 0  # no usage in the stream


async def test_stream_with_usage_takes_the_token_counts_from_it(cpu_model):
    client, _ = make(cpu_model, UsageEngine)
    body = {
        "model": "smollm2",
        "messages": [{"role": "user", "content": 'say "model": "x"'}],
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    response = await client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200
    samples = await scrape(client)
    labels = {"model": "smollm2", "endpoint": "chat"}
    assert value(samples, "vrstack_prompt_tokens_total", **labels) == 11
    assert value(samples, "vrstack_output_tokens_total", **labels) == 4
    assert value(samples, "vrstack_inter_token_latency_seconds_count", **labels) == 3
    assert value(samples, "vrstack_time_to_first_token_seconds_count", **labels) == 1
    assert value(samples, "vrstack_routing_decisions_total", reason="prefix-match") == 1


async def test_engine_state_per_replica_and_production_stack_names(cpu_model):
    client, _ = make(cpu_model)
    samples = await scrape(client)
    replica = {"model": "smollm2", "replica": "r-1"}
    assert value(samples, "vrstack_engine_requests_running", **replica) == 1
    assert value(samples, "vrstack_engine_requests_waiting", **replica) == 1
    assert value(samples, "vrstack_engine_requests_in_flight", **replica) == 2
    assert value(samples, "vrstack_engine_kv_cache_usage_ratio", **replica) == 0.25
    assert value(samples, "vrstack_engine_prefix_cache_hit_rate", **replica) == 0.4
    assert value(samples, "vrstack_engine_prefix_cache_hits_tokens_total", **replica) == 40
    assert value(samples, "vrstack_engine_prefix_cache_queries_tokens_total", **replica) == 100
    server = {"model": "smollm2", "server": "r-1"}
    assert value(samples, "vllm:num_requests_running", **server) == 1
    assert value(samples, "vllm:num_requests_waiting", **server) == 1
    assert value(samples, "vllm:gpu_cache_usage_perc", **server) == 0.25
    assert value(samples, "vllm:gpu_prefix_cache_hit_rate", **server) == 0.4


async def test_status_route(cpu_model):
    client, _ = make(cpu_model)
    body = (await client.get("/status")).json()
    smollm2, second = body["models"]
    assert smollm2["name"] == "smollm2" and smollm2["ready"] and smollm2["running_replicas"] == 2
    assert smollm2["replicas"]["r-1"]["kv_usage"] == 0.25
    assert second["ready"] is False and second["replicas"] == {}
    assert body["ingress_in_flight"]["chat"] == 0


def test_metrics_registry_is_per_instance(cpu_model):
    config = load_config({"models": [cpu_model]})
    one, two = StackMetrics(config, lambda: {}), StackMetrics(config, lambda: {})
    one.requests.labels("smollm2", "chat", "200").inc()
    labels = {"model": "smollm2", "endpoint": "chat", "status": "200"}
    assert one.registry.get_sample_value("vrstack_requests_total", labels) == 1
    assert two.registry.get_sample_value("vrstack_requests_total", labels) == 0  # pre-created


def test_json_answer_usage_and_model_are_read_without_matching_escaped_keys():
    record = RequestRecord("chat")
    record.on_start({"status": 200, "headers": [(b"content-type", b"application/json")]})
    answer = {
        "id": "x",
        "model": "smollm2",
        "choices": [{"message": {"content": 'a "usage": {"prompt_tokens": 99}'}}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 7},
    }
    record.on_body(json.dumps(answer).encode())
    record.on_end()
    assert record.model == "smollm2"
    assert record.tokens() == (5, 7)


def test_sse_events_split_across_chunks_are_joined():
    record = RequestRecord("completions")
    record.on_start({"status": 200, "headers": [(b"content-type", b"text/event-stream")]})
    event = _sse({"model": "m", "choices": [{"index": 0, "text": "hello"}]}).encode()
    record.on_body(event[:10])
    record.on_body(event[10:] + event)
    record.on_body(b"data: [DONE]\n\n")
    assert record.text_chunks == 2 and record.model == "m" and len(record.gaps) == 1


def test_engine_stats_follow_the_scheduler():
    engine = stat_logger.EngineStats(window=2)
    prefix = SimpleNamespace(reset=False, queries=100, hits=25)
    scheduler = SimpleNamespace(
        num_running_reqs=3, num_waiting_reqs=2, kv_cache_usage=0.5, prefix_cache_stats=prefix
    )
    engine.record(scheduler, None, engine_idx=0)
    engine.record(None, None)  # iteration-only update
    prefix2 = SimpleNamespace(reset=False, queries=100, hits=75)
    engine.record(
        SimpleNamespace(
            num_running_reqs=0, num_waiting_reqs=0, kv_cache_usage=0.0, prefix_cache_stats=prefix2
        ),
        None,
    )
    assert engine.as_dict() == {
        "running": 0,
        "queued": 0,
        "kv_usage": 0.0,
        "prefix_cache_queries": 200,
        "prefix_cache_hits": 100,
        "prefix_cache_hit_rate": 0.5,
    }
    # every engine series /metrics exports has a source: the engine's stats or the replica's count
    exported = {key for key, *_ in EngineCollector.GAUGES + EngineCollector.COUNTERS}
    assert exported == set(engine.as_dict()) | {"in_flight"}


def test_snapshot_reads_the_registered_routers_replicas():
    router_registry.forget_all()

    class Router:
        def __init__(self, replicas):
            self.curr_replicas = {
                rid: SimpleNamespace(replica_id=SimpleNamespace(unique_id=rid), routing_stats=s)
                for rid, s in replicas.items()
            }

    one = Router({"a": {"running": 1}, "b": None})
    router_registry.register("m", one)
    assert router_registry.snapshot() == {"m": {"a": {"running": 1}, "b": {}}}
    del one
    import gc

    gc.collect()
    assert router_registry.snapshot() == {"m": {}}
    router_registry.forget_all()
