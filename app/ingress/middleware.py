"""ASGI plumbing shared by the ingress's paths: request ids, errors sent from ASGI, bounded
bodies, and the edge middleware Ray Serve runs in front of the ingress.

Ray Serve's HTTP servers read a few request headers before our app runs: `x-request-id`
(decoded as UTF-8; a bad byte is a 500), `x-request-timeout-seconds` (a time-out answered with
Ray's plain-text 408) and `x-request-disconnect-disabled: ?1` (Ray stops cancelling the request
when the client leaves). `EdgeMiddleware`, which Ray puts outermost when `RAY_EDGE_ENV` is in
the ingress replica's environment, drops the client's time-out hint (the stack's own time-out
applies), replaces an invalid id before Ray sees it, and tells Ray not to watch for the client
leaving: the ingress app watches for that itself (and cancels the engine's work), so Ray's own
watcher (a receive task and a request task per request) would be a second one.
"""

from __future__ import annotations

import itertools
import json
import os
import re
from typing import Any

from starlette.middleware import Middleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.errors import OpenAIError

REQUEST_ID = "x-request-id"
_REQUEST_ID = REQUEST_ID.encode()
_VALID_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
RAY_CLIENT_HINTS = frozenset({b"x-request-timeout-seconds", b"x-request-disconnect-disabled"})
# Set by the edge on every request: Ray then calls the app straight, with no watcher of its own.
RAY_NO_WATCH = (b"x-request-disconnect-disabled", b"?1")
# Ray Serve wraps its HTTP servers in the middlewares the function this variable names returns.
RAY_EDGE_ENV = {"RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": f"{__name__}:edge_middlewares"}
# New request ids: 16 random hex digits per process, then a count (uuid4's length, no syscall).
_ID_PREFIX = os.urandom(8).hex()
_ID_COUNT = itertools.count(1)
MAX_JSON_DEPTH = 100  # nesting of arrays and objects a request body may have
# A surrogate's escape, or its bytes: (rare) bodies that may hold one are checked whole.
_SURROGATE = re.compile(rb"\\u[dD][89a-fA-F]|\xed[\xa0-\xbf]")


def request_id_of(scope: Scope) -> str:
    """The request's id: the client's `x-request-id` if valid (1 to 128 of `A-Za-z0-9._:-`),
    else a new one (32 hex digits, unique per process start). It replaces the header in `scope`
    for everything downstream."""
    headers = scope.get("headers") or []
    given = dict(headers).get(_REQUEST_ID, b"").decode("latin-1")
    request_id = given if _VALID_ID.fullmatch(given) else _ID_PREFIX + f"{next(_ID_COUNT):016x}"
    kept = [h for h in headers if h[0] != _REQUEST_ID]
    scope["headers"] = [*kept, (_REQUEST_ID, request_id.encode())]
    return request_id


def with_request_id(send: Send, request_id: str) -> Send:
    """`send`, the response's headers carrying `x-request-id` once: `request_id`."""
    header = (_REQUEST_ID, request_id.encode())

    async def send_with_id(message: Message) -> None:
        if message["type"] == "http.response.start":
            headers = [h for h in message.get("headers", []) if h[0].lower() != _REQUEST_ID]
            message = {**message, "headers": [*headers, header]}
        await send(message)

    return send_with_id


class EdgeMiddleware:
    """Ray Serve's outermost middleware (see the module docstring): drops Ray's client hints,
    tells Ray the app watches for the client leaving, makes `x-request-id` valid before Ray
    reads it, and answers with that id once."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        kept = [h for h in scope["headers"] if h[0] not in RAY_CLIENT_HINTS]
        scope["headers"] = [*kept, RAY_NO_WATCH]
        await self.app(scope, receive, with_request_id(send, request_id_of(scope)))


def edge_middlewares() -> list[Middleware]:
    """What Ray Serve adds to its HTTP servers (`RAY_EDGE_ENV`)."""
    return [Middleware(EdgeMiddleware)]


def without_body(send: Send) -> Send:
    """`send` for a HEAD request: the GET answer's status and headers, no body bytes."""

    async def send_head(message: Message) -> None:
        if message["type"] == "http.response.body":
            message = {**message, "body": b""}
        await send(message)

    return send_head


async def send_error(send: Send, error: OpenAIError) -> None:
    """Answer an OpenAI-shaped error from ASGI code."""
    payload = json.dumps(error.body()).encode()
    headers = [(k.encode(), v.encode()) for k, v in error.headers.items()]
    await send({
        "type": "http.response.start",
        "status": error.status,
        "headers": [(b"content-type", b"application/json"),
                    (b"content-length", str(len(payload)).encode()), *headers],
    })  # fmt: skip
    await send({"type": "http.response.body", "body": payload})


def json_object(body: bytes) -> dict[str, Any]:
    """The request body as a JSON object, or a 400 `OpenAIError`: not JSON, not an object, or
    nesting arrays and objects deeper than `MAX_JSON_DEPTH` (nothing downstream sees it)."""
    try:
        data = json.loads(body)
    except RecursionError:  # the parser's own bound, far above ours
        raise _too_deep() from None
    except ValueError:
        raise OpenAIError(400, "request body is not valid JSON") from None
    if not isinstance(data, dict):
        raise OpenAIError(400, "request body must be a JSON object")
    # Too few brackets to nest that deep: no walk (most bodies).
    if body.count(b"[") + body.count(b"{") > MAX_JSON_DEPTH and _nests_deeper(data):
        raise _too_deep()
    if _SURROGATE.search(body) and _has_lone_surrogate(data):
        raise OpenAIError(400, "request body holds a lone UTF-16 surrogate (not valid Unicode)",
                          code="invalid_unicode")  # fmt: skip
    return data


def _has_lone_surrogate(data: dict[str, Any]) -> bool:
    """Whether a string in `data` holds a surrogate that is not half of a pair."""
    try:
        json.dumps(data, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        return True
    return False


def _nests_deeper(data: dict[str, Any]) -> bool:
    """Whether `data` nests deeper than `MAX_JSON_DEPTH`: level by level, no recursion."""
    level: list[Any] = [data]
    for _ in range(MAX_JSON_DEPTH):
        level = [
            child
            for value in level
            for child in (value.values() if isinstance(value, dict) else value)
            if isinstance(child, list | dict)
        ]
        if not level:
            return False
    return True


async def read_body(scope: Scope, receive: Receive, max_bytes: int) -> bytes:
    """The whole request body, or a 413 `OpenAIError` when it is larger than `max_bytes` (by
    its Content-Length, or counted as it arrives)."""
    declared = dict(scope.get("headers") or []).get(b"content-length", b"")
    if declared.isdigit() and int(declared) > max_bytes:
        raise _too_large(max_bytes)
    parts: list[bytes] = []
    size = 0
    while True:
        message: dict[str, Any] = await receive()
        if message["type"] != "http.request":
            break
        parts.append(message.get("body", b""))
        size += len(parts[-1])
        if size > max_bytes:
            raise _too_large(max_bytes)
        if not message.get("more_body", False):
            break
    return b"".join(parts)


def _too_deep() -> OpenAIError:
    message = f"request body nests arrays and objects deeper than {MAX_JSON_DEPTH} levels"
    return OpenAIError(400, message, code="nesting_too_deep")


def _too_large(max_bytes: int) -> OpenAIError:
    message = f"request body is larger than the limit of {max_bytes} bytes"
    return OpenAIError(413, message, code="request_too_large")
