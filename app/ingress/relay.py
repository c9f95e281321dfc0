"""The HTTP path's one hop: a request relayed to an engine replica's port, its answer back.

`Relay` holds one aiohttp session (keep-alive connections to every engine port this ingress
replica uses). `send` posts the request with the stack's internal token and returns once the
answer's head is in; connection failures and time-outs up to then are `RelayError`s the caller
may retry on another replica (nothing was sent to the client yet), and so may an answer
saying the replica's engine is gone (`engine_unavailable`). `pass_through` copies the answer
to the client: a JSON body whole, a stream chunk by chunk as it arrives (no parsing), ending a
stream that breaks or stalls with an OpenAI-shaped error event and `data: [DONE]`.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp

from app.engines.http_server import ENGINE_UNAVAILABLE, TOKEN_HEADER
from app.errors import error_body

logger = logging.getLogger("vrstack.ingress")
Send = Callable[[dict[str, Any]], Awaitable[None]]
_DONE = b"data: [DONE]\n\n"


class RelayError(Exception):
    """The replica could not be reached or did not answer in time (before any byte)."""

    def __init__(self, message: str, *, timed_out: bool = False) -> None:
        super().__init__(message)
        self.timed_out = timed_out


class Relay:
    """Requests to engine replicas' ports over kept-alive connections."""

    def __init__(self, token: str, *, timeout_s: float) -> None:
        self._headers = {TOKEN_HEADER: token, "content-type": "application/json"}
        self.timeout_s = timeout_s
        self._timeout = aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=timeout_s)
        self._session: aiohttp.ClientSession | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def _client(self) -> aiohttp.ClientSession:
        loop = asyncio.get_running_loop()  # a session serves the event loop it was made on
        if self._session is None or self._session.closed or self._loop is not loop:
            connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=60)
            self._session = aiohttp.ClientSession(
                connector=connector, timeout=self._timeout, auto_decompress=False
            )
            self._loop = loop
        return self._session

    async def send(
        self, url: str, path: str, body: bytes, request_id: str, traceparent: str | None = None
    ) -> aiohttp.ClientResponse:
        """POST to `url + path` (with the trace's `traceparent` when traced); the response with
        its head read (the caller releases it)."""
        headers = {**self._headers, "x-request-id": request_id}
        if traceparent:
            headers["traceparent"] = traceparent
        try:
            return await self._client().post(url + path, data=body, headers=headers)
        except (asyncio.TimeoutError, aiohttp.ServerTimeoutError) as exc:
            raise RelayError(f"no answer within {self.timeout_s:g} s", timed_out=True) from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise RelayError(f"{type(exc).__name__}: {exc}") from exc

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


async def engine_unavailable(response: aiohttp.ClientResponse) -> bool:
    """Whether the answer says the replica's engine is gone (503 `engine_unavailable`): the
    request may go to another replica. Reads the body of a 503 only (kept for `pass_through`)."""
    if response.status != 503:
        return False
    try:
        error = json.loads(await response.read()).get("error")
    except (ValueError, AttributeError, aiohttp.ClientError, OSError, asyncio.TimeoutError):
        return True  # a 503 that breaks off: the replica is going away
    return isinstance(error, dict) and error.get("code") == ENGINE_UNAVAILABLE


async def pass_through(
    response: aiohttp.ClientResponse,
    send: Send,
    headers: list[tuple[bytes, bytes]],
    on_first_byte: Callable[[], None],
) -> None:
    """Copy the engine's answer to the client: its status, `headers` and body as it comes."""
    kind = response.headers.get("content-type", "application/json").encode()
    start = {"type": "http.response.start", "status": response.status}
    if not kind.startswith(b"text/event-stream"):
        body = await response.read()
        on_first_byte()
        head = [(b"content-type", kind), (b"content-length", str(len(body)).encode())]
        await send({**start, "headers": [*head, *headers]})
        await send({"type": "http.response.body", "body": body})
        return
    await send({**start, "headers": [(b"content-type", kind), (b"cache-control", b"no-cache"),
                                     *headers]})  # fmt: skip
    first, tail = True, b""
    try:
        async for chunk in response.content.iter_any():
            if first:
                on_first_byte()
                first = False
            tail = (tail + chunk)[-len(_DONE) :]
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        if tail == _DONE:
            await send({"type": "http.response.body", "body": b""})
            return
        failure = error_body(502, "the engine ended the stream early", code="engine_error")
    except (asyncio.TimeoutError, aiohttp.ServerTimeoutError):
        failure = error_body(504, "the engine stopped answering mid-stream", code="timeout")
    except (aiohttp.ClientError, OSError) as exc:
        logger.warning("engine stream broke: %s: %s", type(exc).__name__, exc)
        failure = error_body(502, "the engine's stream broke off", code="engine_error")
    event = b"data: " + json.dumps(failure).encode() + b"\n\n"
    await send({"type": "http.response.body", "body": event + _DONE})
