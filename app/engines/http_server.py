"""An engine replica's own HTTP port: the ingress relays each OpenAI request there.

Each engine replica (our `EngineServer`, or the benchmarks' simulated engine) serves its model's
endpoints on a port of its own, beside its Serve replica, so the answer's bytes go from the
engine's process to the ingress that relays them with no Serve hop in between. The replica
publishes the port's URL as its Serve replica metadata (`record_replica_metadata`), where the
ingress's request router reads it. Only the stack's ingress may call the port: every request
carries the stack's internal token (`x-vrstack-token`, made by the builder and bound to the
ingress and the engines); anything else is refused with 403.

The port binds the address in `VRSTACK_ENGINE_HOST`, else the Ray node's address (what other
nodes reach). A client that goes away mid-stream cancels its generation.

Engine failures never show the engine's own text (it is logged with the request id): before the
answer's first byte a failed answer is a 500 `engine_error`, or, when the engine is gone for good
(its health check fails, e.g. vLLM's engine core process died while the replica lives), a 503
`engine_unavailable` that the ingress retries on another replica; every later request to the
replica gets that 503 at once and the replica reports itself unhealthy to the routers until
Serve's health check replaces it. After the first byte, the stream ends with an OpenAI-shaped
error event (`engine_unavailable` or `engine_error`) and `data: [DONE]`.

Each answer tells the ingress its token usage, as the engine counted it, so the ingress never
reads the answer's bytes for it: a JSON answer in the private header `x-vrstack-usage:
<prompt_tokens> <completion_tokens>`, a stream in the SSE comment `: vrstack-usage <prompt>
<completion>` sent in the same bytes as its final `data: [DONE]` (`usage_comment`). The ingress
strips both (`app.ingress.relay.pass_through`). Those bytes also end the HTTP answer (one
write), whatever the engine still does after its last event: the ingress, done reading at
`[DONE]`, finds the answer complete and keeps the connection for its next request.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import os
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import Any, NamedTuple, Protocol

from app.engines.items import Endpoint
from app.errors import error_body

logger = logging.getLogger("vrstack.engine")
TOKEN_HEADER = "x-vrstack-token"
HOST_ENV = "VRSTACK_ENGINE_HOST"
ENDPOINTS: dict[str, Endpoint] = {
    "/v1/completions": "completions",
    "/v1/chat/completions": "chat",
    "/v1/embeddings": "embeddings",
    "/score": "score",
    "/rerank": "rerank",
    "/tokenize": "tokenize",
    "/detokenize": "detokenize",
}
_JSON = [(b"content-type", b"application/json")]
_SSE = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]
MAX_BODY_BYTES = 64 * 2**20  # the ingress enforces the configured limit; this only bounds memory
ENGINE_UNAVAILABLE = "engine_unavailable"  # the replica's engine is gone: retry elsewhere
HEALTH_TIMEOUT_S = 5.0  # a health check slower than this is not taken as the engine's death
DRAIN_S = 30.0  # how long a stopping replica lets its answers in progress finish
# Serve's graceful shutdown of a replica (`graceful_shutdown_timeout_s`, Ray's default 20 s):
# long enough for the drain and for the engine to stop after it.
SHUTDOWN_S = DRAIN_S + 30.0
_ERROR_EVENT = b'data: {"error"'
DONE_EVENT = b"data: [DONE]\n\n"  # what ends every stream
USAGE_HEADER = "x-vrstack-usage"  # a JSON answer's usage: "<prompt> <completion>[ <cached>]"
USAGE_COMMENT = b": vrstack-usage "  # a stream's usage, just before its final `data: [DONE]`
_USAGE_HEADER = USAGE_HEADER.encode()


class Usage(NamedTuple):
    """An answer's tokens as the engine counted them; `cached`: the prompt tokens its prefix
    cache served (`usage.prompt_tokens_details.cached_tokens`), None when it did not say."""

    prompt: int
    completion: int
    cached: int | None = None

    def wire(self) -> bytes:
        """As `USAGE_HEADER` and `usage_comment` carry it."""
        if self.cached is None:
            return b"%d %d" % (self.prompt, self.completion)
        return b"%d %d %d" % (self.prompt, self.completion, self.cached)


@dataclass(frozen=True, slots=True)
class Answer:
    """One engine answer: a JSON body with its status (and `usage`, sent as `USAGE_HEADER`), or
    (`stream`) SSE bytes with status 200 (their usage in `usage_comment`)."""

    status: int = 200
    body: bytes = b""
    stream: AsyncIterator[bytes] | None = None
    usage: Usage | None = None
    ours: bool = False  # an error the replica says itself: answered as it is, even a 5xx

    @classmethod
    def json(cls, obj: Any, status: int = 200, usage: Usage | None = None) -> Answer:
        return cls(status, json.dumps(obj, separators=(",", ":")).encode(), usage=usage)

    @classmethod
    def error(
        cls,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        ours: bool = False,
    ) -> Answer:
        answer = cls.json(error_body(status, message, param=param, code=code), status)
        return replace(answer, ours=True) if ours else answer


class Backend(Protocol):
    """What answers the requests of one engine replica's port."""

    async def answer(self, endpoint: Endpoint, body: dict[str, Any]) -> Answer:
        """The answer to one OpenAI request (already parsed from JSON)."""
        ...

    async def check_health(self) -> None:
        """Raise if the engine is gone for good (Serve's replica health check)."""
        ...


def usage_pair(usage: Any) -> Usage | None:
    """The tokens of an OpenAI `usage` object; None when there is none."""
    if not isinstance(usage, dict):
        return None
    details = usage.get("prompt_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, dict) else None
    return Usage(
        int(usage.get("prompt_tokens") or 0),
        int(usage.get("completion_tokens") or 0),
        cached if isinstance(cached, int) else None,
    )


def usage_comment(usage: Usage) -> bytes:
    """A stream's usage as the SSE comment sent just before its final `data: [DONE]`."""
    return USAGE_COMMENT + usage.wire() + b"\n\n"


def route_path(scope: dict[str, Any]) -> str:
    """The request's path within its application: without the route prefix Serve puts in
    `root_path` (an ASGI path includes it)."""
    path, root = scope["path"], scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path


class EngineApp:
    """The ASGI app of an engine replica's port: token check, JSON body, the backend's answer."""

    def __init__(self, backend: Backend, token: str) -> None:
        self.backend = backend
        self._token = token.encode()
        self.in_flight = 0  # requests being answered now (for routing stats and draining)
        self.engine_dead = False  # the engine failed its health check: every request is a 503
        self.refused = 0  # requests answered 503 engine_unavailable

    def stats(self) -> dict[str, Any]:
        """The port's part of the replica's routing stats."""
        return {
            "in_flight": self.in_flight,
            "healthy": not self.engine_dead,
            ENGINE_UNAVAILABLE: self.refused,
        }

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        path, method = route_path(scope), scope["method"]
        if path == "/health":
            await _send(send, Answer.json({"status": "ok"}))
            return
        endpoint = ENDPOINTS.get(path)
        if endpoint is None or method != "POST":
            status = 404 if endpoint is None else 405
            await _send(send, Answer.error(status, f"no route {method} {path} on an engine"))
            return
        headers = dict(scope["headers"])
        if not hmac.compare_digest(headers.get(TOKEN_HEADER.encode(), b""), self._token):
            await _send(send, Answer.error(403, "engine ports take requests from the ingress only"))
            return
        body = await _read_body(receive)
        if body is None:
            await _send(send, Answer.error(413, "request body too large"))
            return
        if self.engine_dead:
            await _send(send, self._refused())
            return
        request_id = headers.get(b"x-request-id", b"-").decode("latin-1")
        self.in_flight += 1
        try:
            work = self._respond(endpoint, body, send, request_id)
            await unless_disconnected(work, receive)
        finally:
            self.in_flight -= 1

    async def _respond(self, endpoint: Endpoint, body: bytes, send: Any, request_id: str) -> None:
        answer = await self._answer(endpoint, body, request_id)
        if answer.stream is None:
            await _send(send, answer)
            return
        chunks = answer.stream
        try:
            try:  # the answer's head waits for its first chunk: a failure may still be retried
                chunk = await anext(chunks, None)
            except Exception as exc:
                await _send(send, await self.failure(endpoint, request_id, exc))
                return
            if chunk is not None and _ERROR_EVENT in chunk and await self._engine_gone():
                self._log(endpoint, request_id, chunk)
                await _send(send, self._refused())
                return
            await send({"type": "http.response.start", "status": 200, "headers": _SSE})
            ended = False  # the answer's last bytes are sent (its `[DONE]`)
            try:
                while chunk is not None:
                    if _ERROR_EVENT in chunk:
                        chunk = await self._error_event(endpoint, request_id, chunk)
                    if not ended:  # (nothing follows `[DONE]`; the stream still runs to its end)
                        ended = chunk.endswith(DONE_EVENT)
                        await send({"type": "http.response.body", "body": chunk,
                                    "more_body": not ended})  # fmt: skip
                    chunk = await anext(chunks, None)
            except Exception as exc:  # the stream has started: say so in-band, then end it
                failure = await self.failure(endpoint, request_id, exc)
                if not ended:
                    event = _event(failure) + DONE_EVENT
                    await send({"type": "http.response.body", "body": event, "more_body": True})
            if not ended:
                await send({"type": "http.response.body", "body": b""})
        finally:
            closer = getattr(chunks, "aclose", None)
            if closer is not None:
                await closer()  # stops the generation if the stream did not end

    async def _answer(self, endpoint: Endpoint, body: bytes, request_id: str) -> Answer:
        try:
            data = json.loads(body)
        except ValueError:
            return Answer.error(400, "request body is not valid JSON")
        if not isinstance(data, dict):
            return Answer.error(400, "request body must be a JSON object")
        try:
            answer = await self.backend.answer(endpoint, data)
        except Exception as exc:
            return await self.failure(endpoint, request_id, exc)
        if answer.status >= 500 and answer.stream is None and not answer.ours:
            return await self.failure(endpoint, request_id, answer.body)
        return answer

    async def _error_event(self, endpoint: Endpoint, request_id: str, chunk: bytes) -> bytes:
        """An error event of the engine's stream: a 4xx as it is, anything else replaced by
        ours (the engine's text logged)."""
        try:
            status = int(json.loads(chunk.removeprefix(b"data: "))["error"]["code"])
        except (ValueError, KeyError, TypeError):
            status = 500
        if 400 <= status < 500:
            return chunk
        return _event(await self.failure(endpoint, request_id, chunk))

    async def failure(self, endpoint: Endpoint, request_id: str, detail: object) -> Answer:
        """The answer to an engine failure (`detail`: the exception or the engine's error,
        logged, never answered): 503 `engine_unavailable` when the engine is gone, else 500."""
        self._log(endpoint, request_id, detail)
        if await self._engine_gone():
            return self._refused()
        return Answer.error(500, "the engine failed to answer", code="engine_error")

    async def _engine_gone(self) -> bool:
        """Whether the engine is gone for good: its health check raises (remembered)."""
        if not self.engine_dead:
            try:
                await asyncio.wait_for(self.backend.check_health(), HEALTH_TIMEOUT_S)
            except asyncio.TimeoutError:
                return False
            except Exception:
                logger.error("the engine failed its health check; refusing every request")
                self.engine_dead = True
        return self.engine_dead

    def _refused(self) -> Answer:
        self.refused += 1
        return Answer.error(503, "the replica's engine is gone; retry", code=ENGINE_UNAVAILABLE)

    @staticmethod
    def _log(endpoint: Endpoint, request_id: str, detail: object) -> None:
        if isinstance(detail, BaseException):
            logger.error("request %s: the engine failed a %s request", request_id, endpoint,
                         exc_info=detail)  # fmt: skip
        else:
            text = detail.decode("utf-8", "replace") if isinstance(detail, bytes) else detail
            logger.error("request %s: the engine failed a %s request: %.2000s", request_id,
                         endpoint, text)  # fmt: skip


def _event(answer: Answer) -> bytes:
    """`answer`'s JSON body as a stream's event."""
    return b"data: " + answer.body + b"\n\n"


async def _read_body(receive: Any) -> bytes | None:
    parts, size = [], 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return b"".join(parts)
        parts.append(message.get("body", b""))
        size += len(parts[-1])
        if size > MAX_BODY_BYTES:
            return None
        if not message.get("more_body", False):
            return b"".join(parts)


async def _send(send: Any, answer: Answer) -> None:
    headers = [*_JSON, (b"content-length", str(len(answer.body)).encode())]
    if answer.usage is not None:
        headers.append((_USAGE_HEADER, answer.usage.wire()))
    await send({"type": "http.response.start", "status": answer.status, "headers": headers})
    await send({"type": "http.response.body", "body": answer.body})


async def unless_disconnected(work: Any, receive: Any) -> None:
    """Run `work` (the answer) in this task; cancel it if the client goes away first."""
    this = asyncio.current_task()
    gone = False

    async def watch() -> None:
        nonlocal gone
        while (await receive())["type"] != "http.disconnect":
            pass
        gone = True
        if this is not None:
            this.cancel()

    watcher = asyncio.ensure_future(watch())
    try:
        await work
    except asyncio.CancelledError:
        if not gone:
            raise  # cancelled from outside, not by the client leaving
    finally:
        watcher.cancel()


def engine_host() -> str:
    """The address engine ports bind: `VRSTACK_ENGINE_HOST`, else this Ray node's address."""
    host = os.environ.get(HOST_ENV)
    if host:
        return host
    import ray

    return ray.util.get_node_ip_address()


class EngineHttpServer:
    """The uvicorn server of one engine replica's port, on this process's event loop."""

    def __init__(self, app: EngineApp, host: str | None = None) -> None:
        self.app = app
        self.host = host or engine_host()
        self.url = ""
        self._server: Any = None
        self._task: asyncio.Task | None = None

    async def start(self) -> str:
        """Listen on a free port of the host; the port's base URL."""
        import uvicorn

        sock = socket.socket(socket.AF_INET6 if ":" in self.host else socket.AF_INET)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, 0))
        port = sock.getsockname()[1]
        config = uvicorn.Config(
            self.app,
            lifespan="off",
            # No logging config of uvicorn's own: applying one (`dictConfig`) closes every
            # handler of the process, Ray Serve's included, and a Serve controller restarting
            # then fails to recover the replica (it reads the log file off Serve's handler).
            log_config=None,
            log_level="warning",
            access_log=False,
            http="httptools",
            loop="none",
            timeout_keep_alive=75,
        )
        self._server = uvicorn.Server(config)
        self._task = asyncio.get_running_loop().create_task(self._server.serve(sockets=[sock]))
        while not self._server.started:
            if self._task.done():
                self._task.result()  # raises what stopped the server
            await asyncio.sleep(0.01)
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.url = f"http://{host}:{port}"
        return self.url

    async def stop(self, drain_s: float = DRAIN_S) -> None:
        """Stop accepting; let the requests in progress finish for up to `drain_s`."""
        if self._server is None or self._task is None:
            return
        self._server.config.timeout_graceful_shutdown = drain_s
        self._server.should_exit = True
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.shield(self._task), drain_s + 5)
        self._task.cancel()
