"""What the endpoint modules share: the gateway dependency (GET routes) and `PostRoute`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from app.engines.items import Endpoint
from app.ingress.gateway import Gateway
from app.ingress.protocol import OpenAIRequest


def _gateway(request: Request) -> Gateway:
    return request.app.state.gateway


GatewayDep = Annotated[Gateway, Depends(_gateway)]


@dataclass(frozen=True)
class PostRoute:
    """An OpenAI POST endpoint: its paths, its request model, the engine endpoint it reaches.

    The ingress answers these itself (`app.ingress.asgi`): checked, then relayed to an engine
    replica; their OpenAPI entries are made from `request`."""

    endpoint: Endpoint
    request: type[OpenAIRequest]
    paths: tuple[str, ...]
    summary: str
