"""The ingress's HTTP surface, in-process, in front of simulated engine handles.

Covers routing by model and alias, OpenAI-shaped errors with the right status for every bad
input, streaming termination, timeouts, readiness and request ids.
"""

from __future__ import annotations

import json

import httpx
import pytest

from app.config import load_config
from app.ingress.asgi import create_app
from app.ingress.gateway import Gateway
from app.ingress.readiness import Readiness
from app.routing import ReplicaStats, RequestView
from tests.engine_double import SimulatedEngine

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend():
    return "asyncio"


def make_client(cpu_model, *, modes=None, ready=None, limits=None, timeout=5.0):
    other = {**cpu_model, "name": "second", "aliases": ["b"]}
    config = load_config({
        "models": [cpu_model, other],
        "limits": limits or {"max_tokens": 512},
        "server": {"request_timeout_s": timeout},
    })  # fmt: skip
    modes = modes or {}
    engines = {m.name: SimulatedEngine(m.name, mode=modes.get(m.name, "ok")) for m in config.models}
    ready = ready if ready is not None else {"engine:smollm2": 1, "engine:second": 1}
    gateway = Gateway(config, engines, Readiness(lambda: ready, ttl_s=0))
    transport = httpx.ASGITransport(app=create_app(gateway), raise_app_exceptions=False)
    return httpx.AsyncClient(transport=transport, base_url="http://stack"), engines


def assert_openai_error(response: httpx.Response, status: int, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"] and "Traceback" not in error["message"]
    assert "Error(" not in error["message"] and "ActorDied" not in error["message"]
    if param is not None:
        assert error["param"] == param
    assert response.headers.get("x-request-id")
    return error


CHAT = {"messages": [{"role": "user", "content": "hi"}]}


async def test_models_lists_names_and_aliases(cpu_model):
    client, _ = make_client(cpu_model)
    for path in ("/v1/models", "/models"):
        body = (await client.get(path)).json()
        assert body["object"] == "list"
        ids = {card["id"]: card for card in body["data"]}
        assert set(ids) == {"smollm2", "default", "second", "b"}
        assert ids["default"]["root"] == "smollm2" and ids["default"]["object"] == "model"
    assert (await client.get("/v1/models/default")).json()["root"] == "smollm2"
    assert_openai_error(await client.get("/v1/models/nope"), 404)


@pytest.mark.parametrize("path", ["/v1/completions", "/completions"])
async def test_completion_routes_by_alias_to_its_engine(cpu_model, path):
    client, engines = make_client(cpu_model)
    response = await client.post(
        path, json={"model": "b", "prompt": "hi", "max_tokens": 4, "top_k": 5}
    )
    assert response.status_code == 200
    assert response.json()["model"] == "second"
    endpoint, body = engines["second"].calls[-1]
    assert endpoint == "completions" and body["model"] == "second"
    assert body["top_k"] == 5, "engine-specific extras pass through"
    assert not engines["smollm2"].calls


async def test_chat_stream_is_sse_ending_with_done(cpu_model):
    client, _ = make_client(cpu_model)
    response = await client.post(
        "/v1/chat/completions", json={"model": "smollm2", "stream": True, **CHAT}
    )
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = [line for line in response.text.splitlines() if line]
    assert events[-1] == "data: [DONE]" and len(events) == 4


async def test_unknown_model_is_404_naming_available(cpu_model):
    client, _ = make_client(cpu_model)
    error = assert_openai_error(
        await client.post("/v1/chat/completions", json={"model": "gpt-9", **CHAT}), 404, "model"
    )
    assert error["code"] == "model_not_found"
    assert "smollm2" in error["message"] and "second" in error["message"]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "smollm2", "messages": []}, "messages"),
        ({"model": "smollm2", "messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
        ({"model": "smollm2", "temperature": 3, **CHAT}, "temperature"),
        ({"model": "smollm2", "temperature": "hot", **CHAT}, "temperature"),
        ({"model": "smollm2", "max_tokens": 0, **CHAT}, "max_tokens"),
        ({"model": "smollm2", "top_p": 0, **CHAT}, "top_p"),
        ({"model": "smollm2", "n": 0, **CHAT}, "n"),
        ({"model": "smollm2", "stream": "yes please", **CHAT}, "stream"),
        ({"model": "", **CHAT}, "model"),
        ({**CHAT}, "model"),
        ({"model": "smollm2"}, "messages"),
        ({"model": "smollm2", "stream_options": {"include_usage": True}, **CHAT}, None),
        ({"model": "smollm2", "max_tokens": 100000, **CHAT}, "max_tokens"),
        ({"model": "smollm2", "n": 50, **CHAT}, "n"),
    ],
)
async def test_invalid_chat_parameters_are_400(cpu_model, body, param):
    client, engines = make_client(cpu_model)
    assert_openai_error(await client.post("/v1/chat/completions", json=body), 400, param)
    assert not engines["smollm2"].calls, "nothing reaches the engine"


@pytest.mark.parametrize(
    ("raw", "content_type"),
    [
        (b'{"model": "smollm2", "prompt": ', "application/json"),
        (b"[1, 2]", "application/json"),
        (b"null", "application/json"),
        (b"\xff\xfe", "application/json"),
        (b"", "application/json"),
    ],
)
async def test_malformed_bodies_are_400(cpu_model, raw, content_type):
    client, _ = make_client(cpu_model)
    response = await client.post(
        "/v1/completions", content=raw, headers={"content-type": content_type}
    )
    assert_openai_error(response, 400)


async def test_unknown_route_and_method(cpu_model):
    client, _ = make_client(cpu_model)
    assert assert_openai_error(await client.get("/v2/anything"), 404)["code"] == "not_found"
    assert (
        assert_openai_error(await client.delete("/v1/models"), 405)["code"] == "method_not_allowed"
    )


async def test_oversized_body_is_413(cpu_model):
    client, engines = make_client(cpu_model, limits={"max_body_bytes": 4096})
    big = {"model": "smollm2", "prompt": "x" * 10_000}
    assert_openai_error(await client.post("/v1/completions", json=big), 413)

    async def chunks():  # no Content-Length: counted as it arrives
        yield b'{"model": "smollm2", "prompt": "'
        for _ in range(10):
            yield b"y" * 1000
        yield b'"}'

    response = await client.post(
        "/v1/completions", content=chunks(), headers={"content-type": "application/json"}
    )
    assert_openai_error(response, 413)
    assert not engines["smollm2"].calls


async def test_engine_error_keeps_its_status_and_openai_type(cpu_model):
    client, _ = make_client(cpu_model, modes={"smollm2": "error400"})
    error = assert_openai_error(
        await client.post("/v1/completions", json={"model": "smollm2", "prompt": "hi"}), 400
    )
    assert error["type"] == "invalid_request_error" and error["message"] == "prompt too long"


async def test_dead_replica_is_503_without_internals(cpu_model):
    client, _ = make_client(cpu_model, modes={"smollm2": "die"})
    error = assert_openai_error(
        await client.post("/v1/completions", json={"model": "smollm2", "prompt": "hi"}), 503
    )
    assert "pid" not in error["message"]


async def test_not_ready_model_is_503_and_health_says_which(cpu_model):
    client, _ = make_client(cpu_model, ready={"engine:smollm2": 1, "engine:second": 0})
    assert_openai_error(
        await client.post("/v1/completions", json={"model": "b", "prompt": "x"}), 503
    )
    ok = await client.post("/v1/completions", json={"model": "smollm2", "prompt": "x"})
    assert ok.status_code == 200
    health = await client.get("/health")
    assert health.status_code == 503
    assert health.json()["models"] == {
        "smollm2": {"ready": True, "running_replicas": 1},
        "second": {"ready": False, "running_replicas": 0},
    }


async def test_health_is_200_when_all_ready(cpu_model):
    client, _ = make_client(cpu_model)
    response = await client.get("/health")
    assert response.status_code == 200 and response.json()["status"] == "ok"


async def test_engine_timeout_is_504(cpu_model):
    client, engines = make_client(cpu_model, modes={"smollm2": "hang"}, timeout=0.2)
    assert_openai_error(
        await client.post("/v1/completions", json={"model": "smollm2", "prompt": "x"}), 504
    )
    assert engines["smollm2"].cancelled == 1


@pytest.mark.parametrize("mode", ["break_stream", "hang_stream"])
async def test_stream_failing_midway_ends_with_error_event_and_done(cpu_model, mode):
    client, _ = make_client(cpu_model, modes={"smollm2": mode}, timeout=0.2)
    response = await client.post(
        "/v1/completions", json={"model": "smollm2", "prompt": "x", "stream": True}
    )
    assert response.status_code == 200
    events = [line.removeprefix("data: ") for line in response.text.splitlines() if line]
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert json.loads(events[0])["choices"][0]["text"] == "t0"


async def test_request_id_is_echoed_or_generated(cpu_model):
    client, _ = make_client(cpu_model)
    generated = (await client.get("/v1/models")).headers["x-request-id"]
    assert len(generated) >= 16
    failing = await client.post(
        "/v1/completions", content=b"{", headers={"content-type": "application/json"}
    )
    assert failing.headers["x-request-id"]


async def test_tokenize_needs_exactly_one_input(cpu_model):
    client, engines = make_client(cpu_model)
    assert_openai_error(await client.post("/tokenize", json={"model": "smollm2"}), 400)
    ok = await client.post("/tokenize", json={"model": "smollm2", "prompt": "hello"})
    assert ok.status_code == 200 and engines["smollm2"].calls[-1][0] == "tokenize"
    ok = await client.post("/detokenize", json={"model": "smollm2", "tokens": [1, 2]})
    assert ok.status_code == 200 and engines["smollm2"].calls[-1][0] == "detokenize"


async def test_embeddings_route(cpu_model):
    client, engines = make_client(cpu_model)
    response = await client.post("/v1/embeddings", json={"model": "b", "input": ["a", "b"]})
    assert response.status_code == 200 and engines["second"].calls[-1][0] == "embeddings"
    assert_openai_error(
        await client.post("/v1/embeddings", json={"model": "b", "input": []}), 400, "input"
    )


async def test_routing_decision_becomes_headers(cpu_model):
    client, _ = make_client(cpu_model)
    for stream in (False, True):
        body = {"model": "b", "prompt": "hi", "stream": stream}
        response = await client.post("/v1/completions", json=body)
        assert response.headers["x-route-policy"] == "scored"
        assert response.headers["x-route-replica"] == "second-r1"
        assert response.headers["x-route-reason"] == "least-load"


async def test_first_item_reaches_the_routers_policy_as_its_first_token(cpu_model):
    from app.engines import router_registry
    from app.engines.router import StackRequestRouter

    router = StackRequestRouter.__new__(StackRequestRouter)  # Serve's own set-up is not needed
    router.initialize_state(policy="scored", model="second")
    try:
        view = RequestView("second", text="x" * 400)  # 6 uncached blocks
        router._policy.choose(view, [ReplicaStats("second-r1")])
        router._track("second-1", "second-r1", view)  # what the engine double's first call reports
        router_registry.first_token("second", "not-routed-here")  # ignored
        assert router._policy.outstanding_work("second", "second-r1") == 6
        client, _ = make_client(cpu_model)
        response = await client.post("/v1/completions", json={"model": "b", "prompt": "hi"})
        assert response.status_code == 200 and response.headers["x-route-reason"] == "least-load"
        assert "x-route-request-id" not in response.headers
        assert router._policy.outstanding_work("second", "second-r1") == 6  # noted, not applied
        router._apply_first_tokens()  # Serve runs this on the router's thread, at its next choice
        assert router._policy.outstanding_work("second", "second-r1") == 0
        assert "second-1" in router._open  # still in flight until it completes
    finally:
        router_registry.forget_all()


async def test_replica_failure_before_any_byte_is_retried_elsewhere(cpu_model):
    client, engines = make_client(cpu_model, modes={"smollm2": "die_once"})
    response = await client.post("/v1/completions", json={"model": "smollm2", "prompt": "x"})
    assert response.status_code == 200
    assert len(engines["smollm2"].calls) == 2


async def test_retries_are_bounded(cpu_model):
    client, engines = make_client(cpu_model, modes={"smollm2": "die"})
    response = await client.post("/v1/completions", json={"model": "smollm2", "prompt": "x"})
    assert_openai_error(response, 503)
    assert len(engines["smollm2"].calls) == 3  # the first try and server.retries (2) more


async def test_engine_4xx_is_not_retried(cpu_model):
    client, engines = make_client(cpu_model, modes={"smollm2": "error400"})
    await client.post("/v1/completions", json={"model": "smollm2", "prompt": "x"})
    assert len(engines["smollm2"].calls) == 1
