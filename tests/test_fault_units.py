"""Failure behaviour, in-process: the request router's in-flight bookkeeping on every exit path
(driven by Serve's own routing loop where Serve is the caller), and an engine that dies inside a
live replica (before the first byte: retried elsewhere; after: an error event and [DONE]; its
text never answered)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import logging.handlers
from collections.abc import AsyncIterator, Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from ray.serve._private.common import (  # Serve's own request types, as its router gets them
    DeploymentHandleSource,
    DeploymentID,
    ReplicaID,
    RequestMetadata,
)
from ray.serve.request_router import PendingRequest

from app.config import load_config
from app.engines.http_server import (
    DRAIN_S,
    ENGINE_UNAVAILABLE,
    SHUTDOWN_S,
    EngineApp,
    EngineHttpServer,
)
from app.engines.llm_config import deployment_config
from app.engines.router import StackRequestRouter
from app.ingress.gateway import Gateway
from app.ingress.protocol import CompletionRequest
from app.routing import RequestView
from tests.engine_double import (
    TOKEN,
    VLLM_DEAD,
    VLLM_OOPS,
    EngineDouble,
    LoopbackRoutes,
    Stack,
    events,
)
from tests.test_ingress import assert_openai_error, eventually, make_client

DEPLOYMENT = DeploymentID("engine:sim", "app")
BODY = {"model": "smollm2", "prompt": "x" * 400}


class ServeReplica:
    """What Serve's router knows of a running replica; `full`: its queue is at the limit."""

    def __init__(self, n: int, *, full: bool = False) -> None:
        self.replica_id = ReplicaID(f"r{n}", DEPLOYMENT)
        self.max_ongoing_requests = 2
        self.full = full
        self.replica_metadata: dict = {}
        self.routing_stats: dict = {}
        self.node_id, self.availability_zone = "node", None
        self.multiplexed_model_ids: set[str] = set()
        self.is_cross_language = False

    async def get_queue_len(self, *, deadline_s: float) -> int:
        return self.max_ongoing_requests if self.full else 0


def serve_router(*replicas: ServeReplica) -> StackRequestRouter:
    router = StackRequestRouter(DEPLOYMENT, DeploymentHandleSource.UNKNOWN)
    router.initialize_state(policy="scored", model="sim")
    router.update_replicas(list(replicas))
    return router


def pending(n: int = 0) -> PendingRequest:
    body = {"model": "sim", "prompt": "x" * 400}
    meta = RequestMetadata(request_id=f"q{n}", internal_request_id=f"i{n}")
    return PendingRequest(args=["completions", body], kwargs={}, metadata=meta)


def assert_nothing_in_flight(router: StackRequestRouter) -> None:
    assert router._open == {} and router._in_flight == {}
    for replica in ("r1", "r2", "r3", "smollm2-r1", "smollm2-r2"):
        assert router._policy.outstanding_work("sim", replica) == 0


# -- A. the router's bookkeeping -------------------------------------------------------------
@pytest.mark.anyio
async def test_a_handle_call_cancelled_while_serve_queues_it_releases_its_count():
    """All replicas full: Serve's routing loop keeps asking our router; the caller gives up."""
    router = serve_router(ServeReplica(1, full=True), ServeReplica(2, full=True))
    routing = asyncio.ensure_future(router._choose_replica_for_request(pending()))
    await eventually(lambda: router._open)
    assert sum(router._in_flight.values()) == 1
    routing.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await routing
    await eventually(lambda: not router._open)
    assert_nothing_in_flight(router)
    await asyncio.sleep(0.05)  # Serve's queue-length probes end


@pytest.mark.anyio
async def test_a_handle_call_counts_on_the_replica_serve_sent_it_to():
    """The policy's choice is full; Serve takes the fallback rank: the count follows it."""
    busy, free = ServeReplica(1, full=True), ServeReplica(2)
    free.routing_stats = {"in_flight": 1}  # the policy prefers the full one
    router = serve_router(busy, free)
    request = pending()
    replica = await asyncio.wait_for(router._choose_replica_for_request(request), 10)
    await asyncio.sleep(0)
    assert replica is free and router._in_flight == {"r2": 1}
    router.on_request_completed(free.replica_id, request.metadata.internal_request_id)
    assert_nothing_in_flight(router)
    await asyncio.sleep(0.05)  # Serve's queue-length probes end


@pytest.mark.anyio
async def test_a_relayed_request_cancelled_before_its_answer_releases_its_count(cpu_model):
    """The client leaves while the replica has not answered (the ingress task is cancelled)."""
    config = load_config({"models": [cpu_model]})
    stack = await Stack({"smollm2": EngineDouble("smollm2", mode="hang")}).start()
    gateway = Gateway(config, {}, token=TOKEN, routes=stack.get)
    router = stack.routes["smollm2"].router

    async def send(message: dict) -> None:
        pass

    request = CompletionRequest.model_validate(BODY)
    task = asyncio.ensure_future(gateway.relay_http("completions", request, send=send,
                                                    request_id="r"))  # fmt: skip
    try:
        await eventually(lambda: stack.engines["smollm2"].calls)
        assert router._in_flight == {"smollm2-r1": 1}
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        assert_nothing_in_flight(router)
    finally:
        await gateway.relay.close()
        await stack.stop()


# Each handle call's fate once its routing started (Serve's hooks, in its order).
HANDLE_FATES = (
    "cancelled", "sent", "sent_to_fallback", "rejected_then_sent", "replica_died",
    "ended_in_the_routing_turn", "rejected_in_the_routing_turn",
)  # fmt: skip


@settings(max_examples=200, deadline=None)
@given(
    http=st.lists(st.sampled_from(["answered", "first_token", "retried"]), max_size=6),
    handle=st.lists(st.sampled_from(HANDLE_FATES), max_size=6),
    order=st.randoms(use_true_random=False),
)
def test_in_flight_counts_return_to_zero_whatever_each_request_meets(http, handle, order):
    """Interleaved relayed requests and handle calls, each ending its own way: the counts
    always equal the open requests, and nothing stays open once all have ended."""
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)  # Serve's pending requests make their futures on it
    try:
        router = loop.run_until_complete(_router_on(loop))
        steps = [iter(_relayed(router, fate)) for fate in http]
        steps += [iter(_handle_call(router, loop, n, f)) for n, f in enumerate(handle)]
        while steps:
            step = order.choice(steps)
            if next(step, StopIteration) is StopIteration:
                steps.remove(step)
            loop.run_until_complete(asyncio.sleep(0))  # Serve's future callbacks run
            assert sum(router._in_flight.values()) == len(router._open)
        assert router._open == {} and router._in_flight == {}
        for replica in ("r1", "r2", "r3"):
            assert router._policy.outstanding_work("sim", replica) == 0
    finally:
        asyncio.set_event_loop(None)
        loop.close()


async def _router_on(loop: asyncio.AbstractEventLoop) -> StackRequestRouter:
    return serve_router(ServeReplica(1), ServeReplica(2), ServeReplica(3))


def _relayed(router: StackRequestRouter, fate: str) -> Iterator[None]:
    candidates = [
        _with_url(r) for r in router.curr_replicas.values()
    ]  # the HTTP path routes over replicas with a port
    routed = router.route(RequestView("sim", text="x" * 400), candidates=candidates)
    if routed is None:  # every replica died (a handle call's fate): nothing was counted
        return
    yield
    if fate == "first_token":
        router.first_token(routed)
        yield
    if fate == "retried":  # the replica failed before answering: another one
        router.finish(routed)
        yield
        routed = router.route(RequestView("sim", text="y" * 400), exclude={routed.replica_id},
                              candidates=candidates)  # fmt: skip
        if routed is None:
            return
        yield
    router.finish(routed)


def _with_url(replica: ServeReplica) -> ServeReplica:
    replica.replica_metadata = {"url": f"http://127.0.0.1:1/{replica.replica_id.unique_id}"}
    return replica


def _handle_call(
    router: StackRequestRouter, loop: asyncio.AbstractEventLoop, n: int, fate: str
) -> Iterator[None]:
    """Serve's calls to the router for one handle call, as `Router` makes them."""
    request = pending(n)
    key = request.metadata.internal_request_id
    ranks = loop.run_until_complete(router.choose_replicas(router._replicas_list, request))
    if not ranks:  # every replica died: Serve waits for new ones, then the caller leaves
        request.future.cancel()
        return
    yield
    if fate == "cancelled":  # the caller left while Serve still queued it
        request.future.cancel()
        return
    chosen = ranks[-1][-1] if fate == "sent_to_fallback" else ranks[0][0]
    if fate == "ended_in_the_routing_turn":  # the caller left as Serve picked the replica:
        request.future.set_result(chosen)  # Serve reports it ended before the future's
        router.on_request_completed(chosen.replica_id, key)  # callbacks run
        return
    if fate in ("rejected_then_sent", "rejected_in_the_routing_turn"):
        # The replica refused it (at once, in the routing turn, or later): Serve routes it again.
        request.future.set_result(chosen)
        if fate == "rejected_then_sent":
            yield
        request.reset_future()
        router.on_request_completed(chosen.replica_id, key)  # the rejected call's callback
        yield
        ranks = loop.run_until_complete(router.choose_replicas(router._replicas_list, request))
        if not ranks:
            request.future.cancel()
            return
        chosen = ranks[0][0]
        yield
    request.future.set_result(chosen)
    yield
    if fate == "replica_died":
        router.on_replica_actor_died(chosen.replica_id)
        yield
    router.on_request_completed(chosen.replica_id, key)


# -- B. an engine that dies inside a live replica --------------------------------------------
@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.mark.anyio
@pytest.mark.parametrize("stream", [False, True])
async def test_engine_gone_before_the_first_byte_is_retried_on_another_replica(cpu_model, stream):
    async with make_client(cpu_model, modes={"smollm2": "engine_dead_once"}) as (client, _, stack):
        response = await client.post("/v1/completions", json={**BODY, "stream": stream})
        assert response.status_code == 200, response.text
        assert "EngineCore" not in response.text
        if stream:
            assert events(response.text)[-1] == "[DONE]"
        routes = stack.routes["smollm2"]
        assert [r.replica_id for r in routes.routed] == ["smollm2-r1", "smollm2-r2"]
        assert response.headers["x-route-replica"] == "smollm2-r2"
        dead = next(app for app in stack.apps if app.engine_dead)
        assert dead.stats() == {"in_flight": 0, "healthy": False, ENGINE_UNAVAILABLE: 1}
        assert_nothing_in_flight(routes.router)


@pytest.mark.anyio
async def test_engine_dying_mid_stream_ends_with_an_error_event_and_done(cpu_model, caplog):
    async with make_client(cpu_model, modes={"smollm2": "engine_dies"}) as (client, _, stack):
        headers = {"x-request-id": "req-midway"}
        with caplog.at_level(logging.ERROR, logger="vrstack.engine"):
            response = await client.post("/v1/completions", json={**BODY, "stream": True},
                                         headers=headers)  # fmt: skip
        assert response.status_code == 200
        chunk, failure, done = events(response.text)
        assert chunk["choices"][0]["text"] == "t0" and done == "[DONE]"
        assert failure["error"]["code"] == ENGINE_UNAVAILABLE
        assert set(failure["error"]) == {"message", "type", "param", "code"}
        assert "EngineCore" not in response.text
        assert any("req-midway" in r.getMessage() and VLLM_DEAD in r.getMessage()
                   for r in caplog.records)  # fmt: skip
        # The only replica's engine is gone: refused at once, retries exhausted, OpenAI-shaped.
        again = await client.post("/v1/completions", json=BODY)
        assert assert_openai_error(again, 503)["code"] == "replica_failed"
        assert len(stack.engines["smollm2"].calls) == 1  # the dead engine was not asked again
        assert_nothing_in_flight(stack.routes["smollm2"].router)


@pytest.mark.anyio
async def test_an_engine_500_answers_without_the_engines_text(cpu_model, caplog):
    async with make_client(cpu_model, modes={"smollm2": "error500"}) as (client, _, stack):
        with caplog.at_level(logging.ERROR, logger="vrstack.engine"):
            response = await client.post("/v1/completions", json=BODY,
                                         headers={"x-request-id": "req-500"})  # fmt: skip
        error = assert_openai_error(response, 500)
        assert error["code"] == "engine_error" and "CUDA" not in response.text
        assert any("req-500" in r.getMessage() and VLLM_OOPS in r.getMessage()
                   for r in caplog.records)  # fmt: skip
        assert len(stack.routes["smollm2"].routed) == 1  # the engine lives: not retried
        assert not any(app.engine_dead for app in stack.apps)


@contextlib.asynccontextmanager
async def head_only_replica(then: str) -> AsyncIterator[str]:
    """A replica port that answers any request with the head of a 200 JSON answer and part of
    its body, then closes the connection (`then="close"`, as a replica killed mid-answer) or
    sends nothing more (`"stall"`); its base URL."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                     b"content-length: 100\r\n\r\n{\"object\": \"text_")  # fmt: skip
        await writer.drain()
        if then == "stall":
            await asyncio.sleep(3600)
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()


@pytest.mark.anyio
async def test_a_json_answer_broken_off_after_its_head_is_retried_on_another_replica(cpu_model):
    async with make_client(cpu_model) as (client, _, stack), head_only_replica("close") as url:
        good = stack.routes["smollm2"].replicas[0].replica_metadata["url"]
        stack.routes["smollm2"] = routes = LoopbackRoutes("smollm2", [url, good])
        routes.replicas[1].routing_stats = {"in_flight": 5}  # the broken one is chosen first
        response = await client.post("/v1/completions", json=BODY)
        assert response.status_code == 200, response.text
        assert response.json()["object"] == "completions"
        assert [r.replica_id for r in routes.routed] == ["smollm2-r1", "smollm2-r2"]
        assert_nothing_in_flight(routes.router)


@pytest.mark.anyio
async def test_a_json_answer_stalling_after_its_head_is_a_504(cpu_model):
    async with (
        make_client(cpu_model, timeout=0.5) as (client, _, stack),
        head_only_replica("stall") as url,
    ):
        stack.routes["smollm2"].replicas[0].replica_metadata = {"url": url}
        response = await client.post("/v1/completions", json=BODY)
        assert assert_openai_error(response, 504)["code"] == "timeout"
        assert_nothing_in_flight(stack.routes["smollm2"].router)


@pytest.mark.anyio
async def test_routers_skip_a_replica_reporting_its_engine_gone(cpu_model):
    async with make_client(cpu_model, modes={"smollm2": "engine_dead_once"}) as (client, _, stack):
        await client.post("/v1/completions", json=BODY)  # the dead replica learns it is dead
        routes = stack.routes["smollm2"]
        dead = next(app for app in stack.apps if app.engine_dead)
        routes.replicas[0].routing_stats = dead.stats()  # as Serve relays the replica's stats
        chosen = {routes.route(RequestView("smollm2", text=str(i))).replica_id for i in range(20)}
        assert chosen == {"smollm2-r2"}


class ServeHandle:
    """A Serve deployment handle's part the gateway uses, answering calls from `answers`."""

    def __init__(self, answers: list[list[dict]]) -> None:
        self.answers = answers
        self.calls = 0

    def options(self, **kwargs: object) -> ServeHandle:
        return self

    def remote(self, endpoint: str, body: dict) -> object:
        items = self.answers[self.calls]
        self.calls += 1

        async def stream():
            for item in items:
                yield item

        return stream()


@pytest.mark.anyio
async def test_a_handle_call_meeting_a_gone_engine_is_sent_again(cpu_model):
    gone = {"status": 503, "error": {"message": "gone", "type": "service_unavailable",
                                     "param": None, "code": ENGINE_UNAVAILABLE}}  # fmt: skip
    handle = ServeHandle([[gone], [{"body": {"object": "text_completion"}}]])
    routes = LoopbackRoutes("smollm2", ["http://127.0.0.1:1"])  # one running replica
    gateway = Gateway(load_config({"models": [cpu_model]}), {"smollm2": handle}, token=TOKEN,
                      routes=lambda model: routes)  # fmt: skip
    answer = await gateway.call("completions", CompletionRequest.model_validate(BODY))
    assert answer == {"object": "text_completion"} and handle.calls == 2


@pytest.mark.anyio
async def test_an_engine_port_leaves_the_processs_log_handlers_open():
    """Ray Serve logs through a `MemoryHandler` to its file; a closed one (target None) makes a
    restarted Serve controller fail to recover the replica, and replace it under load."""
    serve_logger = logging.getLogger("ray.serve")
    handler = logging.handlers.MemoryHandler(100, target=logging.NullHandler())
    serve_logger.addHandler(handler)
    server = EngineHttpServer(EngineApp(EngineDouble("m"), TOKEN), host="127.0.0.1")
    try:
        await server.start()
        assert handler.target is not None
    finally:
        await server.stop(drain_s=0.1)
        serve_logger.removeHandler(handler)


def test_replicas_get_longer_than_the_drain_to_stop(cpu_model):
    """Ray's default graceful shutdown (20 s) would cut streams the drain promises to finish."""
    (spec,) = load_config({"models": [cpu_model]}).models
    assert deployment_config(spec)["graceful_shutdown_timeout_s"] == SHUTDOWN_S > DRAIN_S > 20
