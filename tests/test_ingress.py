"""The ingress's HTTP surface, in-process, in front of engine doubles on loopback ports.

Covers routing by model and alias, OpenAI-shaped errors with the right status for every bad
input, streaming termination, timeouts, readiness, retries and request ids.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import httpx
import pytest

from app.config import load_config
from app.ingress.asgi import create_app
from app.ingress.gateway import Gateway
from app.routing import RequestView
from tests.engine_double import TOKEN, EngineDouble, HandleDouble, Stack, events

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend():
    return "asyncio"


@contextlib.asynccontextmanager
async def make_client(
    cpu_model,
    *,
    modes=None,
    ready=None,
    limits=None,
    timeout=5.0,
    config=None,
    replica_stats=None,
    double=None,
) -> AsyncIterator[tuple[httpx.AsyncClient, dict[str, EngineDouble], Stack]]:
    """The ingress app over engine doubles: (client, engines by model, the stack).
    `replica_stats` stands in for what Serve reports of the replicas (for /metrics); `double`:
    the doubles' other options (`EngineDouble`)."""
    other = {**cpu_model, "name": "second", "aliases": ["b"]}
    config = load_config(config or {
        "models": [cpu_model, other],
        "limits": limits or {"max_tokens": 512},
        "server": {"request_timeout_s": timeout},
    })  # fmt: skip
    modes = modes or {}
    engines = {
        m.name: EngineDouble(m.name, mode=modes.get(m.name, "ok"), **(double or {}))
        for m in config.models
    }
    stack = await Stack(engines, ready).start()
    handles = {name: HandleDouble(engine) for name, engine in engines.items()}
    gateway = Gateway(config, handles, token=TOKEN, routes=stack.get)
    app = create_app(gateway)
    if replica_stats is not None:
        app.metrics.engines.source = replica_stats
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://stack") as client:
            yield client, engines, stack
    finally:
        await gateway.relay.close()
        await stack.stop()


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


async def eventually(check, timeout_s: float = 3.0) -> None:
    """Wait until `check()` holds (what the engine does after the client left is async)."""
    for _ in range(int(timeout_s / 0.02)):
        if check():
            return
        await asyncio.sleep(0.02)
    assert check()


CHAT = {"messages": [{"role": "user", "content": "hi"}]}


async def test_models_lists_names_and_aliases(cpu_model):
    async with make_client(cpu_model) as (client, _, _):
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
    async with make_client(cpu_model) as (client, engines, _):
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
    async with make_client(cpu_model) as (client, _, _):
        response = await client.post(
            "/v1/chat/completions", json={"model": "smollm2", "stream": True, **CHAT}
        )
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.text.splitlines() if line]
        assert events[-1] == "data: [DONE]" and len(events) == 4


async def test_unknown_model_is_404_naming_available(cpu_model):
    async with make_client(cpu_model) as (client, _, _):
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
    async with make_client(cpu_model) as (client, engines, _):
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
    async with make_client(cpu_model) as (client, _, _):
        response = await client.post(
            "/v1/completions", content=raw, headers={"content-type": content_type}
        )
        assert_openai_error(response, 400)


async def test_unknown_route_and_method(cpu_model):
    async with make_client(cpu_model) as (client, _, _):
        assert assert_openai_error(await client.get("/v2/anything"), 404)["code"] == "not_found"
        assert (
            assert_openai_error(await client.delete("/v1/models"), 405)["code"]
            == "method_not_allowed"
        )


@pytest.mark.parametrize("path", ["/health", "/status", "/v1/models", "/models", "/metrics"])
async def test_head_answers_like_get_without_a_body(cpu_model, path):
    """Load balancers check with HEAD: the GET answer's status and headers, no body."""
    async with make_client(cpu_model) as (client, _, _):
        get, head = await client.get(path), await client.head(path)
        assert get.status_code == head.status_code == 200
        assert head.content == b"" and get.content
        assert head.headers["content-type"] == get.headers["content-type"]
        assert head.headers.get("x-request-id")


async def test_head_on_a_post_endpoint_is_405(cpu_model):
    async with make_client(cpu_model) as (client, _, _):
        response = await client.head("/v1/completions")
        assert response.status_code == 405 and response.headers.get("x-request-id")


async def test_oversized_body_is_413(cpu_model):
    async with make_client(cpu_model, limits={"max_body_bytes": 4096}) as (client, engines, _):
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
    async with make_client(cpu_model, modes={"smollm2": "error400"}) as (client, _, _):
        error = assert_openai_error(
            await client.post("/v1/completions", json={"model": "smollm2", "prompt": "hi"}), 400
        )
        assert error["type"] == "invalid_request_error" and error["message"] == "prompt too long"


async def test_dead_replica_is_503_without_internals(cpu_model):
    async with make_client(cpu_model, modes={"smollm2": "die"}) as (client, _, _):
        error = assert_openai_error(
            await client.post("/v1/completions", json={"model": "smollm2", "prompt": "hi"}), 503
        )
        assert "pid" not in error["message"]


async def test_not_ready_model_is_503_and_health_says_which(cpu_model):
    ready = {"smollm2": 1, "second": 0}
    async with make_client(cpu_model, ready=ready) as (client, _, _):
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
    async with make_client(cpu_model) as (client, _, _):
        response = await client.get("/health")
        assert response.status_code == 200 and response.json()["status"] == "ok"


async def test_engine_timeout_is_504(cpu_model):
    modes = {"smollm2": "hang"}
    async with make_client(cpu_model, modes=modes, timeout=0.2) as (client, engines, _):
        assert_openai_error(
            await client.post("/v1/completions", json={"model": "smollm2", "prompt": "x"}), 504
        )
        await eventually(lambda: engines["smollm2"].cancelled == 1)  # the ingress hung up


@pytest.mark.parametrize("mode", ["break_stream", "hang_stream"])
async def test_stream_failing_midway_ends_with_error_event_and_done(cpu_model, mode):
    async with make_client(cpu_model, modes={"smollm2": mode}, timeout=0.2) as (client, _, _):
        response = await client.post(
            "/v1/completions", json={"model": "smollm2", "prompt": "x", "stream": True}
        )
        assert response.status_code == 200
        got = events(response.text)
        assert got[-1] == "[DONE]"
        assert set(got[-2]["error"]) == {"message", "type", "param", "code"}
        assert got[0]["choices"][0]["text"] == "t0"


async def test_request_id_is_echoed_or_generated(cpu_model):
    async with make_client(cpu_model) as (client, _, _):
        generated = (await client.get("/v1/models")).headers["x-request-id"]
        assert len(generated) >= 16
        failing = await client.post(
            "/v1/completions", content=b"{", headers={"content-type": "application/json"}
        )
        assert failing.headers["x-request-id"]


async def test_tokenize_needs_exactly_one_input(cpu_model):
    async with make_client(cpu_model) as (client, engines, _):
        assert_openai_error(await client.post("/tokenize", json={"model": "smollm2"}), 400)
        ok = await client.post("/tokenize", json={"model": "smollm2", "prompt": "hello"})
        assert ok.status_code == 200 and engines["smollm2"].calls[-1][0] == "tokenize"
        ok = await client.post("/detokenize", json={"model": "smollm2", "tokens": [1, 2]})
        assert ok.status_code == 200 and engines["smollm2"].calls[-1][0] == "detokenize"


async def test_embeddings_route(cpu_model):
    async with make_client(cpu_model) as (client, engines, _):
        response = await client.post("/v1/embeddings", json={"model": "b", "input": ["a", "b"]})
        assert response.status_code == 200 and engines["second"].calls[-1][0] == "embeddings"
        assert_openai_error(
            await client.post("/v1/embeddings", json={"model": "b", "input": []}), 400, "input"
        )


async def test_routing_decision_becomes_headers(cpu_model):
    async with make_client(cpu_model) as (client, _, _):
        for stream in (False, True):
            body = {"model": "b", "prompt": "hi", "stream": stream}
            response = await client.post("/v1/completions", json=body)
            assert response.headers["x-route-policy"] == "scored"
            assert response.headers["x-route-replica"] == "second-r1"
            assert response.headers["x-route-reason"] == "least-load"


async def test_the_router_hears_of_each_answers_first_byte_and_end(cpu_model):
    async with make_client(cpu_model) as (client, _, stack):
        routes = stack.routes["second"]
        body = {"model": "b", "prompt": "x" * 400, "stream": True}  # 6 uncached blocks
        response = await client.post("/v1/completions", json=body)
        assert response.status_code == 200
        (routed,) = routes.routed
        assert routes.finished == [routed]
        policy = routes.router._policy
        assert policy.outstanding_work("second", "second-r1") == 0
        assert not routes.router._open  # no request left in flight


async def test_first_byte_takes_the_prefill_off_the_replicas_outstanding_work(cpu_model):
    async with make_client(cpu_model) as (_, _, stack):
        routes = stack.routes["second"]
        routed = routes.route(RequestView("second", text="x" * 400))
        policy = routes.router._policy
        assert policy.outstanding_work("second", "second-r1") == 6
        routes.first_token(routed)
        assert policy.outstanding_work("second", "second-r1") == 0
        assert routes.router._open  # still in flight until it finishes
        routes.finish(routed)
        assert not routes.router._open


async def test_replica_failure_before_any_byte_is_retried_elsewhere(cpu_model):
    async with make_client(cpu_model, modes={"smollm2": "die_once"}) as (client, engines, stack):
        response = await client.post("/v1/completions", json={"model": "smollm2", "prompt": "x"})
        assert response.status_code == 200
        first, second = stack.routes["smollm2"].routed
        assert first.replica_id != second.replica_id and len(engines["smollm2"].calls) == 1
        assert response.headers["x-route-replica"] == second.replica_id


async def test_retries_are_bounded(cpu_model):
    async with make_client(cpu_model, modes={"smollm2": "die"}) as (client, engines, stack):
        response = await client.post("/v1/completions", json={"model": "smollm2", "prompt": "x"})
        assert_openai_error(response, 503)
        # 4 dead replicas: the first try and server.retries (2) more, each on another replica
        tried = [routed.replica_id for routed in stack.routes["smollm2"].routed]
        assert len(tried) == len(set(tried)) == 3 and not engines["smollm2"].calls


async def test_engine_4xx_is_not_retried(cpu_model):
    async with make_client(cpu_model, modes={"smollm2": "error400"}) as (client, engines, stack):
        await client.post("/v1/completions", json={"model": "smollm2", "prompt": "x"})
        assert len(engines["smollm2"].calls) == 1 and len(stack.routes["smollm2"].routed) == 1
