"""Token usage from the engine to the ingress, without reading the answer's JSON: a JSON
answer's `x-vrstack-usage` header and a stream's `: vrstack-usage` comment sent with its final
`data: [DONE]` (`app.engines.http_server`, `app.engines.request_meter`), read and stripped by the
ingress's relay (`app.ingress.relay.pass_through`). Real servers on 127.0.0.1: an aiohttp one
sending chosen bytes, and the engine port's own app and server."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web

from app.engines.http_server import (
    TOKEN_HEADER,
    Answer,
    EngineApp,
    EngineHttpServer,
    Usage,
    usage_pair,
)
from app.engines.request_meter import RequestMeter, wants_usage
from app.ingress.engine_http import EnginePool
from app.ingress.migration import Stream, relay_events
from app.ingress.relay import Relay, parse_usage, pass_through

pytestmark = pytest.mark.anyio
TOKEN = "test-token"
DONE = b"data: [DONE]\n\n"
TEXT = b'data: {"choices":[{"index":0,"text":"hi"}]}\n\n'
USAGE_EVENT = 'data: {"choices":[],"usage":{"prompt_tokens":7,"completion_tokens":3}}\n\n'


@pytest.fixture
def anyio_backend():
    return "asyncio"


# -- the relay against an HTTP server sending chosen bytes -----------------------------------


def _json_handler(status: int, usage: str | None):
    async def handler(request: web.Request) -> web.Response:
        headers = {"x-vrstack-usage": usage} if usage is not None else {}
        body = {"usage": {"prompt_tokens": 99, "completion_tokens": 99}}  # never read
        return web.json_response(body, status=status, headers=headers)

    return handler


def _sse_handler(*writes: bytes, gap_s: float = 0.0):
    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        for data in writes:
            await response.write(data)
            if gap_s:
                await asyncio.sleep(gap_s)  # the ingress reads what came before on its own
        await response.write_eof()
        return response

    return handler


ROUTES = {
    "/json": _json_handler(200, "12 8"),
    "/json-garbled": _json_handler(200, "12"),
    "/json-none": _json_handler(200, None),
    "/json-400": _json_handler(400, "12 8"),
    "/json-500": _json_handler(500, "12 8"),
    "/stream": _sse_handler(TEXT, TEXT + b": vrstack-usage 7 3\n\n" + DONE),
    "/stream-alone": _sse_handler(TEXT, TEXT, b": vrstack-usage 7 3\n\n" + DONE, gap_s=0.05),
    "/stream-split": _sse_handler(TEXT + b": vrstack-us", b"age 7 3\n\n" + DONE, gap_s=0.1),
    "/stream-apart": _sse_handler(TEXT + b": vrstack-usage 7 3\n\n", DONE, gap_s=0.1),
    "/stream-absent": _sse_handler(TEXT, DONE),
    "/stream-lookalike": _sse_handler(b'data: {"text":": vrstack-usage 1 2"}\n\n' + DONE),
    "/stream-error": _sse_handler(
        TEXT, b'data: {"error":{"message":"x","code":500}}\n\n: vrstack-usage 7 3\n\n'
    ),  # no [DONE]: the ingress ends it with an error event
    "/stream-early": _sse_handler(TEXT, b": vrstack-usage 7 3\n\n"),
}


@pytest.fixture
async def chosen_bytes() -> AsyncIterator[str]:
    app = web.Application()
    for path, handler in ROUTES.items():
        app.router.add_post(path, handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


async def _relayed(url: str, path: str, body: dict | None = None) -> tuple[Any, list[dict]]:
    """(what pass_through returned, the messages it sent the client)."""
    relay = Relay(TOKEN, timeout_s=30)
    messages: list[dict] = []

    async def send(message: dict) -> None:
        messages.append(message)

    try:
        payload = json.dumps(body or {"model": "m"}).encode()
        response = await relay.send(url, path, payload, "req-1")
        try:
            usage = await pass_through(response, send, [(b"x-route-policy", b"p")], lambda: None)
        finally:
            response.release()
    finally:
        await relay.close()
    return usage, messages


def _client_bytes(messages: list[dict]) -> bytes:
    return b"".join(m.get("body", b"") for m in messages if m["type"] == "http.response.body")


async def test_a_json_answers_usage_comes_from_its_header(chosen_bytes):
    usage, messages = await _relayed(chosen_bytes, "/json")
    assert usage == Usage(12, 8)
    head = dict(messages[0]["headers"])
    assert b"x-vrstack-usage" not in head  # the engine's headers never reach the client
    assert head[b"x-route-policy"] == b"p"
    assert json.loads(_client_bytes(messages))["usage"]["prompt_tokens"] == 99


@pytest.mark.parametrize("path", ["/json", "/stream", "/stream-alone"])
async def test_the_usage_is_told_before_the_last_bytes_are_sent(chosen_bytes, path):
    """A client that leaves once it has the answer's last bytes may cancel the relay while they
    are sent: the usage was told before."""
    relay = Relay(TOKEN, timeout_s=30)
    told: list[tuple[int, int]] = []

    async def send(message: dict) -> None:
        if message["type"] == "http.response.body" and not message.get("more_body"):
            raise asyncio.CancelledError  # the client left with the last bytes

    try:
        response = await relay.send(chosen_bytes, path, b'{"model":"m"}', "req-1")
        try:
            with pytest.raises(asyncio.CancelledError):
                await pass_through(response, send, [], lambda: None, told.append)
        finally:
            response.release()
    finally:
        await relay.close()
    assert told == [Usage(12, 8) if path == "/json" else Usage(7, 3)]


@pytest.mark.parametrize("path", ["/stream", "/stream-alone"])
async def test_a_migratable_stream_ends_the_answer_with_its_last_bytes_after_the_usage(
    chosen_bytes, path
):
    """The relay of a stream that can move to another replica (`relay_events`): the usage is
    told before the last bytes, which end the answer (no empty message after them)."""
    relay = Relay(TOKEN, timeout_s=30)
    told: list[Usage] = []
    messages: list[tuple[dict, int]] = []  # each message, with the usages told before it

    async def send(message: dict) -> None:
        messages.append((message, len(told)))

    stream = Stream(chat=False)
    try:
        response = await relay.send(chosen_bytes, path, b'{"model":"m"}', "req-1")
        try:
            await relay_events(response, send, stream, lambda: None, told.append)
        finally:
            response.release()
    finally:
        await relay.close()
    assert stream.done and told == [Usage(7, 3)]
    *before, (last, told_then) = messages
    assert last["more_body"] is False and last["body"].endswith(DONE) and told_then == 1
    assert all(message["more_body"] for message, _ in before)
    assert b"".join(m["body"] for m, _ in messages) == TEXT + TEXT + DONE


@pytest.mark.parametrize("path", ["/json-garbled", "/json-none", "/json-400", "/json-500"])
async def test_a_json_answer_without_a_valid_header_or_not_200_has_no_usage(chosen_bytes, path):
    usage, messages = await _relayed(chosen_bytes, path)
    assert usage is None
    assert all(k != b"x-vrstack-usage" for k, _ in messages[0]["headers"])


@pytest.mark.parametrize("path", ["/stream", "/stream-alone"])
async def test_a_streams_usage_comment_is_read_and_stripped(chosen_bytes, path):
    usage, messages = await _relayed(chosen_bytes, path)
    assert usage == Usage(7, 3)
    sent = _client_bytes(messages)
    assert b"vrstack-usage" not in sent
    assert sent == TEXT + TEXT + DONE


async def test_a_comment_split_across_reads_or_apart_from_done_gives_no_usage(chosen_bytes):
    for path in ("/stream-split", "/stream-apart"):
        usage, messages = await _relayed(chosen_bytes, path)
        assert usage is None, path
        sent = _client_bytes(messages)  # passed on whole: an SSE comment, which clients skip
        assert sent == TEXT + b": vrstack-usage 7 3\n\n" + DONE, path


async def test_a_stream_without_a_comment_has_no_usage(chosen_bytes):
    for path in ("/stream-absent", "/stream-lookalike"):
        usage, messages = await _relayed(chosen_bytes, path)
        assert usage is None, path
        assert _client_bytes(messages).endswith(DONE), path
    _, messages = await _relayed(chosen_bytes, "/stream-lookalike")
    assert b'"text":": vrstack-usage 1 2"' in _client_bytes(messages)  # data is not touched


async def test_a_stream_that_ends_early_has_no_usage(chosen_bytes):
    for path in ("/stream-error", "/stream-early"):
        usage, messages = await _relayed(chosen_bytes, path)
        assert usage is None, path
        sent = _client_bytes(messages)
        assert b"the engine ended the stream early" in sent and sent.endswith(DONE), path


# -- the engine port's own app: what it sends, relayed --------------------------------------


class _Backend:
    """Stands in for vLLM behind the port: a completion answer or stream, or errors."""

    def __init__(self) -> None:
        self.meter = RequestMeter()

    async def check_health(self) -> None:
        return None

    async def answer(self, endpoint: str, body: dict[str, Any]) -> Answer:
        kind = body.get("kind")
        if kind == "refused":
            return Answer.error(400, "prompt too long", param="prompt")
        if kind == "fails":
            raise RuntimeError("CUDA error")
        if not body.get("stream"):
            usage = {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}
            return Answer.json({"choices": [], "usage": usage}, usage=Usage(5, 2))
        events = [TEXT.decode(), TEXT.decode(), USAGE_EVENT, DONE.decode()]
        if kind == "no-usage":
            events.remove(USAGE_EVENT)
        batches = _batches(events, linger_s=0.1 if kind == "lingers" else 0.0)
        return Answer(stream=self.meter.sse(endpoint, batches, keep_usage=wants_usage(body)))


async def _batches(events: list[str], linger_s: float = 0.0) -> AsyncIterator[list[str]]:
    for event in events:
        yield [event]
    await asyncio.sleep(linger_s)  # the engine's own work after its last event


@pytest.fixture
async def engine_port() -> AsyncIterator[tuple[str, _Backend]]:
    backend = _Backend()
    server = EngineHttpServer(EngineApp(backend, TOKEN), host="127.0.0.1")
    url = await server.start()
    try:
        yield url, backend
    finally:
        await server.stop(drain_s=0.1)


async def test_the_engine_port_tells_a_json_answers_usage(engine_port):
    url, _ = engine_port
    usage, messages = await _relayed(url, "/v1/completions", {"model": "m"})
    assert usage == Usage(5, 2)
    assert json.loads(_client_bytes(messages))["usage"]["completion_tokens"] == 2


@pytest.mark.parametrize("include_usage", [False, True])
async def test_the_engine_port_tells_a_streams_usage(engine_port, include_usage):
    url, backend = engine_port
    body = {"model": "m", "stream": True}
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    usage, messages = await _relayed(url, "/v1/completions", body)
    assert usage == Usage(7, 3)
    sent = _client_bytes(messages)
    assert b"vrstack-usage" not in sent and sent.endswith(DONE)
    assert (b'"prompt_tokens":7' in sent) is include_usage  # the client's chunk, if it asked
    figures = backend.meter.snapshot()["completions"]
    assert (figures["prompt_tokens"], figures["output_tokens"]) == (7, 3)


async def test_a_streams_connection_to_the_engine_port_is_kept_for_the_next_request(engine_port):
    """The engine port ends a stream's answer with its `[DONE]` chunk, even while the engine
    is still busy after its last event: the relay, done at `[DONE]`, finds the answer complete
    and keeps the connection (no new connection per streamed request)."""
    url, _ = engine_port
    pool = EnginePool(timeout_s=30)
    headers = f"{TOKEN_HEADER}: {TOKEN}\r\ncontent-type: application/json\r\n".encode()
    body = json.dumps({"model": "m", "stream": True, "kind": "lingers"}).encode()

    async def send(message: dict) -> None:
        pass

    try:
        for _ in range(3):
            response = await pool.post(url, "/v1/completions", headers, body)
            stream = Stream(chat=False)
            try:
                await relay_events(response, send, stream, lambda: None, lambda usage: None)
            finally:
                response.release()
            assert stream.done and pool.idle == 1
    finally:
        await pool.close()


@pytest.mark.parametrize("kind", ["refused", "fails", "no-usage"])
async def test_the_engine_ports_errors_and_streams_without_usage_tell_none(engine_port, kind):
    url, _ = engine_port
    body = {"model": "m", "kind": kind, "stream": kind == "no-usage"}
    usage, messages = await _relayed(url, "/v1/completions", body)
    assert usage is None
    assert messages[0]["status"] == {"refused": 400, "fails": 500, "no-usage": 200}[kind]


# -- the engine's usage of each JSON answer --------------------------------------------------


def test_the_engine_tells_tokenize_and_detokenize_counts_as_prompt_tokens():
    from app.engines.llm_server import _usage_of

    assert _usage_of("tokenize", {}, {"count": 5, "tokens": [1, 2, 3, 4, 5]}) == Usage(5, 0)
    assert _usage_of("detokenize", {"tokens": [7, 8, 9]}, {"prompt": "abc"}) == Usage(3, 0)
    embedding = {"usage": {"prompt_tokens": 4, "total_tokens": 4, "completion_tokens": None}}
    assert _usage_of("embeddings", {}, embedding) == Usage(4, 0)
    chat = {"usage": {"prompt_tokens": 9, "total_tokens": 12, "completion_tokens": 3}}
    assert _usage_of("chat", {}, chat) == Usage(9, 3)
    assert _usage_of("completions", {}, {"choices": []}) is None


def test_cached_prompt_tokens_travel_with_the_usage():
    usage = usage_pair(
        {
            "prompt_tokens": 300,
            "completion_tokens": 4,
            "prompt_tokens_details": {"cached_tokens": 256},
        }
    )
    assert usage == Usage(300, 4, 256)
    assert parse_usage(usage.wire()) == usage
    assert parse_usage(b"300 4") == Usage(300, 4, None)
    assert parse_usage(b"300 4 256 1") is None and parse_usage("3 -1") is None
