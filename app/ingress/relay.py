"""The HTTP path's one hop: a request relayed to an engine replica's port, its answer back.

`Relay` holds one `EnginePool` (`app.ingress.engine_http`: kept-alive connections to every
engine port this ingress replica uses). `send` posts the request with the stack's internal
token and returns once the answer's head is in; connection failures and time-outs up to then
are `RelayError`s the caller may retry on another replica (nothing was sent to the client yet),
and so may an answer saying the replica's engine is gone (`engine_unavailable`). `pass_through`
copies the answer to the client: a JSON body whole, a stream chunk by chunk as it arrives (no
parsing), ending a stream that breaks or stalls with an OpenAI-shaped error event and `data:
[DONE]`.

It also hands the caller the answer's token usage as the engine counted it
(`app.engines.http_server`), with no look into the answer's JSON: a 200 JSON answer's
`x-vrstack-usage` header (never passed on), or the `: vrstack-usage <prompt> <completion>`
comment in a stream's final chunk, the one that ends with `data: [DONE]` (stripped there). A
comment split across reads is not found: it reaches the client as it is (an SSE comment, which
clients skip) and the answer has no usage (the caller keeps what it reserved), as an error
answer, a stream that breaks off, or an engine that sends none.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from app.engines.http_server import (
    DONE_EVENT,
    ENGINE_UNAVAILABLE,
    TOKEN_HEADER,
    USAGE_COMMENT,
    USAGE_HEADER,
    Usage,
)
from app.errors import error_body
from app.ingress.engine_http import EnginePool, EngineResponse, Stopped

logger = logging.getLogger("vrstack.ingress")
Send = Callable[[dict[str, Any]], Awaitable[None]]


class RelayError(Exception):
    """The replica could not be reached or did not answer in time (before any byte)."""

    def __init__(self, message: str, *, timed_out: bool = False) -> None:
        super().__init__(message)
        self.timed_out = timed_out


class Relay:
    """Requests to engine replicas' ports over kept-alive connections."""

    def __init__(self, token: str, *, timeout_s: float) -> None:
        self._headers = _header_lines({TOKEN_HEADER: token, "content-type": "application/json"})
        self.timeout_s = timeout_s
        self._pool: EnginePool | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def _client(self) -> EnginePool:
        loop = asyncio.get_running_loop()  # connections serve the event loop they were made on
        if self._pool is None or self._loop is not loop:
            self._pool = EnginePool(timeout_s=self.timeout_s)
            self._loop = loop
        return self._pool

    async def send(
        self,
        url: str,
        path: str,
        body: bytes,
        request_id: str,
        traceparent: str | None = None,
        sent: Callable[[EngineResponse], None] | None = None,
    ) -> EngineResponse:
        """POST to `url + path` (with the trace's `traceparent` when traced); the response with
        its head read (the caller releases it). `sent`: see `EnginePool.post` (an answer
        aborted before its head raises `Stopped`, not a `RelayError`)."""
        extra = {"x-request-id": request_id}
        if traceparent:
            extra["traceparent"] = traceparent
        headers = self._headers + _header_lines(extra)
        try:
            return await self._client().post(url, path, headers, body, sent)
        except Stopped:
            raise
        except TimeoutError as exc:
            raise RelayError(f"no answer within {self.timeout_s:g} s", timed_out=True) from exc
        except OSError as exc:
            raise RelayError(f"{type(exc).__name__}: {exc}") from exc

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()


def _header_lines(headers: dict[str, str]) -> bytes:
    """`name: value\r\n` lines; a value that would break the request's head is refused."""
    lines = []
    for name, value in headers.items():
        if "\r" in value or "\n" in value:
            raise ValueError(f"header {name} holds a line break")
        lines.append(f"{name}: {value}\r\n")
    return "".join(lines).encode("latin-1")


async def engine_unavailable(response: EngineResponse) -> bool:
    """Whether the answer says the replica's engine is gone (503 `engine_unavailable`): the
    request may go to another replica. Reads the body of a 503 only (kept for `pass_through`)."""
    if response.status != 503:
        return False
    try:
        error = json.loads(await response.read()).get("error")
    except (ValueError, AttributeError, OSError):  # (TimeoutError is an OSError)
        return True  # a 503 that breaks off: the replica is going away
    return isinstance(error, dict) and error.get("code") == ENGINE_UNAVAILABLE


async def pass_through(
    response: EngineResponse,
    send: Send,
    headers: list[tuple[bytes, bytes]],
    on_first_byte: Callable[[], None],
    on_usage: Callable[[Usage], None] = lambda usage: None,
) -> Usage | None:
    """Copy the engine's answer to the client: its status, `headers` and body as it comes; the
    answer's (prompt, completion) tokens when the engine told them (see the module docstring),
    also given to `on_usage` before the answer's last bytes are sent (a client that leaves once
    it has them may cancel the relay before it returns)."""
    kind = response.headers.get("content-type", "application/json").encode()
    start = {"type": "http.response.start", "status": response.status}
    if not kind.startswith(b"text/event-stream"):
        body = await response.read()
        on_first_byte()
        head = [(b"content-type", kind), (b"content-length", str(len(body)).encode())]
        usage = parse_usage(response.headers.get(USAGE_HEADER)) if response.status == 200 else None
        if usage is not None:
            on_usage(usage)
        await send({**start, "headers": [*head, *headers]})
        await send({"type": "http.response.body", "body": body})
        return usage
    await send(stream_head(response, headers))
    first, tail, usage = True, b"", None
    try:
        async for chunk in response.chunks():
            if first:
                on_first_byte()
                first = False
            if chunk.endswith(DONE_EVENT):  # the final chunk: it may hold the usage's comment
                chunk, usage = _strip_usage(chunk)
                if usage is not None:
                    on_usage(usage)
            tail = (tail + chunk)[-len(DONE_EVENT) :]
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        if tail == DONE_EVENT:
            await send({"type": "http.response.body", "body": b""})
            return usage
        failure = error_body(502, "the engine ended the stream early", code="engine_error")
    except TimeoutError:
        failure = error_body(504, "the engine stopped answering mid-stream", code="timeout")
    except OSError as exc:
        logger.warning("engine stream broke: %s: %s", type(exc).__name__, exc)
        failure = error_body(502, "the engine's stream broke off", code="engine_error")
    event = b"data: " + json.dumps(failure).encode() + b"\n\n"
    await send({"type": "http.response.body", "body": event + DONE_EVENT})
    return None


def stream_head(response: EngineResponse, headers: list[tuple[bytes, bytes]]) -> dict[str, Any]:
    """The head of a stream's answer to the client: the engine's content type, `headers`."""
    kind = response.headers.get("content-type", "text/event-stream").encode()
    return {
        "type": "http.response.start",
        "status": response.status,
        "headers": [(b"content-type", kind), (b"cache-control", b"no-cache"), *headers],
    }


def parse_usage(text: str | bytes | None) -> Usage | None:
    """The `Usage` of `"<prompt> <completion>[ <cached>]"`; None if it is not that."""
    if not text:
        return None
    try:
        numbers = [int(n) for n in text.split()]
    except ValueError:
        return None
    if len(numbers) not in (2, 3) or min(numbers) < 0:
        return None
    return Usage(*numbers)


def _strip_usage(chunk: bytes) -> tuple[bytes, Usage | None]:
    """A stream's final chunk (it ends with `data: [DONE]`) without the usage's comment just
    before that, and the usage; the chunk as it is and None when the comment is not all in it."""
    end = len(chunk) - len(DONE_EVENT)
    at = chunk.rfind(USAGE_COMMENT, 0, end)
    if at < 0 or (at > 0 and chunk[at - 1] != 0x0A):  # not at the start of a line
        return chunk, None
    line = chunk[at + len(USAGE_COMMENT) : end]
    if not line.endswith(b"\n\n") or b"\n" in line[:-2]:
        return chunk, None
    usage = parse_usage(line[:-2])
    return (chunk, None) if usage is None else (chunk[:at] + DONE_EVENT, usage)
