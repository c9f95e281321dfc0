"""GET /v1/models (and /models), GET /v1/models/{model}."""

from typing import Any

from fastapi import APIRouter, Request

from app.ingress.routes.common import GatewayDep

router = APIRouter(tags=["models"])


@router.get("/v1/models")
@router.get("/models", include_in_schema=False)
async def list_models(request: Request, gateway: GatewayDep) -> dict[str, Any]:
    """Every model and alias (a tenant's: those it may use), in OpenAI's list shape."""
    return {"object": "list", "data": gateway.model_cards(_tenant(request))}


@router.get("/v1/models/{model:path}")
async def retrieve_model(model: str, request: Request, gateway: GatewayDep) -> dict[str, Any]:
    """One model or alias; 404 naming the available ones when unknown (or not the tenant's)."""
    tenant = _tenant(request)
    gateway.resolve(model, tenant)
    return next(card for card in gateway.model_cards(tenant) if card["id"] == model)


def _tenant(request: Request) -> str | None:
    return getattr(request.state, "tenant", None)
