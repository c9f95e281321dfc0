"""GET /v1/models (and /models), GET /v1/models/{model}."""

from typing import Any

from fastapi import APIRouter

from app.ingress.routes.common import GatewayDep

router = APIRouter(tags=["models"])


@router.get("/v1/models")
@router.get("/models", include_in_schema=False)
async def list_models(gateway: GatewayDep) -> dict[str, Any]:
    """Every model and alias, in OpenAI's list shape."""
    return {"object": "list", "data": gateway.model_cards()}


@router.get("/v1/models/{model:path}")
async def retrieve_model(model: str, gateway: GatewayDep) -> dict[str, Any]:
    """One model or alias; 404 naming the available ones when unknown."""
    gateway.resolve(model)
    return next(card for card in gateway.model_cards() if card["id"] == model)
