"""What the endpoint modules share: the gateway dependency and the JSON-or-SSE answer."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from app.ingress.gateway import Gateway
from app.ingress.protocol import OpenAIRequest
from app.wire import Endpoint


def _gateway(request: Request) -> Gateway:
    return request.app.state.gateway


GatewayDep = Annotated[Gateway, Depends(_gateway)]


async def answer(
    gateway: Gateway, endpoint: Endpoint, body: OpenAIRequest, request: Request
) -> Response:
    """Send `body` to its model's engine; JSON for plain requests, SSE for `stream: true`.

    The response carries the routing decision as `x-route-*` headers."""
    session_key = gateway.config.router.session_key
    stream = await gateway.open(
        endpoint,
        body,
        session=request.headers.get(session_key) if session_key else None,
    )
    headers = stream.route_headers()
    if not getattr(body, "stream", False):
        return JSONResponse(stream.body(), headers=headers)
    return StreamingResponse(
        stream.sse(),
        media_type="text/event-stream",
        headers={"cache-control": "no-cache", "x-accel-buffering": "no", **headers},
    )
