"""ASGI middleware: body-size limit (413) and request ids."""

from __future__ import annotations

import json
import re
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.errors import error_body

REQUEST_ID = "x-request-id"
_VALID_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


async def send_error(
    send: Send,
    status: int,
    message: str,
    *,
    code: str | None = None,
    headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    """Answer an OpenAI-shaped error from ASGI middleware (before the app runs)."""
    payload = json.dumps(error_body(status, message, code=code)).encode()
    await send({
        "type": "http.response.start",
        "status": status,
        "headers": [(b"content-type", b"application/json"),
                    (b"content-length", str(len(payload)).encode()), *(headers or [])],
    })  # fmt: skip
    await send({"type": "http.response.body", "body": payload})


class BodyLimitMiddleware:
    """Answer 413 for bodies over `max_bytes`, by Content-Length or by counting what arrives."""

    def __init__(self, app: ASGIApp, *, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length", b"").decode() or None
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._reject(send)
            return
        if declared is None:  # chunked: read it all (bounded), then replay it to the app
            body = await self._read_bounded(receive)
            if body is None:
                await self._reject(send)
                return
            receive = _replay(body, receive)
        await self.app(scope, receive, send)

    async def _read_bounded(self, receive: Receive) -> bytes | None:
        parts: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break
            parts.append(message.get("body", b""))
            size += len(parts[-1])
            if size > self.max_bytes:
                return None
            if not message.get("more_body", False):
                break
        return b"".join(parts)

    async def _reject(self, send: Send) -> None:
        message = f"request body is larger than the limit of {self.max_bytes} bytes"
        await send_error(send, 413, message, code="request_too_large")


def _replay(body: bytes, receive: Receive) -> Receive:
    """The whole body as one message, then the client's own messages (e.g. disconnect)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay


class RequestIdMiddleware:
    """Give every request an id (the client's `x-request-id` if valid, else a new one).

    Behind Ray Serve's proxy the header is always present and the proxy echoes it on the
    response; standalone, this middleware adds it to the response itself.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = [(k, v) for k, v in scope.get("headers") or [] if k != REQUEST_ID.encode()]
        given = dict(scope.get("headers") or []).get(REQUEST_ID.encode(), b"").decode()
        request_id = given if _VALID_ID.match(given) else uuid.uuid4().hex
        scope = {**scope, "headers": [*headers, (REQUEST_ID.encode(), request_id.encode())]}
        echo = not given

        async def send_with_id(message: Message) -> None:
            if echo and message["type"] == "http.response.start":
                message = {
                    **message,
                    "headers": [
                        *message.get("headers", []),
                        (REQUEST_ID.encode(), request_id.encode()),
                    ],
                }
            await send(message)

        await self.app(scope, receive, send_with_id)
