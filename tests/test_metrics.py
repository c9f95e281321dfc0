"""GET /metrics and GET /status of the ingress (in-process, in front of engine doubles), and the
per-token figures engine replicas report."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from prometheus_client.parser import text_string_to_metric_families

from app.config import load_config
from app.engines import router_registry, stat_logger
from app.engines.request_meter import RequestMeter
from app.observability.metrics import EngineCollector, StackMetrics, TokenFigures
from tests.test_ingress import make_client

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend():
    return "asyncio"


CHAT = {"messages": [{"role": "user", "content": "hi"}]}
ITL_COUNTS = [0, 0, 2, 1] + [0] * 10  # two gaps under 10 ms, one under 20 ms
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
            "requests": {
                "chat": {
                    "itl_counts": ITL_COUNTS,
                    "itl_sum": 0.03,
                    "prompt_tokens": 11,
                    "output_tokens": 4,
                }
            },
        }
    }
}


def make(cpu_model):
    """The ingress over engine doubles; `second` has no running replica."""
    config = {"models": [cpu_model, {**cpu_model, "name": "second", "aliases": []}]}
    return make_client(
        cpu_model, config=config, ready={"second": 0}, replica_stats=lambda: REPLICAS
    )


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
    async with make(cpu_model) as (client, _, _):
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
        assert value(samples, "vrstack_model_replicas_available", model="smollm2") == 1
        assert value(samples, "vrstack_model_ready", model="second") == 0


async def test_errors_are_counted_with_their_status_and_bounded_model_label(cpu_model):
    async with make(cpu_model) as (client, _, _):
        await client.post("/v1/completions", json={"model": "nope", "prompt": "hi"})
        await client.post("/v1/chat/completions", json={"model": "second", **CHAT})
        await client.post("/v1/completions", json={"model": "smollm2", "prompt": "x", "n": 99})
        samples = await scrape(client)
        assert value(samples, "vrstack_requests_total", model="unknown", status="404") == 1
        assert value(samples, "vrstack_requests_total", model="second", status="503") == 1
        assert value(samples, "vrstack_requests_total", model="smollm2", status="400") == 1


async def test_streams_time_their_first_byte_and_plain_answers_do_not(cpu_model):
    async with make(cpu_model) as (client, _, _):
        body = {"model": "smollm2", "prompt": "hi", "stream": True}
        async with client.stream("POST", "/v1/completions", json=body) as response:
            text = "".join([chunk async for chunk in response.aiter_text()])
        assert text.endswith("data: [DONE]\n\n")
        await client.post("/v1/completions", json={**body, "stream": False})
        samples = await scrape(client)
        labels = {"model": "smollm2", "endpoint": "completions"}
        assert value(samples, "vrstack_time_to_first_token_seconds_count", **labels) == 1
        assert value(samples, "vrstack_request_latency_seconds_count", **labels) == 2


async def test_per_token_figures_come_from_the_replicas_reports(cpu_model):
    async with make(cpu_model) as (client, _, _):
        samples = await scrape(client)
        labels = {"model": "smollm2", "endpoint": "chat"}
        assert value(samples, "vrstack_prompt_tokens_total", **labels) == 11
        assert value(samples, "vrstack_output_tokens_total", **labels) == 4
        assert value(samples, "vrstack_inter_token_latency_seconds_count", **labels) == 3
        assert (
            value(samples, "vrstack_inter_token_latency_seconds_bucket", le="0.01", **labels) == 2
        )
        zero = {"model": "second", "endpoint": "completions"}
        assert value(samples, "vrstack_output_tokens_total", **zero) == 0  # exists from the start


async def test_engine_state_per_replica_and_production_stack_names(cpu_model):
    async with make(cpu_model) as (client, _, _):
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
    async with make(cpu_model) as (client, _, _):
        body = (await client.get("/status")).json()
        smollm2, second = body["models"]
        assert smollm2["name"] == "smollm2" and smollm2["ready"]
        assert smollm2["running_replicas"] == 1
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


def test_token_sums_keep_a_gone_replicas_last_report():
    figures = TokenFigures()
    report = {"chat": {"output_tokens": 5, "prompt_tokens": 2, "itl_sum": 0.5, "itl_counts": []}}
    both = {"m": {"a": {"requests": report}, "b": {"requests": report}}}
    assert figures.totals(both)[("m", "chat")]["output_tokens"] == 10
    assert figures.totals({"m": {"b": {"requests": report}}})[("m", "chat")]["output_tokens"] == 10


async def _sse_of(events: list[str]):
    yield events


async def _metered(meter: RequestMeter, events: list[str], keep_usage: bool) -> list[bytes]:
    return [chunk async for chunk in meter.sse("chat", _sse_of(events), keep_usage=keep_usage)]


@pytest.mark.parametrize("separators", [(",", ":"), (", ", ": ")])
async def test_the_meter_counts_usage_and_drops_it_unless_asked(separators):
    def event(obj: dict) -> str:
        return "data: " + json.dumps(obj, separators=separators) + "\n\n"

    text = [event({"choices": [{"delta": {"content": f'say "usage": {{ {i}'}}]}) for i in range(3)]
    usage = event({"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 3}})
    stream = [*text, usage, "data: [DONE]\n\n"]
    meter = RequestMeter()
    done = b": vrstack-usage 7 3\n\ndata: [DONE]\n\n"  # the usage for the ingress, with [DONE]
    dropped = await _metered(meter, stream, keep_usage=False)
    assert dropped == [*(e.encode() for e in text), done]
    kept = await _metered(meter, stream, keep_usage=True)
    assert kept == [*(e.encode() for e in [*text, usage]), done]
    assert await _metered(RequestMeter(), [*text, "data: [DONE]\n\n"], keep_usage=True) == [
        e.encode() for e in [*text, "data: [DONE]\n\n"]
    ]  # no usage chunk: no comment
    figures = meter.snapshot()["chat"]
    assert (figures["prompt_tokens"], figures["output_tokens"]) == (14, 6)
    assert sum(figures["itl_counts"]) == 4  # 2 gaps between 3 text chunks, twice


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
    lora = {"lora_loads", "lora_unloads"}  # a LoRA model's replicas (`AdapterSlots.stats`)
    assert exported == set(engine.as_dict()) | {"in_flight"} | lora


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
