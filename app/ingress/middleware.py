"""ASGI plumbing shared by the ingress's paths: request ids, errors sent from ASGI, bounded
bodies."""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

from starlette.types import Message, Receive, Scope, Send

from app.errors import OpenAIError

REQUEST_ID = "x-request-id"
_REQUEST_ID = REQUEST_ID.encode()
_VALID_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def request_id_of(scope: Scope) -> tuple[str, bool]:
    """The request's id (the client's `x-request-id` if valid, else a new one) and whether the
    client gave it. The id replaces the header in `scope` for everything downstream."""
    headers = scope.get("headers") or []
    given = dict(headers).get(_REQUEST_ID, b"").decode("latin-1")
    request_id = given if _VALID_ID.match(given) else uuid.uuid4().hex
    kept = [h for h in headers if h[0] != _REQUEST_ID]
    scope["headers"] = [*kept, (_REQUEST_ID, request_id.encode())]
    return request_id, bool(given)


def with_request_id(send: Send, request_id: str) -> Send:
    """`send`, adding `x-request-id` to the response's headers."""
    header = (_REQUEST_ID, request_id.encode())

    async def send_with_id(message: Message) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", []), header]}
        await send(message)

    return send_with_id


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


def _too_large(max_bytes: int) -> OpenAIError:
    message = f"request body is larger than the limit of {max_bytes} bytes"
    return OpenAIError(413, message, code="request_too_large")
