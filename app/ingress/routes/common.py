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


async def answer(gateway: Gateway, endpoint: Endpoint, body: OpenAIRequest) -> Response:
    """Send `body` to its model's engine; JSON for plain requests, SSE for `stream: true`."""
    if not getattr(body, "stream", False):
        return JSONResponse(await gateway.call(endpoint, body))
    stream = await gateway.open(endpoint, body)
    return StreamingResponse(
        stream.sse(),
        media_type="text/event-stream",
        headers={"cache-control": "no-cache", "x-accel-buffering": "no"},
    )
