"""What the endpoint modules share: the gateway dependency and the JSON-or-SSE answer."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from app.engines.items import Endpoint
from app.ingress.auth import ANONYMOUS
from app.ingress.gateway import Gateway
from app.ingress.limits import Lease
from app.ingress.protocol import OpenAIRequest


def _gateway(request: Request) -> Gateway:
    return request.app.state.gateway


GatewayDep = Annotated[Gateway, Depends(_gateway)]


async def answer(
    gateway: Gateway, endpoint: Endpoint, body: OpenAIRequest, request: Request
) -> Response:
    """Send `body` to its model's engine; JSON for plain requests, SSE for `stream: true`.

    The response carries the routing decision as `x-route-*` headers."""
    session_key = gateway.config.router.session_key
    lease = gateway.admit(getattr(request.state, "api_key_id", ANONYMOUS), body)
    streaming = False
    try:
        stream = await gateway.open(
            endpoint,
            body,
            session=request.headers.get(session_key) if session_key else None,
        )
        headers = stream.route_headers()
        if not getattr(body, "stream", False):
            return JSONResponse(stream.body(), headers=headers)
        streaming = True  # the lease now ends with the stream
        return StreamingResponse(
            _released_after(stream.sse(), lease),
            media_type="text/event-stream",
            headers={"cache-control": "no-cache", "x-accel-buffering": "no", **headers},
        )
    finally:
        if not streaming:
            lease.release()


async def _released_after(chunks: AsyncIterator[str], lease: Lease) -> AsyncIterator[str]:
    try:
        async for chunk in chunks:
            yield chunk
    finally:
        lease.release()
