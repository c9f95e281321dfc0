"""What the endpoint modules share: the gateway dependency (GET routes), the caller of a
FastAPI route and the owner of what it stores, and `PostRoute`."""

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


@dataclass(frozen=True, slots=True)
class Caller:
    """Who calls a FastAPI route (set by `app.ingress.auth.AuthMiddleware`): its key id, its
    tenant, and the owner of what it stores (responses, files, batches): the tenant, else the
    key, so another tenant's or key's are as absent as missing ones."""

    key_id: str
    tenant: str | None

    @property
    def owner(self) -> str:
        return f"tenant:{self.tenant}" if self.tenant is not None else f"key:{self.key_id}"


def caller_of(request: Request) -> Caller:
    """The caller of a FastAPI route."""
    return Caller(request.state.api_key_id, request.state.tenant)


CallerDep = Annotated[Caller, Depends(caller_of)]


@dataclass(frozen=True)
class PostRoute:
    """An OpenAI POST endpoint: its paths, its request model, the engine endpoint it reaches.

    The ingress answers these itself (`app.ingress.asgi`): checked, then relayed to an engine
    replica; their OpenAPI entries are made from `request`."""

    endpoint: Endpoint
    request: type[OpenAIRequest]
    paths: tuple[str, ...]
    summary: str
